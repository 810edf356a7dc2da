"""PQEmbedding: a token embedding whose table ``[vocab, hidden]`` is product-quantized in fasq's format.

The table is stored exactly like a PQLinear weight with ``out = vocab`` rows and ``in = hidden`` columns
(docs/format.md): codes, codebooks, per-row scales, rotation signs, outliers.  A lookup decodes only the
rows it needs with the plain-PyTorch reference (from 64 ids each distinct id once), so its cost is
``O(tokens * hidden)``, never ``O(vocab * hidden)``.

When the model ties its output head to the embedding (SmolLM2, Gemma), the head is an ordinary
:class:`fasq.nn.PQLinear` (so it runs through fasq's CPU and GPU kernels) and the embedding holds no
buffers of its own: it reads the head's.  The tensors are stored once (under the head's name), and the
tie survives ``.to(device)``, copies and pickles because there is only one set of tensors.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import reference
from .format import BUFFER_DTYPES, LayerSpec
from .nn import _CACHE_PREFIX, PQLinear, set_module


# From this many ids a lookup decodes each distinct id once (torch.unique); below, every id as it comes.
_UNIQUE_FROM = 64


class PQEmbedding(nn.Module):
    """``nn.Embedding`` replacement holding (or sharing, when tied) a PQ table.

    ``embed_scale`` multiplies every looked-up row (Gemma scales its embedding by sqrt(hidden)); it comes
    from the architecture, not from the stored file.  ``tied_head``: the PQLinear whose buffers this
    embedding reads (its ``spec`` must describe the same ``[vocab, hidden]`` table).
    """

    def __init__(self, spec: LayerSpec, embed_scale: float = 1.0, padding_idx: int | None = None,
                 tied_head: PQLinear | None = None, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if spec.has_bias:
            raise ValueError(f"PQEmbedding: an embedding table has no bias, the spec says has_bias=True ({spec})")
        if tied_head is not None and tied_head.spec != spec:
            raise ValueError(f"PQEmbedding: tied head's spec {tied_head.spec} differs from the embedding's {spec}")
        self.spec = spec
        self.num_embeddings = spec.out_features
        self.embedding_dim = spec.in_features
        self.padding_idx = padding_idx
        self.embed_scale = float(embed_scale)
        # Not a submodule (it is registered where the model keeps its head) and not in state_dict:
        # the tensors are stored once, under the head's name.
        self.__dict__["tied_head"] = tied_head
        if tied_head is None:
            for name, shape in spec.buffer_shapes().items():
                self.register_buffer(name, torch.zeros(shape, dtype=BUFFER_DTYPES[name], device=device))
        # Empty, not stored: follows the model's .to(dtype), so lookups return the model's activation dtype
        # (the table's own buffers keep their stored dtypes, see _apply).
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype, device="cpu" if device == "meta" else device),
                             persistent=False)

    @classmethod
    def from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], embed_scale: float = 1.0,
                     padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> "PQEmbedding":
        m = cls(spec, embed_scale, padding_idx, device=tensors["codes"].device, dtype=dtype)
        for name, buf in m.table().items():
            t = tensors[name]
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"PQEmbedding.{name}: shape {tuple(t.shape)} does not match spec {tuple(buf.shape)}")
            buf.copy_(t.to(buf.dtype))
        return m

    # ------------------------------------------------------------------------------------------------
    def table(self) -> dict[str, torch.Tensor]:
        """The stored buffers (this module's, or the tied head's), by format name."""
        owner = self.tied_head if self.tied_head is not None else self
        return {n: owner._buffers[n] for n in self.spec.buffer_shapes()}

    def _apply(self, fn, recurse=True):
        # Keep the stored table in its dtypes under .to(dtype) (as PQLinear does); only dtype_probe follows.
        for cache in [k for k in self.__dict__ if k.startswith(_CACHE_PREFIX)]:
            del self.__dict__[cache]
        saved = {n: b.dtype for n, b in self._buffers.items() if b is not None and n != "dtype_probe"}
        super()._apply(fn, recurse)
        for n, dt in saved.items():
            if self._buffers[n].dtype != dt:
                self._buffers[n] = self._buffers[n].to(dt)
        return self

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if not k.startswith(_CACHE_PREFIX)}

    def _outlier_rows(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The outlier table by row: (column int64 [n], value [n], row_ptr int64 [vocab+1], most in one row),
        sorted by flat index (fasq writes them sorted; any order loads).  Cached until the buffers move."""
        key = (t["outlier_idx"].data_ptr(), t["outlier_idx"].device)
        cached = self.__dict__.get("_fasq_outliers")
        if cached is None or cached[0] != key:
            idx = t["outlier_idx"].long()
            order = torch.argsort(idx)
            idx = idx[order]
            rows = idx // self.spec.in_features
            counts = torch.bincount(rows, minlength=self.spec.out_features)
            row_ptr = torch.zeros(self.spec.out_features + 1, dtype=torch.long, device=idx.device)
            row_ptr[1:] = torch.cumsum(counts, 0)
            cached = (key, idx % self.spec.in_features, t["outlier_val"][order], row_ptr,
                      int(counts.max()) if counts.numel() else 0)
            self.__dict__["_fasq_outliers"] = cached
        return cached[1:]

    def rows(self, row_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The dequantized table rows ``row_ids`` [n] -> [n, hidden] (outliers included, no embed_scale).

        No host synchronization (CUDA graphs can capture it): each row's outliers are read as a fixed-width
        window of the row-sorted outlier table, masked past the row's end."""
        t = self.table()
        s = self.spec
        n = row_ids.numel()
        if n == 0:
            return torch.zeros(0, s.in_features, dtype=dtype, device=t["codes"].device)
        row_ids = row_ids.long()
        part = dataclasses.replace(s, out_features=n, n_outliers=0)
        scales = t["scales"][row_ids] if s.has_scales else t["scales"]
        w = reference.dequantize(part, t["codes"][:, row_ids], t["codebooks"], scales, t["rot_signs"], dtype)
        if s.n_outliers:
            cols, vals, row_ptr, widest = self._outlier_rows(t)
            if widest:
                pos = row_ptr[row_ids][:, None] + torch.arange(widest, device=w.device)      # [n, widest]
                live = pos < row_ptr[row_ids + 1][:, None]
                pos = torch.where(live, pos, torch.zeros_like(pos))
                add = torch.where(live, vals[pos].to(dtype), torch.zeros((), dtype=dtype, device=w.device))
                w.scatter_add_(1, cols[pos], add)          # a dead slot adds 0 to column cols[0]
        return w

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [...] -> [..., hidden].  Many ids (a prompt): each distinct id is decoded once; a few
        # (a decode step): decoded as they are, which needs no torch.unique (a host sync on CUDA).
        out_dtype = self.dtype_probe.dtype
        flat = input_ids.reshape(-1)
        if flat.device.type == "cpu" and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"PQEmbedding: token ids must lie in [0, {self.num_embeddings}), got "
                             f"{int(flat.min())}..{int(flat.max())}")
        if flat.numel() > _UNIQUE_FROM:
            uniq, inv = torch.unique(flat, return_inverse=True)
            w = self.rows(uniq, torch.float32)[inv]
        else:
            w = self.rows(flat, torch.float32)
        if self.embed_scale != 1.0:   # as the architecture's module: the scale rounded to the model's dtype
            w = w * torch.tensor(self.embed_scale, dtype=out_dtype).item()
        return w.to(out_dtype).reshape(*input_ids.shape, self.embedding_dim)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The whole table ``[vocab, hidden]`` (for tests and export; a lookup never builds it)."""
        t = self.table()
        w = reference.dequantize(self.spec, t["codes"], t["codebooks"], t["scales"], t["rot_signs"], dtype)
        return reference.add_outliers_to_weight(
            w, (t["outlier_idx"], t["outlier_val"]) if self.spec.n_outliers else None)

    def storage_bytes(self) -> int:
        """Bytes this module stores itself (0 when tied: the head holds the table)."""
        return 0 if self.tied_head is not None else self.spec.storage_bytes()

    def extra_repr(self) -> str:
        s = self.spec
        tied = ", tied to the head" if self.tied_head is not None else ""
        return (f"{s.out_features}, {s.in_features}, d={s.subvector_dim}, K={s.num_centroids}, "
                f"bits/weight={s.bits_per_weight():.3f}{tied}")


def embed_scale_of(module: nn.Module) -> float:
    """The factor a model's embedding module multiplies its rows by (Gemma: sqrt(hidden)), else 1."""
    s = getattr(module, "scalar_embed_scale", None)   # Gemma's, as a number (its tensor may be on meta)
    if s is None:
        s = getattr(module, "embed_scale", None)
    if s is None:
        return 1.0
    return float(s.float()) if torch.is_tensor(s) else float(s)


def replace_embedding(model: nn.Module, name: str, spec: LayerSpec, tied_head: str | None = None,
                      tensors: dict[str, torch.Tensor] | None = None, device=None) -> PQEmbedding:
    """Swap the ``nn.Embedding`` at ``name`` for a PQEmbedding of ``spec``: reading the PQLinear at
    ``tied_head`` (already swapped in), or holding ``tensors`` (else empty buffers on ``device``, for loading)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantized embedding {name!r} does not exist in this model architecture") from None
    if not isinstance(old, (nn.Embedding, PQEmbedding)):
        raise ValueError(f"quantized embedding {name!r} is a {type(old).__name__}, not an embedding")
    if (old.num_embeddings, old.embedding_dim) != (spec.out_features, spec.in_features):
        raise ValueError(f"embedding {name!r}: the model has a {old.num_embeddings}x{old.embedding_dim} table, the "
                         f"quantization config says {spec.out_features}x{spec.in_features}")
    scale, pad = (old.embed_scale, old.padding_idx) if isinstance(old, PQEmbedding) else \
        (embed_scale_of(old), old.padding_idx)
    dtype = old.dtype_probe.dtype if isinstance(old, PQEmbedding) else old.weight.dtype   # the model's activations
    if tied_head is not None:
        head = model.get_submodule(tied_head)
        if not isinstance(head, PQLinear):
            raise ValueError(f"embedding {name!r} is tied to {tied_head!r}, which is a {type(head).__name__}, "
                             "not a quantized linear")
        new = PQEmbedding(spec, scale, pad, tied_head=head, dtype=dtype)
    elif tensors is not None:
        new = PQEmbedding.from_tensors(spec, tensors, scale, pad, dtype=dtype)
    else:
        new = PQEmbedding(spec, scale, pad, device=device, dtype=dtype)
    set_module(model, name, new)
    untie_in_transformers(model)
    return new


def untie_in_transformers(model: nn.Module) -> None:
    """Tell transformers there is nothing to tie: ``tie_weights`` would look for ``embed_tokens.weight``,
    which a PQEmbedding has not (the tie is the PQEmbedding reading the head's buffers)."""
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
