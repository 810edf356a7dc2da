"""Triton kernels (fasq.kernels.triton_kernels) against the plain-PyTorch reference.

On CPU (CI) two subprocesses collect and run the ``inner_*`` functions of this file (plain
pytest runs never collect them: they lack the ``test_`` prefix):

* ``inner_interp*`` with ``TRITON_INTERPRET=1``: every kernel vs the reference on small
  random layers (awkward sizes, every d in {1,2,3,4,8} x K from 2 to 65536, M = 1 and 2, with and
  without rotation, scales per row / per group / none, fp32 / fp16 / bf16, outputs poisoned).
* ``inner_compile*`` with the interpreter off: ``triton.compile`` builds each kernel
  for sm_80, sm_86, sm_89 and sm_90 (no GPU needed).

A subprocess is used because Triton decides interpreter-or-not when a kernel module is imported;
running them here would depend on what other test modules imported first.  To run one inner
suite directly: ``TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py -o
python_functions='inner_interp*'`` (``inner_compile*``: without TRITON_INTERPRET).
Tests marked ``gpu`` run the real kernels and skip without CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fasq import reference

from conftest import check_graph_replay_and_compile, random_pq_layer

if importlib.util.find_spec("triton") is None:  # found, not imported: other tests may check sys.modules
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Relative tolerance (to the output's largest magnitude) per input dtype: both sides sum the
# same fp32 products; they differ by the final rounding and summation order.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(y, ref, dtype, what):
    assert y.dtype == ref.dtype == dtype, what
    assert y.shape == ref.shape, what
    assert bool(torch.isfinite(y).all()), f"{what}: non-finite outputs (unwritten poisoned entries?)"
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= RTOL[dtype] * scale + 1e-6, f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an unwritten element fails the test."""
    from fasq.kernels import triton_kernels as tk

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(tk, "_new_buffer", nan_buffer)
    return tk


def run_case(tk, layer, tokens, dtype, method, split_k=0, lead=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (*(lead or (tokens,)), layer.in_features)
    x = torch.randn(shape, generator=g).to(dtype).to(layer.codes.device)
    y = tk.layer_linear(x, layer, method, split_k)
    ref = reference.pq_linear(x, layer.spec, layer.codes, layer.codebooks, layer.scales, layer.rot_signs,
                              layer.bias)
    assert_close(y, ref, dtype, f"{method} {layer.spec} tokens={tokens} {dtype} split_k={split_k}")


# ---------------------------------------------------------------------------------------------
# Outer tests: run the inner suites in subprocesses.

def _run_inner(mode: str, extra_env: dict, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env, TRITON_DEFAULT_FP_FUSION="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider",
           "-o", f"python_functions=inner_{mode}*"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"inner {mode} suite failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


def test_interpreter_suite():
    _run_inner("interp", {"TRITON_INTERPRET": "1"})


def test_compile_suite():
    _run_inner("compile", {})


def test_import_fasq_does_not_import_triton():
    code = "import sys, fasq, fasq.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------
# Interpreter suite (CPU tensors, TRITON_INTERPRET=1).

DS = (1, 2, 3, 4, 8)
KS = (2, 16, 64, 256, 512, 1000, 4096, 65536)   # 1..16 bits; 6, 9, 10 and 12 bits straddle words
SHAPES = ((72, 40), (70, 33), (64, 17))          # (in, out): awkward, padded (70 % 4, 70 % 8), odd out
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dk_case(i, d, k):
    """Vary the other settings across the (d, K) grid so every one occurs with several of each."""
    in_f, out_f = SHAPES[i % 3]
    scale_mode = ("group", "row", "none")[(i // 3) % 3]
    group = 24 if scale_mode == "group" else 0          # 24: a multiple of every d in DS
    rot = (8 if in_f == 72 else 2 if in_f == 70 else 16) if i % 4 != 3 else 0
    return dict(in_f=in_f, out_f=out_f, d=d, k=k, m=1 + i % 2, group=group, scales=scale_mode != "none",
                rot=rot, bias=i % 2 == 0), DTYPES[i % 3]


DK_CASES = [(d, k) for d in DS for k in KS]


@pytest.mark.parametrize("i", range(len(DK_CASES)), ids=[f"d{d}-K{k}" for d, k in DK_CASES])
def inner_interp_every_d_and_k(i, poisoned):
    d, k = DK_CASES[i]
    kw, dtype = _dk_case(i, d, k)
    layer = random_pq_layer(**kw, seed=i)
    run_case(poisoned, layer, 1 + i % 3, dtype, "decode", seed=i)
    if i % 5 == 0:      # the other two kernels on a sample of the grid (they share the tile code)
        run_case(poisoned, layer, 20, dtype, "prefill", seed=i)
        run_case(poisoned, layer, 3, dtype, "dequant", seed=i)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def inner_interp_decode_tokens(tokens, dtype, poisoned):
    layer = random_pq_layer(72, 40, 2, 256, group=24, rot=8, bias=tokens % 2 == 1, seed=tokens)
    run_case(poisoned, layer, tokens, dtype, "decode", seed=tokens)


@pytest.mark.parametrize("d,k,bits_case", [(2, 256, "aligned"), (3, 64, "straddle"), (1, 2, "1bit"),
                                           (4, 4096, "12bit")])
@pytest.mark.parametrize("splits", [1, 2, 3])
def inner_interp_split_k(d, k, bits_case, splits, poisoned):
    """Forced launches with small blocks so a 200-column layer spans several blocks and splits."""
    tk = poisoned
    layer = random_pq_layer(200, 33, d, k, m=2 if d == 3 else 1, group=12 * d, bias=True, seed=splits)
    spec = layer.spec
    for tokens, use_dot in ((2, False), (7, True)):
        bt = 16 if use_dot else 2
        block_j = 32 if bits_case == "1bit" else 16
        chunks = math.ceil(spec.n_sub / block_j)
        per = math.ceil(chunks / splits)
        launch = tk.Launch(bt, 16, block_j, use_dot, math.ceil(chunks / per), per * block_j)
        x = torch.randn(tokens, spec.in_features, generator=torch.Generator().manual_seed(tokens))
        y = tk.pq_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias, spec.in_features,
                         spec.subvector_dim, spec.effective_group, launch=launch)
        w = reference.dequantize_rotated(spec, layer.codes, layer.codebooks, layer.scales)
        ref = torch.nn.functional.linear(x, w, layer.bias.float())
        assert_close(y, ref, torch.float32, f"split {launch}")


@pytest.mark.parametrize("tokens", [17, 40, 130])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def inner_interp_prefill(tokens, dtype, poisoned):
    layer = random_pq_layer(70, 33, 2, 64, m=1 + tokens % 2, group=14, rot=2, bias=tokens == 40, seed=tokens)
    run_case(poisoned, layer, tokens, dtype, "prefill", seed=tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def inner_interp_dequant(dtype, poisoned):
    tk = poisoned
    for i, (d, k) in enumerate([(2, 256), (3, 1000), (8, 16)]):
        layer = random_pq_layer(72, 40, d, k, m=1 + i % 2, group=24 if i != 1 else 0, scales=i != 2, seed=i)
        s = layer.spec
        w = tk.dequantize_rotated(layer.codes, layer.codebooks, layer.scales, s.in_features, s.subvector_dim,
                                  s.effective_group, dtype)
        ref = reference.dequantize_rotated(s, layer.codes, layer.codebooks, layer.scales).to(dtype)
        assert_close(w, ref, dtype, f"dequant {s}")
        run_case(tk, layer, 5, dtype, "dequant", seed=i)


def inner_interp_shapes_and_errors(poisoned):
    tk = poisoned
    layer = random_pq_layer(72, 40, 2, 256, group=24, rot=8, bias=True)
    run_case(tk, layer, 6, torch.float16, "decode", lead=(2, 3))     # [2, 3, in] input
    run_case(tk, layer, 40, torch.float16, "prefill", lead=(2, 20))
    for method in ("decode", "prefill", "dequant"):
        y = tk.layer_linear(torch.randn(0, 72), layer, method)
        assert y.shape == (0, 40)
    with pytest.raises(ValueError, match="in_features"):
        tk.layer_linear(torch.randn(2, 71), layer, "decode")
    with pytest.raises(ValueError, match="dtype"):
        tk.layer_linear(torch.randn(2, 72).double(), layer, "decode")
    with pytest.raises(ValueError, match="method"):
        tk.layer_linear(torch.randn(2, 72), layer, "lut")
    with pytest.raises(ValueError, match="codes"):
        torch.ops.fasq.triton_pq_linear(torch.randn(2, 72), layer.codes[:, :, :-1], layer.codebooks,
                                        layer.scales, layer.rot_signs, None, 72, 2, 24, 8, "decode")
    with pytest.raises(ValueError, match="at most 16"):
        tk.decode_launch(17, 72, 40, 2, 8, "cpu")


@pytest.mark.parametrize("block,tokens", [(16, 1), (64, 3), (256, 20), (128, 70)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def inner_interp_rotate_fused(block, tokens, dtype, poisoned):
    """The one-pass rotation kernel equals reference.rotate (3-D input, several blocks, edge token tiles)."""
    tk = poisoned
    n = 2 * block if block > 64 else 3 * block
    g = torch.Generator().manual_seed(block + tokens)
    x = torch.randn(1, tokens, n, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)
    y = tk.rotate_fused(x, signs, block)
    assert_close(y, reference.rotate(x, signs, block), dtype, f"rotate_fused block={block} tokens={tokens}")
    with pytest.raises(ValueError, match="block"):
        tk.rotate_fused(torch.randn(2, 16), signs[:16], 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def inner_interp_outlier_correction(dtype, poisoned):
    """The one-launch sparse correction equals the reference's index_add: rows with 0, 1 and many
    outliers (unsorted flat indices, a repeated row), 1 and 20 tokens, a 3-D input."""
    tk = poisoned
    in_f, out_f = 40, 70
    g = torch.Generator().manual_seed(5)
    idx = torch.cat([torch.randperm(in_f * out_f, generator=g)[:50], torch.arange(7 * in_f, 7 * in_f + 30)])
    idx = idx[torch.randperm(idx.numel(), generator=g)].to(torch.int32)
    val = torch.randn(idx.numel(), generator=g).half()
    rowptr, cols, vals = tk.outlier_csr(idx, val, in_f, out_f)
    assert rowptr.dtype == cols.dtype == torch.int32 and int(rowptr[-1]) == idx.numel()
    rows, cols_ref = reference.outlier_rows_cols(idx, in_f)
    for lead in ((1,), (20,), (2, 3)):
        x = torch.randn(*lead, in_f, generator=g).to(dtype)
        y = torch.randn(*lead, out_f, generator=g).to(dtype)
        out = tk.triton_add_outliers(y, x, rowptr, cols, vals)
        ref = reference.add_outliers_to_output(y.float(), x.float(), rows, cols_ref, val).to(dtype)
        assert_close(out, ref, dtype, f"outliers {lead}")
    torch.library.opcheck(torch.ops.fasq.triton_add_outliers.default, (y, x, rowptr, cols, vals),
                          test_utils=("test_schema", "test_faketensor"))


def inner_interp_torch_library_op():
    """The custom op's schema and fake implementation hold up under opcheck and torch.compile."""
    from fasq.kernels import triton_kernels as tk
    layer = random_pq_layer(72, 40, 3, 64, m=2, group=24, rot=8, bias=True)
    s = layer.spec
    x = torch.randn(3, 72)
    args = (x, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias, s.in_features,
            s.subvector_dim, s.effective_group, s.rotation_block, "decode", 0)
    torch.library.opcheck(torch.ops.fasq.triton_pq_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: tk.layer_linear(x, layer, "decode"), backend="aot_eager", fullgraph=True)
    ref = reference.pq_linear(x, s, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias)
    assert_close(compiled(x), ref, torch.float32, "torch.compile(aot_eager)")


def inner_interp_registry(monkeypatch):
    """Registered for CUDA only; decode wins at <= 4 tokens (<= 16 without the packed dequantize),
    dequantize + cuBLAS above, the prefill kernel is the fallback; CPU inputs never match."""
    import fasq.kernels as registry
    from fasq.kernels import triton_kernels as tk
    names = {k.name: k for k in registry.kernels()}
    assert {"triton_decode", "triton_prefill", "triton_dequant"} <= set(names)
    assert all(names[n].devices == ("cuda",) for n in ("triton_decode", "triton_prefill", "triton_dequant"))
    layer = random_pq_layer(72, 40, 2, 256, group=24)
    assert not any(names[n].supports(layer, torch.randn(1, 72)) for n in names if n.startswith("triton"))

    monkeypatch.setattr(tk, "_capability", lambda device: (9, 0))
    cuda = torch.device("cuda")
    fake_layer = SimpleNamespace(spec=layer.spec, codes=SimpleNamespace(device=cuda),
                                 codebooks=SimpleNamespace(dtype=torch.float16))

    def fake_x(tokens, dtype=torch.float16):
        return SimpleNamespace(device=cuda, dtype=dtype, shape=(tokens, 72), numel=lambda: tokens * 72)
    monkeypatch.setattr(registry, "_load_providers", lambda dev: None)
    monkeypatch.delenv("FASQ_DISABLE_KERNELS", raising=False)
    assert registry.select(fake_layer, fake_x(1)).name == "triton_decode"
    assert registry.select(fake_layer, fake_x(4)).name == "triton_decode"
    assert registry.select(fake_layer, fake_x(5)).name == "triton_dequant"      # packed dequantize + cuBLAS
    assert registry.select(fake_layer, fake_x(17)).name == "triton_dequant"
    # fp32 input: no packed dequantize, so the decode kernel keeps up to 16 tokens
    assert registry.select(fake_layer, fake_x(16, torch.float32)).name == "triton_decode"
    assert registry.select(fake_layer, fake_x(17, torch.float32)).name == "triton_dequant"
    assert registry.select(fake_layer, fake_x(4, torch.float64)) is None
    monkeypatch.setattr(tk, "_capability", lambda device: (7, 5))
    assert registry.select(fake_layer, fake_x(4, torch.bfloat16)) is None
    monkeypatch.setenv("FASQ_DISABLE_KERNELS", "triton_decode,triton_dequant")
    assert registry.select(fake_layer, fake_x(4)).name == "triton_prefill"


# ---------------------------------------------------------------------------------------------
# Compile suite: triton.compile for real CUDA targets, no GPU.

def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    return {name: "constexpr" if name in constexprs else pointers.get(name, "*fp16") if name.endswith("_ptr")
            else "i32" for name in fn.arg_names}


def _compile_cases():
    from fasq.kernels import triton_pq as kp
    import triton.language as tl
    mm = dict(HAS_SCALES=True, HAS_BIAS=True, DOT_FP32=False, ACC_WIDE=False, BLOCK_SCALE=False, CB_VEC=False,
              CODE_TYPED=False, X_VEC=False, X_DTYPE=tl.float16, CB_SMEM=False, K_POW2=1)
    cases = {  # name: (kernel, pointer types, constexprs, options); as the host code launches them
        "decode_cuda_cores": (kp.pq_matmul_kernel, {"codes_ptr": "*i32"},
                              dict(mm, BITS=8, D=2, NUM_BOOKS=1, BLOCK_T=1, BLOCK_O=16, BLOCK_J=128,
                                   USE_DOT=False), dict(num_warps=4, num_stages=2)),
        "decode_dot_bf16_straddle": (kp.pq_matmul_kernel, {"codes_ptr": "*i32", "x_ptr": "*bf16",
                                                           "y_ptr": "*fp32", "bias_ptr": "*fp16"},
                                     dict(mm, BITS=6, D=3, NUM_BOOKS=2, BLOCK_T=16, BLOCK_O=16, BLOCK_J=32,
                                          USE_DOT=True), dict(num_warps=4, num_stages=2)),
        "prefill": (kp.pq_matmul_kernel, {"codes_ptr": "*i32"},
                    dict(mm, BITS=8, D=2, NUM_BOOKS=1, BLOCK_T=128, BLOCK_O=128, BLOCK_J=16, USE_DOT=True),
                    dict(num_warps=8, num_stages=3)),
        "prefill_fp32_ieee": (kp.pq_matmul_kernel, {"codes_ptr": "*i32", "x_ptr": "*fp32", "y_ptr": "*fp32"},
                              dict(mm, BITS=12, D=4, NUM_BOOKS=1, BLOCK_T=64, BLOCK_O=128, BLOCK_J=16,
                                   USE_DOT=True, DOT_FP32=True), dict(num_warps=8, num_stages=3)),
        "decode_fast_paths": (kp.pq_matmul_kernel, {"codes_ptr": "*u8", "cb_ptr": "*i32", "x_ptr": "*i32"},
                              dict(mm, BITS=8, D=2, NUM_BOOKS=1, BLOCK_T=1, BLOCK_O=8, BLOCK_J=128, USE_DOT=False,
                                   ACC_WIDE=True, BLOCK_SCALE=True, CB_VEC=True, CODE_TYPED=True, X_VEC=True,
                                   X_DTYPE=tl.float16, CB_SMEM=True, K_POW2=256),
                              dict(num_warps=2, num_stages=2)),
        "prefill_fast_paths": (kp.pq_matmul_kernel, {"codes_ptr": "*i16", "cb_ptr": "*i64", "x_ptr": "*i64",
                                                     "y_ptr": "*bf16"},
                               dict(mm, BITS=16, D=4, NUM_BOOKS=2, BLOCK_T=128, BLOCK_O=128, BLOCK_J=16,
                                    USE_DOT=True, BLOCK_SCALE=True, CB_VEC=True, CODE_TYPED=True, X_VEC=True,
                                    X_DTYPE=tl.bfloat16),
                               dict(num_warps=8, num_stages=3)),
        "dequant_packed": (kp.dequant_kernel, {"codes_ptr": "*u8", "cb_ptr": "*i32", "w_ptr": "*i32"},
                           dict(BITS=8, D=2, NUM_BOOKS=1, HAS_SCALES=True, BLOCK_O=16, BLOCK_J=128, PACKED=True,
                                CODE_TYPED=True, BLOCK_SCALE=True, W_DTYPE=tl.bfloat16), dict(num_warps=4)),
        "rotate": (kp.rotate_kernel, {"signs_ptr": "*i8", "x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16"},
                   dict(BLOCK=256, BLOCK_T=64, BLOCK_K=64, DOT_FP32=False), dict(num_warps=8)),
        "splitk_reduce": (kp.splitk_reduce_kernel, {"ws_ptr": "*fp32", "y_ptr": "*bf16"},
                          dict(HAS_BIAS=True, BLOCK=1024), dict(num_warps=4)),
        "outlier_add": (kp.outlier_add_kernel, {"y_ptr": "*bf16", "x_ptr": "*bf16", "rowptr_ptr": "*i32",
                                                "cols_ptr": "*i32", "vals_ptr": "*fp16", "out_ptr": "*bf16"},
                        dict(BLOCK_T=1, BLOCK_R=64), dict(num_warps=4)),
        "dequant": (kp.dequant_kernel, {"codes_ptr": "*i32"},
                    dict(BITS=16, D=1, NUM_BOOKS=1, HAS_SCALES=True, BLOCK_O=32, BLOCK_J=128, PACKED=False,
                         CODE_TYPED=False, BLOCK_SCALE=False, W_DTYPE=tl.float16), dict(num_warps=4)),
    }
    return cases


COMPILE_CASES = ["decode_cuda_cores", "decode_dot_bf16_straddle", "prefill", "prefill_fp32_ieee",
                 "decode_fast_paths", "prefill_fast_paths", "splitk_reduce", "dequant", "dequant_packed", "rotate",
                 "outlier_add"]


@pytest.mark.parametrize("case,cc", [(case, cc) for case in COMPILE_CASES for cc in (80, 86, 89, 90)
                                     if cc in (80, 90) or case in ("decode_fast_paths", "prefill_fast_paths",
                                                                   "splitk_reduce", "dequant", "dequant_packed",
                                                                   "rotate", "outlier_add")])  # variants: sm_80, sm_90
def inner_compile(case, cc):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, pointers, constexprs, options = _compile_cases()[case]
    assert isinstance(fn, triton.runtime.JITFunction), "compile suite must run with TRITON_INTERPRET unset"
    src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    assert kernel.asm.get("cubin"), f"{case}: no cubin for sm_{cc}"
    assert ".entry" in kernel.asm["ptx"]


# ---------------------------------------------------------------------------------------------
# Benchmark script, tiny interpreter mode (checks its logic end to end on CPU).

def test_benchmark_dry_run(tmp_path):
    out, md = tmp_path / "gpu.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept above\n")
    env = {k: v for k, v in os.environ.items()}
    env.update(TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out),
                        "--markdown", str(md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["kernels"] and res["end_to_end"]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n")
    assert text.count("<!-- gpu:begin -->") == 1 and text.count("<!-- gpu:end -->") == 1
    assert "dry run" in text.lower()


# ---------------------------------------------------------------------------------------------
# GPU only.

@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["decode", "prefill", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_match_reference(method, dtype, poisoned):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs sm_80+")
    cases = [dict(in_f=72, out_f=40, d=3, k=64, m=2, group=24, rot=8, bias=True),
             dict(in_f=4096, out_f=1024, d=2, k=256, group=128, rot=256),
             dict(in_f=1000, out_f=300, d=4, k=4096, group=0, rot=8, bias=True),
             dict(in_f=256, out_f=512, d=1, k=65536, group=64, scales=True),
             dict(in_f=128, out_f=96, d=8, k=2, m=2, scales=False)]
    tokens = (1, 3, 16) if method == "decode" else (1, 17, 300)
    for i, kw in enumerate(cases):
        layer = random_pq_layer(**kw, seed=i, device="cuda")
        for t in tokens:
            run_case(poisoned, layer, t, dtype, method, seed=t)


@gpu
@needs_cuda
def test_gpu_registry_cuda_graph_and_compile():
    import fasq.kernels as registry
    layer = random_pq_layer(4096, 1024, 2, 256, group=128, rot=256, device="cuda")
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    assert registry.select(layer, x1).name in ("cuda_decode", "triton_decode")
    assert registry.select(layer, torch.randn(64, 4096, device="cuda", dtype=torch.float16)).name == "triton_dequant"
    ref = layer(x1)                                     # warm-up: compiles kernels, caches Hadamard
    check_graph_replay_and_compile(layer, x1, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_gpu_cb_smem_and_packed_dequant(dtype, poisoned):
    """The tl.gather codebook path (Launch.cb_smem) and both dequantize paths on the card."""
    import dataclasses
    tk = poisoned
    for i, kw in enumerate([dict(in_f=4096, out_f=1024, d=2, k=256, group=256, rot=256),
                            dict(in_f=1000, out_f=300, d=4, k=4096, group=0, rot=8, bias=True),
                            dict(in_f=512, out_f=96, d=2, k=64, group=128)]):
        layer = random_pq_layer(**kw, seed=i, device="cuda")
        s = layer.spec
        w_ref = reference.dequantize_rotated(s, layer.codes, layer.codebooks, layer.scales).to(dtype)
        for packed in (True, False):
            w = tk.dequantize_rotated(layer.codes, layer.codebooks, layer.scales, s.in_features, s.subvector_dim,
                                      s.effective_group, dtype, packed=packed)
            assert_close(w, w_ref, dtype, f"dequant packed={packed} {s}")
        for tokens in (1, 3, 16, 40):
            x = torch.randn(tokens, s.in_features, device="cuda").to(dtype)
            xr = tk.rotate(x, layer.rot_signs, s.rotation_block) if s.rotation_block else x
            if tokens <= tk.DECODE_MAX_TOKENS:
                base = tk.decode_launch(tokens, s.in_features, s.out_features, s.subvector_dim, s.bits, "cuda")
            else:
                base = tk.prefill_launch(tokens, s.in_features, s.out_features, s.subvector_dim, s.bits)
            y = tk.pq_matmul(xr.contiguous(), layer.codes, layer.codebooks, layer.scales, layer.bias, s.in_features,
                             s.subvector_dim, s.effective_group, launch=dataclasses.replace(base, cb_smem=True))
            ref = reference.pq_linear(x, s, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias)
            assert_close(y, ref, dtype, f"cb_smem {s} tokens={tokens}")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_rotate_fused(dtype, poisoned):
    tk = poisoned
    for block, tokens in ((16, 1), (256, 1), (256, 300), (64, 17)):
        n = 4 * block
        x = torch.randn(tokens, n, device="cuda").to(dtype)
        signs = (torch.randint(0, 2, (n,), device="cuda") * 2 - 1).to(torch.int8)
        assert_close(tk.rotate_fused(x, signs, block), reference.rotate(x, signs, block), dtype,
                     f"rotate_fused block={block} tokens={tokens}")
