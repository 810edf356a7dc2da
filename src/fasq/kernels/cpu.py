"""CPU kernels for PQLinear: a C++ op built on first use, four methods, registry entries.

Importing this module compiles nothing; it registers four kernels with :mod:`fasq.kernels`
(the registry imports it the first time a layer runs on the CPU).  The first ``supports()`` call
builds ``pq_cpu.cpp`` (and the ``pq_cpu/*.h`` it includes) with ``torch.utils.cpp_extension``
(``-O3 -march=native -fopenmp``) into ``~/.cache/fasq/cpu_kernels/<hash>/`` (``$FASQ_CACHE`` or, for
builds alone, ``$FASQ_CACHE_DIR`` overrides ``~/.cache/fasq``; :mod:`fasq.native`), once per machine,
source and torch version.  When no compiler works, one warning is logged and every kernel here
declines, so the plain-PyTorch reference serves.

==============  ========  ======================================================================
name            priority  used for
==============  ========  ======================================================================
``cpu_lut``     30        1 token, >= lut_min_rows() rows, K <= 512, AVX-512 VBMI: int16 tables
                          x.codebook (2 / 3 tokens from 512 / 1536 rows with the fp16 build)
``cpu_perm``    25        up to PERM_MAX_TOKENS tokens, K <= 512, AVX-512 VBMI: exact, codebook in
                          registers, looked up by byte permutes for 64 rows at a time (from 5
                          tokens once per row block and group into an L1 buffer, then FMAs)
``cpu_direct``  20        up to DIRECT_MAX_TOKENS tokens where PERM cannot run (K > 512, no VBMI):
                          gather centroids, fp32 FMA
``cpu_tiled``   10        any token count: dequantize row tiles, then ATen GEMM (K <= 512 with
                          VBMI: PERM's byte-permute lookups, ~0.1-0.2 ns per weight; else gathers)
==============  ========  ======================================================================

All four are one op, ``torch.ops.fasq.cpu_pq_linear`` (CPU kernel + fake implementation).
Per-layer preparation (fp32 codebook copies; for ``cpu_lut`` / ``cpu_perm`` the codes repacked
one byte per code with 64 rows side by side, scales in the same order, codebook byte planes)
happens on a layer's first call and is cached on the module, keyed by the buffers' versions.
``$FASQ_CPU_ISA`` (avx2, scalar) caps the instruction set used.  See docs/kernels_cpu.md.

Fast path: when the registry runs one of these kernels for a layer and up to FEW_MAX_TOKENS tokens,
:func:`install_plan` leaves a per-layer ``Plan`` (C++, built into the same library) on the module;
``PQLinear.forward`` calls it first, and it computes the whole call (rotation, kernel, bias, outlier
correction) in one C++ call, or returns None when anything it depends on changed (input kind,
buffers, registry, ``$FASQ_DISABLE_KERNELS``), and the registry path runs (and rebuilds it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.modules.module as module_py  # where nn.Module keeps its global hooks

from ..format import LayerSpec, unpack_codes
from ..native import build_first_that_works
from . import Kernel, _disabled, outlier_cache, outlier_csr, register

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pq_cpu.cpp")             # the op registration; it includes ...
HEADERS = tuple(sorted(Path(__file__).with_name("pq_cpu").glob("*.h")))  # ... these (part of the build key)
# Method choice, from measurements (docs/kernels_cpu.md): LUT for 1 token on layers of at least
# LUT_MIN_ROWS rows (its per-call table build needs enough rows to pay off; LUT_MIN_ROWS_FP16 where
# the tables are built in fp16 arithmetic, about 3x cheaper), PERM up to PERM_MAX_TOKENS tokens (DIRECT
# up to DIRECT_MAX_TOKENS where PERM cannot run), TILED above.
LUT_MIN_ROWS = 256
LUT_MIN_ROWS_FP16 = 128
# With the fp16 table build, 2 and 3 tokens go to the LUT too on layers of at least this many rows
# (each token builds its own tables, so the LUT needs more rows per table than at 1 token; measured
# against PERM, docs/kernels_cpu.md); without it, 1 token only.
LUT_MULTI_MIN_ROWS_FP16 = {2: 512, 3: 1536}
PERM_MAX_TOKENS = 16     # PERM (from 5 tokens by blocks: perm_blocks in pq_cpu/scan_kernels.h); TILED above
DIRECT_MAX_TOKENS = 8    # DIRECT: slower than TILED at 16 tokens on every benchmarked shape
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METHODS = ("lut", "perm", "direct", "tiled")
POISON = False           # tests: the op NaN-fills its output and scratch before computing

# Shared with the C++ library, which exports its own values (``constants()`` in pq_cpu.cpp): they
# are checked against these when it loads (_check_constants) and by tests/test_kernels_cpu_constants.py.
# Python keeps them as plain constants because the registry and the tests read them before any build.
FEW_MAX_TOKENS = 16      # the per-layer Plan's most tokens ("plan_tokens": kPlanTokens in pq_cpu/plan.h)
ROWS_PER_BLOCK = 64      # rows per block of the repacked (LUT / PERM) layout ("rows_per_block": RB)
# The op's int[] meta, field by field in order ("meta_fields": FASQ_META_FIELDS in pq_cpu/common.h)
META_FIELDS = ("in_features", "out_features", "subvector_dim", "num_centroids", "num_codebooks", "bits", "n_sub",
               "group_subvectors", "n_groups", "rotation_block", "mode", "isa", "padded_dim", "table_size",
               "words_per_row", "poison")
_MODE = {"direct": 0, "lut": 1, "tiled": 2, "perm": 3}                 # "modes": enum Mode
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}                           # "isas": enum Isa
_FEATURE = {"avx2": 1, "avx512": 2, "vbmi": 4, "openmp": 8, "fp16_lut": 16}  # "features": enum Feature
_DTYPE_INDEX = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # "plan_dtypes": Plan::set_method
_FEAT_AVX2, _FEAT_AVX512, _FEAT_VBMI, _FEAT_FP16_LUT = (_FEATURE[f] for f in ("avx2", "avx512", "vbmi", "fp16_lut"))
_META_OUT = META_FIELDS.index("out_features")


def python_constants() -> dict:
    """This module's side of what the C++ library's ``constants()`` exports (same keys)."""
    return {"rows_per_block": ROWS_PER_BLOCK, "plan_tokens": FEW_MAX_TOKENS, "meta_fields": list(META_FIELDS),
            "modes": dict(_MODE), "isas": dict(ISAS), "features": dict(_FEATURE),
            "plan_dtypes": tuple(str(dt).removeprefix("torch.") for dt in _DTYPE_INDEX)}


def _check_constants(lib) -> None:
    ours, theirs = python_constants(), dict(lib.constants())
    bad = [f"{k}: cpu.py {ours.get(k)!r}, pq_cpu {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
           if ours.get(k) != theirs.get(k)]
    if bad:
        raise RuntimeError("fasq: cpu.py and the C++ CPU kernel disagree: " + "; ".join(bad))


# ----------------------------------------------------------------------------------------------
# Build and load (once per process; the compiled library is cached on disk once per machine).
_features: int | None = None
_lib = None  # the built library as a Python module (its Plan class serves PQLinear.forward's fast path)


def features() -> int:
    """Bit mask of what the loaded library was compiled with (1 AVX2, 2 AVX-512, 4 VBMI, 8 OpenMP,
    16 fp16 LUT build);
    -1 when no library could be built (then every kernel here declines).  Builds on the first call."""
    global _features
    if _features is None:
        _features = _build_or_fail()
    return _features


def _build_or_fail() -> int:
    global _lib
    try:
        label, lib, failed = build_first_that_works(SOURCE, "fasq_pq_cpu", "cpu_kernels", HEADERS)
    except RuntimeError as e:
        log.warning("fasq: could not build the CPU kernel (%s); PQLinear on CPU falls back to the slow "
                    "plain-PyTorch reference. Compiler output is logged at DEBUG level by fasq.native.", e)
        return -1
    if label != "native":
        log.warning("fasq: CPU kernel built without -march=native/OpenMP (%s); it will be slower", failed)
    _check_constants(lib)
    _lib = lib
    lib.set_module_call_fields(module_call_fields())
    torch.library.register_fake("fasq::cpu_pq_linear")(_fake_cpu_pq_linear)
    torch.library.register_fake("fasq::cpu_dense16_linear")(_fake_cpu_dense16_linear)
    return int(torch.ops.fasq.cpu_features())


def available() -> bool:
    """True when the C++ kernel is (or can be) built and loaded; builds it on the first call."""
    return features() >= 0


def _fake_cpu_pq_linear(x, codes, tables, scales, rot_signs, bias, meta, orowptr=None, ocols=None, ovals=None):
    return x.new_empty((*x.shape[:-1], meta[_META_OUT]))


def _fake_cpu_dense16_linear(x, weight, bias, isa, poison):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ----------------------------------------------------------------------------------------------
# Which layers and inputs the kernel takes, and the per-layer preparation.
def _padded_dim(d: int) -> int:
    return 1 << (d - 1).bit_length()


_spec_ok: dict[LayerSpec, bool] = {}


def spec_supported(spec: LayerSpec) -> bool:
    """Layers outside these limits go to the reference."""
    ok = _spec_ok.get(spec)
    if ok is None:
        rb = spec.rotation_block
        ok = _spec_ok[spec] = bool(
            1 <= spec.subvector_dim <= 16 and 1 <= spec.bits <= 16 and 1 <= spec.num_codebooks <= 8
            and (not spec.has_scales or spec.effective_group % spec.subvector_dim == 0)
            and (rb == 0 or (rb & (rb - 1) == 0 and spec.in_features % rb == 0)))
    return ok


_isa: str | None = None


def default_isa() -> str:
    """The best ISA path compiled in, lowered by ``$FASQ_CPU_ISA`` (avx512, avx2, scalar) if set."""
    global _isa
    if _isa is None:
        feats = max(features(), 0)
        best = "avx512" if feats & _FEAT_AVX512 else "avx2" if feats & _FEAT_AVX2 else "scalar"
        env = os.environ.get("FASQ_CPU_ISA", "").lower()
        _isa = env if env in ISAS and ISAS[env] < ISAS[best] else best
    return _isa


def lut_supported(spec: LayerSpec, isa: str | None = None) -> bool:
    """Whether the LUT and PERM methods can run this layer (K <= 512 and AVX-512 VBMI)."""
    isa = isa or default_isa()
    return spec.bits <= 9 and ISAS[isa] >= ISAS["avx512"] and features() >= 0 and bool(features() & _FEAT_VBMI)


@dataclass
class _Prepared:
    bufs: tuple                                   # the buffers it was made from (by identity) ...
    versions: list                                # ... and [(buffer, version)] of those that have one
    tables: torch.Tensor                          # fp32 [M, K, dp] codebooks for direct / tiled
    lut: tuple | None = None                      # (codes [n_rb, M, cstride] u8, cb_transposed [M, d+1, entries],
                                                  #  scales [n_rb, G, 64], planes [M, d, 2, entries] u8)
    args: dict = field(default_factory=dict)      # (method, isa, poison) -> the op's arguments after x


def _prepare(layer) -> _Prepared:
    b = layer._buffers
    bufs = (b["codes"], b["codebooks"], b["scales"], b["rot_signs"], b.get("bias"))
    p = layer.__dict__.get("_fasq_cpu")
    # Runs on every call, so only cheap checks: the same buffer objects, none changed in place.
    if p is not None and all(t is r for t, r in zip(bufs, p.bufs)) and (
            torch.compiler.is_compiling() or all(t._version == v for t, v in p.versions)):
        return p   # (torch.compile cannot read version counters: a compiled call takes the eager call's tables)
    spec = layer.spec
    d, dp = spec.subvector_dim, _padded_dim(spec.subvector_dim)
    cb = layer.codebooks.detach().float()                                      # [M, K, d]
    tables = torch.nn.functional.pad(cb, (0, dp - d)).contiguous()             # [M, K, dp]
    # Inference tensors have no version counter (asking raises) and cannot change in place.
    versions = [(t, t._version) for t in bufs if t is not None and not t.is_inference()]
    p = _Prepared(bufs, versions, tables)
    layer.__dict__["_fasq_cpu"] = p
    return p


# Table planes (LUT and PERM) hold, in each block of 64 bytes, entry 64b + i at byte 2i and entry
# 64b + 32 + i at byte 2i + 1 (the order store_planes in pq_cpu/scan_tables.h writes without byte
# permutes); the repacked codes hold each code's byte position.
_P = torch.arange(512)
PLANE_ORDER = (_P & ~63) | ((_P & 63) // 2 + 32 * (_P & 1))                   # byte position -> entry
_PLANE_POSITION = torch.empty(512, dtype=torch.int16)
_PLANE_POSITION[PLANE_ORDER] = _P.to(torch.int16)                               # entry -> byte position
del _P


def table_size(spec: LayerSpec) -> int:
    """The entries of a LUT / PERM table plane: the least of 64, 128, 256 and 512 that holds K."""
    return 64 if spec.bits <= 6 else 128 if spec.bits == 7 else 256 if spec.bits == 8 else 512


def _lut_tensors(layer, p: _Prepared) -> tuple:
    """Repack for the LUT and PERM methods (once per layer): one byte per code, 64 rows side by side;
    with 9-bit codes, the ninth bits follow each (row block, codebook) as one 64-bit mask per position."""
    if p.lut is None:
        spec = layer.spec
        m_books, out, n_sub = spec.num_codebooks, spec.out_features, spec.n_sub
        rb = ROWS_PER_BLOCK
        n_rb = -(-out // rb)
        table_entries = table_size(spec)
        codes = torch.zeros(n_rb * rb, m_books, n_sub, dtype=torch.int16)
        step = max(rb, (1 << 22) // max(1, m_books * n_sub) // rb * rb)         # bound the int64 temp
        for r0 in range(0, out, step):
            r1 = min(out, r0 + step)
            idx = unpack_codes(layer.codes[:, r0:r1], spec.bits, n_sub)          # [M, rows, n_sub]
            codes[r0:r1] = _PLANE_POSITION[idx].permute(1, 0, 2)                # code -> its table byte position
        # Byte lane 2i of a row block holds row i and lane 2i + 1 row 32 + i: the kernel takes the even
        # and odd bytes of a looked-up table plane as 16-bit words (see odd_bytes in pq_cpu/scan_lookup.h).
        lanes = torch.arange(rb)
        order = lanes // 2 + (rb // 2) * (lanes % 2)
        codes = codes.view(n_rb, rb, m_books, n_sub).permute(0, 2, 3, 1)[..., order]  # [n_rb, M, n_sub, 64]
        low = (codes & 0xFF).to(torch.uint8).reshape(n_rb, m_books, n_sub * rb)
        if table_entries == 512:  # bit i of a position's 64-bit mask (little-endian): byte lane i's ninth bit
            ninth = (codes >> 8).to(torch.uint8).reshape(n_rb, m_books, n_sub, 8, 8)
            bits = (ninth << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)  # [n_rb, M, n_sub, 8]
            codes = torch.cat([low, bits.reshape(n_rb, m_books, n_sub * 8)], -1).contiguous()
        else:
            codes = low.contiguous()
        pad = torch.nn.functional.pad
        cb_transposed = layer.codebooks.detach().float().permute(0, 2, 1)                  # [M, d, K]
        cmax = pad(cb_transposed.abs().amax(-1), (0, table_entries - spec.subvector_dim))  # [M, table_entries]
        cb_transposed = pad(cb_transposed, (0, table_entries - spec.num_centroids))
        # [M, d + 1, table_entries]; row d: max |cb| per coordinate
        cb_transposed = torch.cat([cb_transposed, cmax[:, None]], 1).contiguous()
        books = layer.codebooks.detach().half().contiguous().view(torch.int16).int()  # [M, K, d] fp16 bits
        planes = torch.stack([books & 0xFF, (books >> 8) & 0xFF], -1).permute(0, 2, 3, 1)  # [M, d, 2, K]
        planes = pad(planes, (0, table_entries - spec.num_centroids))[..., PLANE_ORDER[:table_entries]]
        planes = planes.to(torch.uint8).contiguous()
        if spec.has_scales:
            s = torch.nn.functional.pad(layer.scales.detach().half(), (0, 0, 0, n_rb * rb - out))
            scales = s.view(n_rb, rb, spec.n_groups).permute(0, 2, 1).contiguous()  # [n_rb, G, 64]
        else:
            scales = torch.zeros(0, dtype=torch.float16)
        p.lut = (codes, cb_transposed, scales, planes)
    return p.lut


def _meta(spec: LayerSpec, method: str, isa: str) -> list[int]:
    """The op's int[] meta for a layer: :data:`META_FIELDS` in order."""
    d = spec.subvector_dim
    fields = dict(in_features=spec.in_features, out_features=spec.out_features, subvector_dim=d,
                  num_centroids=spec.num_centroids, num_codebooks=spec.num_codebooks, bits=spec.bits,
                  n_sub=spec.n_sub, group_subvectors=spec.effective_group // d if spec.has_scales else spec.n_sub,
                  n_groups=spec.n_groups, rotation_block=spec.rotation_block, mode=_MODE[method], isa=ISAS[isa],
                  padded_dim=_padded_dim(d), table_size=table_size(spec), words_per_row=spec.words_per_row,
                  poison=int(POISON))
    return [fields[name] for name in META_FIELDS]


def cpu_linear(x: torch.Tensor, layer, method: str, isa: str | None = None, outliers: bool = False) -> torch.Tensor:
    """y = x W^T + b for a PQLinear ``layer`` by one of :data:`METHODS`; x on CPU.

    ``outliers``: y includes the layer's sparse outlier correction (TILED folds it into its tiles of
    W_r, the other methods add it to y); without, y is the product-quantized part alone.
    The registry calls this through the kernels below; tests and benchmarks call it directly.
    """
    p = _prepare(layer)
    isa = isa or default_isa()
    mk = (method, isa, POISON)
    args = p.args.get(mk)
    if args is None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}: allowed are {METHODS}")
        if method in ("lut", "perm") and not lut_supported(layer.spec, isa):
            raise ValueError(f"method={method!r} needs K <= 512 and AVX-512 VBMI (layer {layer.spec}, isa {isa})")
        b = layer._buffers
        if method == "lut":
            codes, tables, scales, _ = _lut_tensors(layer, p)
        elif method == "perm" or (method == "tiled" and lut_supported(layer.spec, isa)):
            # TILED on the repacked layout dequantizes by byte permutes (pq_cpu/tiled.h: run_tiled_repacked)
            codes, _, scales, tables = _lut_tensors(layer, p)
        else:
            codes, tables, scales = b["codes"], p.tables, b["scales"]
        args = p.args[mk] = (codes, tables, scales, b["rot_signs"], b.get("bias"), _meta(layer.spec, method, isa))
    if outliers and layer.spec.n_outliers:
        return torch.ops.fasq.cpu_pq_linear(x, *args, *_cpu_outlier_csr(layer))
    return torch.ops.fasq.cpu_pq_linear(x, *args)


# ----------------------------------------------------------------------------------------------
# PQLinear.forward's fast path: a per-layer Plan (C++, pq_cpu/plan.h) that runs the whole call.
def module_call_fields() -> dict:
    """The private parts of ``torch.nn.Module`` that the Plan reads, named here and nowhere else.

    ``PQLinear.__call__`` lets ``Plan.call`` stand in for ``nn.Module.__call__`` only when that would
    call ``forward`` straight away: ``nn.Module._call_impl`` does so when the module has no hooks
    (``instance_hooks``: dicts in the module's ``__dict__``) and none are registered globally
    (``global_hooks``: dicts in ``torch.nn.modules.module``'s namespace, ``globals``), and
    ``_wrapped_call_impl`` when ``module.compile()`` has not set ``compiled``; ``forward`` in the
    instance ``__dict__`` means forward was replaced on the instance (accelerate's hooks).  Any of them
    non-empty (or missing: a torch that renamed it) makes the Plan step aside.  ``buffers``: where the
    Plan finds the layer's buffers.  The library gets these once, when it loads.
    """
    return {"globals": vars(module_py), "compiled": "_compiled_call_impl", "forward": "forward",
            "buffers": "_buffers",
            "instance_hooks": ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"],
            "global_hooks": ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                             "_global_backward_pre_hooks"]}




def _make_plan(layer, generation: int):
    spec, b = layer.spec, layer._buffers
    p = _prepare(layer)
    isa = default_isa()
    lut = _lut_tensors(layer, p) if lut_supported(spec, isa) else (None,) * 4
    outliers = (None,) * 3
    watched = [t for t in p.bufs if t is not None]
    if spec.n_outliers:   # the same operands (one copy) as cpu_linear's, _cpu_outlier_csr
        outliers = _cpu_outlier_csr(layer)
        watched += [b["outlier_idx"], b["outlier_val"]]
    watched = [t for t in watched if not t.is_inference()]  # inference tensors have no version counter
    return _lib.Plan(b["codes"], p.tables, b["scales"], b["rot_signs"], b.get("bias"), lut[0], lut[1], lut[2], lut[3],
                     *outliers, _meta(spec, "direct", isa), dict(b), watched, generation)


def install_plan(layer, x: torch.Tensor, method: str) -> None:
    """The registry chose ``method`` for (layer, x): let the layer's Plan serve such calls from now on
    (``PQLinear.forward`` tries it first).  Up to FEW_MAX_TOKENS tokens; larger calls are long enough
    that the registry's Python costs nothing in comparison."""
    from . import _generation

    t = _tokens(x)
    if _lib is None or not 1 <= t <= FEW_MAX_TOKENS or x.dtype not in _DTYPE_INDEX or x.device.type != "cpu":
        return
    d = layer.__dict__
    plan = d.get("_fasq_plan")
    if plan is None or d.get("_fasq_plan_poison") != POISON or not plan.valid(layer._buffers, _generation):
        plan = d["_fasq_plan"] = _make_plan(layer, _generation)
        d["_fasq_plan_poison"] = POISON
    plan.set_method(_DTYPE_INDEX[x.dtype], t, _MODE[method])


# ----------------------------------------------------------------------------------------------
# Registry entries.  supports() runs on every forward call: the per-layer facts are cached.
def _caps(layer) -> tuple:
    """(spec, kernel can run it, LUT/PERM can run it, most tokens that go to the LUT (0: none)),
    cached on the layer."""
    c = layer.__dict__.get("_fasq_cpu_caps")
    spec = layer.spec
    if c is None or c[0] is not spec:
        ok = features() >= 0 and spec_supported(spec)
        vbmi = ok and lut_supported(spec)
        c = layer.__dict__["_fasq_cpu_caps"] = (spec, ok, vbmi, lut_max_tokens(spec.out_features) if vbmi else 0)
    return c


def lut_min_rows() -> int:
    """Fewest output rows for which 1 token goes to the LUT method (else PERM)."""
    return LUT_MIN_ROWS_FP16 if max(features(), 0) & _FEAT_FP16_LUT else LUT_MIN_ROWS


def lut_max_tokens(rows: int) -> int:
    """Most tokens for which a layer of ``rows`` output rows goes to the LUT method (0: never)."""
    if rows < lut_min_rows():
        return 0
    if not max(features(), 0) & _FEAT_FP16_LUT:
        return 1
    return max([1] + [t for t, r in LUT_MULTI_MIN_ROWS_FP16.items() if rows >= r])


def _tokens(x) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _input_ok(x) -> bool:
    return x.dtype in SUPPORTED_DTYPES and not (x.requires_grad and torch.is_grad_enabled())


def _supports_lut(layer, x) -> bool:
    most = _caps(layer)[3]
    return bool(most) and _tokens(x) <= most and _input_ok(x)


def _supports_perm(layer, x) -> bool:
    return _tokens(x) <= PERM_MAX_TOKENS and _caps(layer)[2] and _input_ok(x)


def _supports_direct(layer, x) -> bool:  # only where PERM cannot run (PERM is faster wherever it can)
    c = _caps(layer)
    return _tokens(x) <= DIRECT_MAX_TOKENS and c[1] and not c[2] and _input_ok(x)


def _supports_tiled(layer, x) -> bool:
    return _caps(layer)[1] and _input_ok(x)


def _adds_outliers(layer=None, x=None) -> bool:
    """The CPU kernels take the outlier correction into their own call (TILED folds it into its tiles
    of W_r where they serve enough tokens, the others add it to y) unless $FASQ_DISABLE_KERNELS has
    "outliers" (the reference's index_add then adds it, as for every kernel)."""
    return "outliers" not in _disabled()


for _name, _supports, _priority in (("lut", _supports_lut, 30), ("perm", _supports_perm, 25),
                                   ("direct", _supports_direct, 20), ("tiled", _supports_tiled, 10)):
    register(Kernel(f"cpu_{_name}", ("cpu",), _supports,
                    lambda x, layer, m=_name: cpu_linear(x, layer, m, outliers=_adds_outliers()), priority=_priority,
                    install=lambda layer, x, m=_name: install_plan(layer, x, m), adds_outliers=_adds_outliers))


# ----------------------------------------------------------------------------------------------
def _cpu_outlier_csr(layer) -> tuple:
    """The layer's outliers sorted by row as cpu_pq_linear reads them: int32 rowptr [out + 1], int32
    columns, fp32 values; cached on the layer."""
    def build(idx, val):
        rowptr, cols, vals = outlier_csr(idx, val, layer.in_features, layer.out_features)
        return rowptr, cols, vals.float().contiguous()
    return outlier_cache(layer, "_fasq_cpu_outlier_csr", build)
