"""FASQConfig: the frozen, versioned description of how weights are product-quantized.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, the value and what is allowed.  ``to_dict`` / ``from_dict`` give a JSON round trip that
is stored as ``quantization_config`` in a saved model's ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .families import DEFAULT_SKIP_MODULES

CONFIG_VERSION = 1
QUANT_METHOD = "fasq"

SCALE_MODES = ("rms", "absmax", "none")
SIZE_SCOPES = ("linears", "model")    # what target_bits / --bits measure: the quantized linears, or the whole model
# Fields newer than the first config version: to_dict leaves each out while it holds its default, so a model
# that does not use them stays readable by fasq versions that predate them.
_OPTIONAL_FIELDS = ("quantize_embeddings", "embedding_subvector_dim", "embedding_codebook_size", "size_scope",
                    "error_feedback", "sample_sequences")
ROTATIONS = ("none", "hadamard")
KMEANS_BACKENDS = ("auto", "faiss", "torch")
KMEANS_INITS = ("kmeans++", "random")
EQUALIZE_MODES = ("none", "norms", "balance", "full", "power", "sampled")


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class FASQConfig:
    """How to product-quantize the linear layers of a model.

    Each weight ``W[out, in]`` is (optionally) rotated along ``in`` by a randomized block
    Hadamard transform, split into groups of ``group_size`` input columns that get one fp16 scale
    per (row, group), and cut into sub-vectors of ``subvector_dim`` columns.  Each sub-vector is
    replaced by the index of its nearest centroid in a codebook of ``codebook_size`` entries,
    learned by k-means on the layer's own weights (no calibration data).  With
    ``num_codebooks > 1`` further codebooks quantize the residual of the previous ones.
    """

    subvector_dim: int = 2
    codebook_size: int = 256
    num_codebooks: int = 1
    group_size: int = 128          # input columns per scale; 0 = one scale per row
    scale_mode: str = "absmax"     # how groups are normalized before clustering (docs/experiments.md)
    rotation: str = "hadamard"     # "none" or randomized block "hadamard" along in_features
    rotation_block: int = 256      # largest Hadamard block (a power of two)
    kmeans_iters: int = 25
    kmeans_init: str = "kmeans++"
    kmeans_backend: str = "auto"   # "auto": fasq's own ("torch", C++ on CPU), faiss where that cannot build
    kmeans_max_points: int = 65536  # sub-vectors sampled to train a codebook (all are assigned)
    refine_iters: int = 2          # alternate (codes -> least-squares scales) this many times
    equalize: str = "balance"      # exact rescalings before fitting: none | norms | balance | full | power | sampled
    outlier_fraction: float = 1e-3  # largest-|w| weights kept exactly in a sparse fp16 side table (0: none)
    target_bits: float | None = None  # size target (bits/weight) for per-layer allocation when none is given
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES  # every family's head and embeddings (fasq.families)
    # Token embedding and output head (tied or not): quantized with their own (d, K) when True
    # (fasq.embedding; docs/accuracy.md measures the cost), else kept at 16 bits.
    quantize_embeddings: bool = False
    embedding_subvector_dim: int = 2
    embedding_codebook_size: int = 512
    size_scope: str = "linears"    # target_bits / target sizes in bits: of the quantized linears or the whole "model"
    # Codes chosen with GPTQ-style error feedback against each layer's input covariance, measured on text the
    # model samples itself with the layers before it quantized (fasq.fit.feedback; no data is read), and how many
    # sequences it samples for that and
    # for equalize="sampled" (fasq.fit.samples: LENGTH tokens each).
    error_feedback: bool = False
    sample_sequences: int = 8
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Accept lists from JSON for skip_modules.
        if isinstance(self.skip_modules, list):
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        ints = ("subvector_dim", "codebook_size", "num_codebooks", "group_size", "rotation_block",
                "kmeans_iters", "kmeans_max_points", "refine_iters", "seed", "version", "embedding_subvector_dim",
                "embedding_codebook_size", "sample_sequences")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"FASQConfig.{name}={v!r}: must be an integer")
        _check(self.version == CONFIG_VERSION, "version", self.version,
               f"this fasq reads config version {CONFIG_VERSION}")
        _check(1 <= self.subvector_dim <= 16, "subvector_dim", self.subvector_dim, "an integer from 1 to 16")
        _check(2 <= self.codebook_size <= 65536, "codebook_size", self.codebook_size,
               "an integer from 2 to 65536")
        _check(1 <= self.num_codebooks <= 8, "num_codebooks", self.num_codebooks, "an integer from 1 to 8")
        _check(self.group_size == 0 or (self.group_size > 0 and self.group_size % self.subvector_dim == 0),
               "group_size", self.group_size,
               f"0 (one scale per row) or a positive multiple of subvector_dim={self.subvector_dim}")
        _check(self.scale_mode in SCALE_MODES, "scale_mode", self.scale_mode, f"one of {SCALE_MODES}")
        _check(self.rotation in ROTATIONS, "rotation", self.rotation, f"one of {ROTATIONS}")
        _check(_is_pow2(self.rotation_block) and self.rotation_block <= 4096, "rotation_block",
               self.rotation_block, "a power of two from 1 to 4096")
        _check(1 <= self.kmeans_iters <= 1000, "kmeans_iters", self.kmeans_iters, "an integer from 1 to 1000")
        _check(self.kmeans_init in KMEANS_INITS, "kmeans_init", self.kmeans_init, f"one of {KMEANS_INITS}")
        _check(self.kmeans_backend in KMEANS_BACKENDS, "kmeans_backend", self.kmeans_backend,
               f"one of {KMEANS_BACKENDS}")
        _check(self.kmeans_max_points >= 1024, "kmeans_max_points", self.kmeans_max_points, "at least 1024")
        _check(0 <= self.refine_iters <= 20, "refine_iters", self.refine_iters, "an integer from 0 to 20")
        _check(self.equalize in EQUALIZE_MODES, "equalize", self.equalize, f"one of {EQUALIZE_MODES}")
        for name in ("outlier_fraction", "target_bits"):  # JSON and users may give whole numbers
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        _check(isinstance(self.outlier_fraction, float) and 0.0 <= self.outlier_fraction <= 0.01,
               "outlier_fraction", self.outlier_fraction, "a number from 0 to 0.01 (a fraction of each layer's weights)")
        _check(self.target_bits is None or (isinstance(self.target_bits, float) and 1.0 <= self.target_bits <= 32.0),
               "target_bits", self.target_bits, "None or a number of bits per weight from 1 to 32")
        _check(self.seed >= 0, "seed", self.seed, "a non-negative integer")
        _check(isinstance(self.quantize_embeddings, bool), "quantize_embeddings", self.quantize_embeddings,
               "true or false")
        _check(1 <= self.embedding_subvector_dim <= 16, "embedding_subvector_dim", self.embedding_subvector_dim,
               "an integer from 1 to 16")
        _check(self.group_size == 0 or self.group_size % self.embedding_subvector_dim == 0, "embedding_subvector_dim",
               self.embedding_subvector_dim, f"a divisor of group_size={self.group_size}")
        _check(2 <= self.embedding_codebook_size <= 65536, "embedding_codebook_size", self.embedding_codebook_size,
               "an integer from 2 to 65536")
        _check(isinstance(self.error_feedback, bool), "error_feedback", self.error_feedback, "true or false")
        _check(1 <= self.sample_sequences <= 1024, "sample_sequences", self.sample_sequences,
               "an integer from 1 to 1024")
        _check(self.size_scope in SIZE_SCOPES, "size_scope", self.size_scope, f"one of {SIZE_SCOPES}")
        _check(all(isinstance(s, str) and s for s in self.skip_modules), "skip_modules", self.skip_modules,
               "a tuple of non-empty module-name patterns")

    # ----------------------------------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        """Bits stored per code: ceil(log2 K)."""
        return max(1, (self.codebook_size - 1).bit_length())

    @property
    def nominal_bits_per_weight(self) -> float:
        """Code bits per weight plus fp16 scales; ignores codebooks (use storage accounting for exact)."""
        b = self.num_codebooks * self.code_bits / self.subvector_dim
        if self.scale_mode != "none" and self.group_size:
            b += 16.0 / self.group_size
        return b + 48.0 * self.outlier_fraction

    def embedding_config(self) -> "FASQConfig":
        """The settings the token embedding and the output head are quantized with: this config's
        scales, rotation and outliers at (embedding_subvector_dim, embedding_codebook_size), one codebook,
        no size target (the planner never moves them)."""
        return self.replace(subvector_dim=self.embedding_subvector_dim, codebook_size=self.embedding_codebook_size,
                            num_codebooks=1, target_bits=None)

    def replace(self, **changes: Any) -> "FASQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        d["quant_method"] = QUANT_METHOD
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _OPTIONAL_FIELDS:
            if d[name] == defaults[name]:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FASQConfig":
        if not isinstance(data, dict):
            raise ValueError(f"FASQConfig.from_dict: expected a dict, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method={method!r}: fasq reads only {QUANT_METHOD!r} configs")
        data.pop("modules", None)     # per-module settings live beside the config, see io.py
        data.pop("allocation", None)  # the size target that chose them, when one was given
        data.pop("embeddings", None)  # quantized embedding tables, see io.py
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"FASQConfig.from_dict: unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**data)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"FASQConfig.{name}={value!r} is invalid: allowed is {allowed}")


# Named operating points; issue-4 experiments decide which settings these hold (docs/experiments.md).
# "4bit" and "3bit" are size targets, the sizes of GPTQ/AWQ 4- and 3-bit with groups of 128: the
# planner (fasq.fit.allocate) gives the richer K to the layer types most sensitive first.  Scales per
# 256 columns beat scales per 128 at both sizes (docs/experiments.md rows 25 and 29): the bits they free
# buy richer-K layers.  At 3 bits, Hadamard blocks of 64 columns (down_proj's 1536 columns otherwise get
# blocks of 256) gave lower perplexity over 8 seeds (docs/experiments.md row 37); the planner's extra
# steps for v_proj (the Llama family's extra_steps in fasq.families, rows 46-47) give it K=512 there.
# Both weigh each input column of q/k/v, gate/up and down_proj by its activation power, measured on text the
# model samples itself (equalize="sampled", no data read; the eleventh round of docs/experiments.md: 6-8% lower
# perplexity than the weights-only estimate of equalize="power", rows 55-62, on SmolLM2 at 4 bits and 23-26% at
# 3 bits, 0-1% / 7% on Gemma-3-270M, where that estimate was already good), and store the token embedding and the (tied)
# head as an 8-bit table (d=1, K=256: +0.02-0.05% perplexity, rows in the sixth round; the head is the layer
# whose error costs the most), so the whole model, not only its linears, is compressed.
_TABLE8 = dict(quantize_embeddings=True, embedding_subvector_dim=1, embedding_codebook_size=256)
# Both also choose their codes with error feedback (GPTQ's update over sub-vectors) against each layer's input
# covariance, measured on the same sampled text, 32 sequences of it (fasq.fit.feedback; the twelfth round of
# docs/experiments.md: with 8 sequences the update fits the samples more than text in general).  At 3 bits 128
# sequences (the fourteenth round: 64 gave lower perplexity than 32 on both models; the seventeenth round: 128 lower
# again, at about 1.6 times the quantize time).
_SAMPLED = dict(equalize="sampled", error_feedback=True, sample_sequences=32)
PRESETS: dict[str, dict[str, Any]] = {
    "4bit": dict(subvector_dim=2, codebook_size=256, group_size=256, target_bits=4.25, **_SAMPLED, **_TABLE8),
    "3bit": dict(subvector_dim=2, codebook_size=64, group_size=256, target_bits=3.25, rotation_block=64,
                 **{**_SAMPLED, "sample_sequences": 128}, **_TABLE8),
    "2bit": dict(subvector_dim=4, codebook_size=256, group_size=128),
    "8bit": dict(subvector_dim=1, codebook_size=256, group_size=128),
}


def preset(name: str, **overrides: Any) -> FASQConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: allowed are {sorted(PRESETS)}")
    return FASQConfig(**{**PRESETS[name], **overrides})
