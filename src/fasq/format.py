"""The stored format of one product-quantized weight, bit packing, and exact storage accounting.

A weight ``W[out, in]`` is stored as (see docs/format.md):

* ``codes``      int32 ``[M, out, W]``: for each codebook m and row o, the row's ``n_sub`` codes of
  ``b = ceil(log2 K)`` bits each, packed LSB-first as one bit stream into 32-bit words.  Code ``j``
  occupies bits ``[j*b, (j+1)*b)`` of the row's stream; a code may straddle two words.  Each row
  starts on a word boundary (``W = ceil(n_sub*b/32)``), so at most 31 padding bits per row.
* ``codebooks``  fp16 ``[M, K, d]``.
* ``scales``     fp16 ``[out, G]`` (one per row and group of ``group_size`` columns) or empty.
* ``rot_signs``  int8 ``[in]`` of +-1 when a randomized block Hadamard rotation was used, else empty.
* ``outlier_idx`` int32 ``[n]`` and ``outlier_val`` fp16 ``[n]``, only when ``n_outliers > 0``: a
  sparse correction added to the dequantized weight, ``W.view(-1)[idx] += val`` (flat index
  ``row * in + col``, in the unrotated basis), which makes the ``n`` largest-magnitude weights exact
  to fp16.  ``n`` follows from the shape and the config (:func:`outlier_count`), so sizes are known
  before fitting.

``in`` is padded with zeros to ``n_sub * d`` columns; the padding is dropped on dequantization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# 2: quantized token embeddings (quantization_config["embeddings"], docs/format.md).  A model without them is
# written as version 1, which every fasq reads.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)


def outlier_count(out_features: int, in_features: int, fraction: float) -> int:
    """Weights of an ``[out, in]`` layer kept in the sparse side table for ``outlier_fraction``."""
    return int(fraction * out_features * in_features + 0.5) if fraction > 0 else 0


def code_bits(num_centroids: int) -> int:
    return max(1, (int(num_centroids) - 1).bit_length())


def packed_words(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 31) // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., N]`` (values < 2**bits) into int32 words ``[..., ceil(N*bits/32)]``."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits}: allowed is 1..16")
    lead = codes.shape[:-1]
    n = codes.shape[-1]
    c = codes.reshape(-1, n).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: min {int(c.min())}, max {int(c.max())}")
    nw = packed_words(n, bits)
    pos = torch.arange(n, dtype=torch.int64, device=c.device) * bits
    word = pos >> 5
    shift = pos & 31
    words = torch.zeros(c.shape[0], nw + 1, dtype=torch.int64, device=c.device)
    lo = (c << shift) & 0xFFFFFFFF
    hi = c >> (32 - shift)  # bits that spill into the next word (0 when none spill)
    words.index_add_(1, word, lo)
    words.index_add_(1, word + 1, hi)
    words = words[:, :nw]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)  # reinterpret as int32
    return words.to(torch.int32).reshape(*lead, nw)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., W]`` -> int64 codes ``[..., n_codes]``."""
    lead = packed.shape[:-1]
    w = packed.reshape(-1, packed.shape[-1]).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    pos = torch.arange(n_codes, dtype=torch.int64, device=packed.device) * bits
    word = pos >> 5
    shift = pos & 31
    both = w[:, word] | (w[:, word + 1] << 32)
    codes = (both >> shift) & ((1 << bits) - 1)
    return codes.reshape(*lead, n_codes)


MAX_FEATURES = 1 << 24   # a layer width beyond any model's (and a bound that keeps buffer sizes sane)


def _range(name: str, v: int, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        raise ValueError(f"LayerSpec.{name}={v}: allowed is an integer from {lo} to {hi}")


# Every buffer a PQLinear may hold and its stored dtype (which ones a layer has: LayerSpec.buffer_shapes).
BUFFER_DTYPES: dict[str, torch.dtype] = {
    "codes": torch.int32, "codebooks": torch.float16, "scales": torch.float16, "rot_signs": torch.int8,
    "bias": torch.float16, "outlier_idx": torch.int32, "outlier_val": torch.float16}


@dataclass(frozen=True)
class LayerSpec:
    """Shape and settings of one quantized layer: all a loader needs to allocate its buffers."""

    in_features: int
    out_features: int
    subvector_dim: int
    num_centroids: int
    num_codebooks: int = 1
    group_size: int = 0          # 0: one scale per row; scales absent when has_scales is False
    has_scales: bool = True
    rotation_block: int = 0      # 0: no rotation; else Hadamard block size (power of two dividing in)
    has_bias: bool = False
    n_outliers: int = 0          # weights corrected exactly by the sparse side table

    def __post_init__(self) -> None:
        # A spec comes from a file as often as from code: check every field's type and range so a bad
        # config.json is a clear ValueError (FormatError at load), never a crash deep in a kernel.
        for name in ("in_features", "out_features", "subvector_dim", "num_centroids", "num_codebooks",
                     "group_size", "rotation_block", "n_outliers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"LayerSpec.{name}={v!r}: must be an integer")
        for name in ("has_scales", "has_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LayerSpec.{name}={getattr(self, name)!r}: must be true or false")
        _range("in_features", self.in_features, 1, MAX_FEATURES)
        _range("out_features", self.out_features, 1, MAX_FEATURES)
        _range("subvector_dim", self.subvector_dim, 1, 16)
        _range("num_centroids", self.num_centroids, 2, 65536)
        _range("num_codebooks", self.num_codebooks, 1, 8)
        _range("group_size", self.group_size, 0, MAX_FEATURES)   # 0: one scale per row
        rb = self.rotation_block
        if rb and (rb < 2 or rb & (rb - 1) or self.in_features % rb):
            raise ValueError(f"LayerSpec.rotation_block={rb}: allowed is 0 (no rotation) or a power of two >= 2 "
                             f"dividing in_features={self.in_features}")
        if not 0 <= self.n_outliers <= self.in_features * self.out_features:
            raise ValueError(f"n_outliers={self.n_outliers}: allowed is 0..{self.in_features * self.out_features}")
        if self.in_features * self.out_features >= 2**31 and self.n_outliers:
            raise ValueError("outliers need in_features * out_features < 2**31 (int32 flat indices)")

    @property
    def bits(self) -> int:
        return code_bits(self.num_centroids)

    @property
    def n_sub(self) -> int:
        return math.ceil(self.in_features / self.subvector_dim)

    @property
    def padded_in(self) -> int:
        return self.n_sub * self.subvector_dim

    @property
    def effective_group(self) -> int:
        return self.group_size if self.group_size else self.padded_in

    @property
    def n_groups(self) -> int:
        return math.ceil(self.padded_in / self.effective_group) if self.has_scales else 0

    @property
    def words_per_row(self) -> int:
        return packed_words(self.n_sub, self.bits)

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "codes": (self.num_codebooks, self.out_features, self.words_per_row),
            "codebooks": (self.num_codebooks, self.num_centroids, self.subvector_dim),
            "scales": (self.out_features, self.n_groups),
            "rot_signs": (self.in_features if self.rotation_block else 0,),
            **({"bias": (self.out_features,)} if self.has_bias else {}),
            **({"outlier_idx": (self.n_outliers,), "outlier_val": (self.n_outliers,)} if self.n_outliers else {}),
        }

    def buffer_dtypes(self) -> dict[str, torch.dtype]:
        return dict(BUFFER_DTYPES)

    def storage_bytes(self) -> int:
        """Exact bytes of every stored buffer of this layer."""
        total = 0
        dt = self.buffer_dtypes()
        for name, shape in self.buffer_shapes().items():
            total += math.prod(shape) * dt[name].itemsize
        return total

    def weight_storage_bytes(self) -> int:
        """Bytes that stand for the weight (everything but the bias)."""
        return self.storage_bytes() - (2 * self.out_features if self.has_bias else 0)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_storage_bytes() / (self.in_features * self.out_features)

    def to_dict(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "subvector_dim": self.subvector_dim, "num_centroids": self.num_centroids,
                "num_codebooks": self.num_codebooks, "group_size": self.group_size,
                "has_scales": self.has_scales, "rotation_block": self.rotation_block,
                "has_bias": self.has_bias, **({"n_outliers": self.n_outliers} if self.n_outliers else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        if not isinstance(d, dict):
            raise ValueError(f"bad layer spec {d!r}: expected an object of LayerSpec fields")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"bad layer spec {d!r}: {e}") from None
