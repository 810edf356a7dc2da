"""What a sweep runs: one :class:`Point` per (method, settings), the default grid and baselines.

The default fasq grid and the default baselines are defined here, once.  A point's ``key`` names its
cached result file, so two points with the same method and settings are the same run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# fasq settings are FASQConfig fields on top of FASQConfig's defaults (or of a preset, with "preset").
# Nominal bits/weight with the default group_size=128 scales: code_bits/d + 16/128 (+ codebooks).
DEFAULT_FASQ_GRID: tuple[dict[str, Any], ...] = (
    {"subvector_dim": 1, "codebook_size": 256},    # ~8.1 bits/weight
    {"subvector_dim": 1, "codebook_size": 64},     # ~6.1
    {"subvector_dim": 2, "codebook_size": 1024},   # ~5.1
    {"subvector_dim": 1, "codebook_size": 16},     # ~4.1 (scalar, non-uniform levels)
    {"subvector_dim": 2, "codebook_size": 256},    # ~4.1
    {"subvector_dim": 3, "codebook_size": 1024, "group_size": 96},   # ~3.5 (groups: a multiple of d)
    {"subvector_dim": 2, "codebook_size": 64},     # ~3.1
    {"preset": "4bit"},                            # 4.25: per-layer K=256/512 (fasq.fit.allocate)
    {"preset": "3bit"},                            # 3.25: per-layer K=64/128
    {"subvector_dim": 2, "codebook_size": 16, "target_bits": 2.25},  # 2.25: per-layer K=16/32
    {"subvector_dim": 4, "codebook_size": 256},    # ~2.1
)

# Baselines through their own libraries (RTN is ours: the floor).  g128 is the standard group size (and
# what equal-size comparisons need); HQQ also runs at its own default group of 64 (4-bit and 2-bit).  AWQ
# (GPTQModel's) needs in_features % group == 0: SmolLM2's 576 fails for 128, so AWQ also runs at 64 there;
# Gemma-3-270M's widths (640, 1024, 2048) take 128 (docs/accuracy.md).
DEFAULT_BASELINES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("rtn", {"bits": 4, "group_size": 128}),
    ("rtn", {"bits": 3, "group_size": 128}),
    ("gptq", {"bits": 4, "group_size": 128}),
    ("gptq", {"bits": 3, "group_size": 128}),
    ("awq", {"bits": 4, "group_size": 128}),
    ("awq", {"bits": 4, "group_size": 64}),
    ("awq", {"bits": 3, "group_size": 128}),
    # llm-compressor's AWQ (its own venv: it pins transformers <= 5.17; see runner.python_for)
    ("awq", {"bits": 4, "group_size": 128, "library": "llm-compressor"}),
    ("awq", {"bits": 4, "group_size": 64, "library": "llm-compressor"}),
    ("awq", {"bits": 3, "group_size": 128, "library": "llm-compressor"}),
    ("hqq", {"bits": 4, "group_size": 128}),
    ("hqq", {"bits": 3, "group_size": 128}),
    ("hqq", {"bits": 4, "group_size": 64}),
    ("hqq", {"bits": 2, "group_size": 64}),
    ("nf4", {"blocksize": 64, "double_quant": True}),
    # llama.cpp's GGUF types without an importance matrix, scored by llama.cpp itself (llamacpp_eval.py);
    # the worker needs llama_cpp (the baselines venv).
    *(("llamacpp", {"type": t}) for t in ("Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_S", "IQ3_XXS")),
)

METHOD_ORDER = ("original", "fasq", "gptq", "awq", "hqq", "nf4", "llamacpp", "rtn")

# Short aliases accepted in ``key=value`` fasq settings.
FASQ_ALIASES = {"d": "subvector_dim", "k": "codebook_size", "K": "codebook_size", "m": "num_codebooks",
                "M": "num_codebooks", "g": "group_size", "group": "group_size"}


@dataclass(frozen=True)
class Point:
    """One operating point: a method and its settings (JSON-able)."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHOD_ORDER:
            raise ValueError(f"method={self.method!r} is unknown: allowed are {list(METHOD_ORDER)}")

    @property
    def key(self) -> str:
        """File-name-safe id, e.g. ``fasq-codebook_size256-subvector_dim2`` or ``gptq-bits4-group_size128``."""
        parts = [self.method] + [f"{k}{_slug(v)}" for k, v in sorted(self.settings.items())]
        return "-".join(parts)

    @property
    def label(self) -> str:
        """Short human label for tables and plots."""
        s = self.settings
        if self.method == "fasq" and "preset" in s:
            rest = {k: v for k, v in s.items() if k != "preset"}
            return f"preset {s['preset']}" + "".join(f" {k}={v}" for k, v in sorted(rest.items()))
        if self.method == "fasq":
            extra = {k: v for k, v in s.items() if k not in ("subvector_dim", "codebook_size")}
            base = f"d={s.get('subvector_dim', '?')} K={s.get('codebook_size', '?')}"
            return base + ("".join(f" {k}={v}" for k, v in sorted(extra.items())) if extra else "")
        if self.method == "llamacpp" and "type" in s:
            return str(s["type"])
        if self.method == "nf4":
            return f"blocks of {s.get('blocksize', 64)}" + (", double quant" if s.get("double_quant") else "")
        if "bits" in s:
            lib = f" ({s['library']})" if "library" in s else ""
            return f"{s['bits']}-bit g{s.get('group_size', '?')}{lib}"
        return json.dumps(s, sort_keys=True) if s else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "settings": dict(self.settings), "key": self.key, "label": self.label}


def _slug(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(v)).strip("_") or "x"


def parse_setting(text: str) -> dict[str, Any]:
    """A fasq grid entry from ``'{"subvector_dim": 2, "codebook_size": 256}'`` or ``'d=2,K=256'``.

    Values are read as JSON when they parse (numbers, true/false) and as strings otherwise.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"fasq setting {text!r}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"fasq setting {text!r}: expected a JSON object")
        return {FASQ_ALIASES.get(k, k): v for k, v in d.items()}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"fasq setting {text!r}: {part!r} is not key=value (e.g. 'd=2,K=256')")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            val: Any = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out[FASQ_ALIASES.get(k, k)] = val
    if not out:
        raise ValueError(f"fasq setting {text!r} is empty")
    return out


def fasq_config(settings: dict[str, Any]):
    """The FASQConfig a fasq point stands for (validates the settings; ``distill_steps`` and ``distill_sequences``:
    see :func:`distill_steps`)."""
    from ..config import FASQConfig, preset

    s = dict(settings)
    distill_steps(s)
    s.pop("distill_steps", None)
    s.pop("distill_sequences", None)
    name = s.pop("preset", None)
    return preset(name, **s) if name else FASQConfig(**s)


def distill_steps(settings: dict[str, Any]) -> int:
    """A fasq point's ``distill_steps`` (0 where it names none): after quantizing, :func:`fasq.distill.distill` runs
    this many steps (``fasq quantize --distill-steps``)."""
    n = settings.get("distill_steps", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"distill_steps={n!r}: must be an integer >= 0")
    m = settings.get("distill_sequences")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"distill_sequences={m!r}: must be an integer >= 1")
    if m is not None and not n:
        raise ValueError(f"distill_sequences={m} without distill_steps: nothing would be distilled")
    return n


def distill_sequences(settings: dict[str, Any]) -> int | None:
    """A fasq point's ``distill_sequences``: how many sequences the distillation samples (``fasq quantize
    --distill-sequences``); None: the library's default (:class:`fasq.distill.DistillSettings`)."""
    distill_steps(settings)
    return settings.get("distill_sequences")


def default_points(methods: tuple[str, ...] | None = None,
                   fasq_grid: tuple[dict[str, Any], ...] | None = None) -> list[Point]:
    """The default plan (original, fasq grid, baselines), filtered to ``methods`` when given."""
    grid = DEFAULT_FASQ_GRID if fasq_grid is None else fasq_grid
    pts = [Point("original")] + [Point("fasq", dict(s)) for s in grid]
    pts += [Point(m, dict(s)) for m, s in DEFAULT_BASELINES]
    if methods:
        unknown = sorted(set(methods) - set(METHOD_ORDER))
        if unknown:
            raise ValueError(f"methods {unknown} are unknown: allowed are {list(METHOD_ORDER)}")
        pts = [p for p in pts if p.method in methods]
    return pts
