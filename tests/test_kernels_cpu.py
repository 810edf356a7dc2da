"""The CPU kernel (fasq.kernels.cpu) against the plain-PyTorch reference.

Every check runs on fresh random inputs with the op's output and scratch NaN-poisoned first
(``cpu.POISON``), over every method (lut / perm / direct / tiled), every ISA path this machine can run,
awkward shapes and every supported (d, K).  The first test in a fresh cache builds the kernel
(about a minute, once per machine).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fasq import reference
from fasq.config import FASQConfig
from fasq.fit.pq import quantize_weight
from fasq.format import LayerSpec, pack_codes
from fasq.kernels import cpu, select
from fasq.nn import PQLinear

ISAS = ("avx512", "avx2", "scalar")
# Error bound relative to max |y_ref|: exact fp32 methods, the int16-table LUT method, and the
# rounding of bf16 / fp16 inputs and outputs (the reference itself computes in the input dtype).
TOL = {("exact", torch.float32): 2e-5, ("lut", torch.float32): 2e-3,
       ("exact", torch.bfloat16): 3e-2, ("lut", torch.bfloat16): 3e-2,
       ("exact", torch.float16): 4e-3, ("lut", torch.float16): 5e-3}


from cpu_kernel_support import kernel_built, poison  # noqa: E402,F401  (autouse fixtures)
from cpu_kernel_support import isas_here as _isas_here  # noqa: E402


def isas_here() -> list[str]:
    return _isas_here(ISAS)


def random_layer(spec: LayerSpec, seed: int = 0) -> PQLinear:
    g = torch.Generator().manual_seed(seed)
    m, out, k = spec.num_codebooks, spec.out_features, spec.num_centroids
    codes = pack_codes(torch.randint(0, k, (m, out, spec.n_sub), generator=g), spec.bits)
    books = (torch.randn(m, k, spec.subvector_dim, generator=g) / m).half()
    scales = (torch.rand(out, spec.n_groups, generator=g) + 0.5).half()
    signs = ((torch.randint(0, 2, (spec.in_features,), generator=g) * 2 - 1).to(torch.int8)
             if spec.rotation_block else torch.zeros(0, dtype=torch.int8))
    bias = torch.randn(out, generator=g).half() if spec.has_bias else None
    return PQLinear.from_tensors(spec, codes, books, scales, signs, bias)


def ref_out(layer: PQLinear, x: torch.Tensor, outliers: bool = False) -> torch.Tensor:
    """The reference output; ``outliers``: plus the sparse correction, as a module call adds it."""
    s = layer.spec
    y = reference.pq_linear(x.float(), s, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias)
    if not (outliers and s.n_outliers):
        return y
    rows, cols = reference.outlier_rows_cols(layer.outlier_idx, s.in_features)
    return reference.add_outliers_to_output(y, x.float(), rows, cols, layer.outlier_val)


def check(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, kind: str, what: str) -> None:
    assert y.dtype == x.dtype and y.shape == ref.shape, what
    assert bool(torch.isfinite(y).all()), f"{what}: non-finite output (an element was never written?)"
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err <= TOL[(kind, x.dtype)], f"{what}: relative error {err:.2e} > {TOL[(kind, x.dtype)]:.0e}"


def methods_for(spec: LayerSpec, isa: str) -> list[str]:
    return (["lut", "perm"] if cpu.lut_supported(spec, isa) else []) + ["direct", "tiled"]


def run_all(layer: PQLinear, tokens=(1, 3, 8, 11), dtypes=(torch.float32,), seed=0, isas=None) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for t in tokens:
        x32 = torch.randn(t, layer.in_features, generator=g)
        ref = ref_out(layer, x32)
        for dt in dtypes:
            x = x32.to(dt)
            r = ref if dt == torch.float32 else ref_out(layer, x)
            for isa in isas or isas_here():
                for method in methods_for(layer.spec, isa):
                    y = cpu.cpu_linear(x, layer, method, isa)
                    check(y, r, x, "lut" if method == "lut" else "exact",
                          f"{layer.spec} tokens={t} {dt} {method}/{isa}")


# ----------------------------------------------------------------------------------------------
D_K = [(d, k) for d in (1, 2, 3, 4, 8) for k in (2, 16, 64, 256, 300, 512, 1000, 4096, 65536)]


@pytest.mark.parametrize("d,k", D_K, ids=[f"d{d}-K{k}" for d, k in D_K])
def test_every_d_and_k(d, k):
    # Alternate the other settings across cases so that each appears with many (d, K).
    i = D_K.index((d, k))
    spec = LayerSpec(in_features=72, out_features=40, subvector_dim=d, num_centroids=k,
                     num_codebooks=1 + i % 2, group_size=(0, 24)[i % 2] if 24 % d == 0 else 0,
                     has_scales=i % 5 != 4, rotation_block=(0, 8)[(i // 2) % 2], has_bias=i % 3 == 0)
    run_all(random_layer(spec, seed=i), seed=i)


TILED_SPECS = [  # (in, out, d, K, M, group, scales): no rotation, so that x = I gives y = W_r^T
    (16, 40, 2, 256, 1, 8, True), (72, 130, 2, 256, 1, 24, True), (70, 130, 3, 64, 2, 0, True),
    (72, 64, 4, 512, 1, 24, True), (64, 70, 1, 16, 1, 16, True), (48, 65, 8, 200, 2, 16, False),
    (72, 40, 2, 512, 2, 8, True),
]


@pytest.mark.parametrize("spec_args", TILED_SPECS, ids=[f"{s[0]}x{s[1]}-d{s[2]}-K{s[3]}-M{s[4]}" for s in TILED_SPECS])
def test_tiled_dequantizes_exactly(spec_args):
    """TILED on the identity: every output is one weight times 1, so y must equal W_r (rounded to
    x's dtype, as the reference rounds it) bit for bit, whichever layout (repacked on VBMI CPUs,
    stored elsewhere) and GEMM dtype (fp32 below 20 tokens) the call takes."""
    i, o, d, k, m, g, scaled = spec_args
    spec = LayerSpec(i, o, d, k, num_codebooks=m, group_size=g, has_scales=scaled)
    layer = random_layer(spec, seed=i * o + d)
    w = reference.dequantize_rotated(spec, layer.codes, layer.codebooks, layer.scales)   # [out, in] fp32
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for t in sorted({min(i, 8), i}):                 # rows of I: fewer tokens than in, and all of them
            x = torch.eye(i, dtype=dt)[:t]
            for isa in isas_here():
                y = cpu.cpu_linear(x, layer, "tiled", isa)
                assert torch.equal(y, w.to(dt).T[:t].contiguous()), f"{spec} {dt} tokens={t} {isa}"


SHAPES = [
    # (in, out, d, K, M, group, rotation_block, bias)
    (72, 40, 2, 256, 1, 8, 8, True),
    (100, 33, 3, 64, 1, 0, 4, False),          # in not a multiple of d, per-row scale
    (70, 130, 8, 256, 2, 16, 2, True),         # in not a multiple of d; 3 row blocks (one partial)
    (576, 1536, 2, 256, 1, 128, 64, False),    # SmolLM2 gate/up
    (1536, 576, 2, 64, 1, 128, 512, True),     # SmolLM2 down, 3 bits
    (576, 192, 4, 256, 1, 128, 64, False),     # SmolLM2 k/v, 2 bits
    (256, 64, 16, 128, 1, 32, 256, False),     # d=16, 7-bit codes
    (96, 50, 2, 32, 3, 32, 32, True),          # 5-bit codes, three codebooks
    (576, 192, 2, 512, 1, 256, 64, False),     # SmolLM2 v, 9-bit codes (--preset 4bit)
    (1536, 576, 2, 512, 1, 256, 512, True),    # SmolLM2 down, 9-bit codes (--preset 4bit)
    (70, 130, 2, 400, 2, 14, 2, True),         # 9-bit codes, K not a power of 2, two codebooks, 3 row blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}-d{s[2]}-K{s[3]}-M{s[4]}" for s in SHAPES])
def test_shapes_tokens_dtypes(shape):
    i, o, d, k, m, g, rot, bias = shape
    spec = LayerSpec(i, o, d, k, num_codebooks=m, group_size=g, rotation_block=rot, has_bias=bias)
    layer = random_layer(spec, seed=i + o)
    big = i * o > 100_000
    run_all(layer, tokens=(1, 2, 5, 8, 9) if big else tuple(range(1, 10)) + (17,),
            dtypes=(torch.float32, torch.bfloat16, torch.float16), isas=[cpu.default_isa()] if big else None)


def test_quantized_weight_and_registry_dispatch():
    """A layer fitted by quantize_weight, called as a module: the registry picks the method by token count."""
    torch.manual_seed(0)
    w, b = torch.randn(288, 256), torch.randn(288)     # >= lut_min_rows() rows: 1 token goes to the LUT
    spec, t = quantize_weight(w, FASQConfig(kmeans_iters=4, rotation_block=64, group_size=64), "blk.q", bias=b)
    layer = PQLinear.from_tensors(spec, **t)
    vbmi = cpu.lut_supported(spec)
    for shape, want in (((1, 1, 256), "cpu_lut" if vbmi else "cpu_direct"),
                        ((1, 3, 256), "cpu_perm" if vbmi else "cpu_direct"),
                        ((2, 6, 256), "cpu_perm" if vbmi else "cpu_tiled"), ((4, 5, 256), "cpu_tiled")):
        x = torch.randn(shape)
        k = select(layer, x)
        assert k is not None and k.name == want, (shape, k)
        y = layer(x)
        check(y, ref_out(layer, x, outliers=True), x, "lut" if want == "cpu_lut" else "exact", f"{shape} via {want}")
        dense = x @ layer.dequantize().T + layer.bias.float()
        assert torch.allclose(y, dense, rtol=1e-2, atol=1e-2 * dense.abs().max().item())


@pytest.mark.parametrize("scale", [1e-6, 1.0, 3e4])
def test_input_magnitudes(scale):
    """Tiny, unit and huge inputs with an outlier channel: the LUT's int16 tables must not overflow."""
    spec = LayerSpec(128, 300, 2, 256, group_size=64)
    layer = random_layer(spec, seed=3)
    x = torch.randn(1, 128) * scale
    x[0, 7] *= 100.0
    for method in methods_for(spec, cpu.default_isa()):
        check(cpu.cpu_linear(x, layer, method), ref_out(layer, x), x, "lut" if method == "lut" else "exact",
              f"x scale {scale:g}, {method}")


def test_small_layers_skip_the_lut():
    spec = LayerSpec(64, cpu.lut_min_rows() - 64, 2, 256, group_size=32)
    k = select(random_layer(spec), torch.randn(1, 64))
    assert k is not None and k.name == ("cpu_perm" if cpu.lut_supported(spec) else "cpu_direct")


def test_lut_takes_two_or_three_tokens_only_on_tall_layers():
    """Each token builds its own LUT tables, so 2-3 tokens go to the LUT only with enough rows."""
    for rows, tokens in ((192, 2), (576, 2), (576, 3), (1536, 3), (1536, 4)):
        spec = LayerSpec(64, rows, 2, 256, group_size=32)
        layer = random_layer(spec)
        x = torch.randn(tokens, 64)
        k = select(layer, x)
        lut = 0 < tokens <= cpu.lut_max_tokens(rows) and cpu.lut_supported(spec)
        assert k is not None and k.name == ("cpu_lut" if lut else "cpu_perm" if cpu.lut_supported(spec) else
                                            "cpu_direct"), (rows, tokens, k)
        check(layer(x), ref_out(layer, x), x, "lut" if lut else "exact", f"{rows} rows, {tokens} tokens")
    if cpu.features() & 16:                                # the fp16 table build: the measured cut-offs
        assert [cpu.lut_max_tokens(r) for r in (100, 192, 576, 1536)] == [0, 1, 2, 3]


def test_perm_blocks_split_groups_across_threads():
    """PERM's block form with 2 threads: each thread takes a slice of positions whose ends cut
    groups (700 positions, groups of 24), and the partial sums of a cut group are added after."""
    spec = LayerSpec(1400, 700, 2, 256, group_size=48, rotation_block=8, has_bias=True)
    layer = random_layer(spec, seed=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in (5, 13, 16):
            x = torch.randn(t, 1400)
            for method in methods_for(spec, cpu.default_isa()):
                if method != "lut":
                    check(cpu.cpu_linear(x, layer, method), ref_out(layer, x), x, "exact", f"{t} tokens {method}")
    finally:
        torch.set_num_threads(threads)


def test_cache_follows_buffer_updates():
    spec = LayerSpec(64, 70, 2, 256, group_size=32, rotation_block=16, has_bias=True)
    a, b = random_layer(spec, seed=1), random_layer(spec, seed=2)
    x = torch.randn(1, 64)
    for method in methods_for(spec, cpu.default_isa()):
        cpu.cpu_linear(x, a, method)                      # builds a's per-layer cache
    a.load_state_dict(b.state_dict())                     # in-place copies into the same storage
    for method in methods_for(spec, cpu.default_isa()):
        check(cpu.cpu_linear(x, a, method), ref_out(b, x), x, "lut" if method == "lut" else "exact",
              f"after load_state_dict, {method}")


def test_layer_built_in_inference_mode():
    spec = LayerSpec(64, 300, 2, 256, group_size=32, rotation_block=64)
    with torch.inference_mode():                          # buffers without version counters
        layer = random_layer(spec)
        x = torch.randn(1, 64)
        check(layer(x), ref_out(layer, x), x, "lut" if cpu.lut_supported(spec) else "exact", "inference mode")


def test_declines_what_it_cannot_do():
    spec = LayerSpec(64, 32, 2, 256, group_size=32)
    layer = random_layer(spec)
    x = torch.randn(1, 64, requires_grad=True)
    assert select(layer, x) is None                        # autograd needs the reference
    assert select(layer, torch.randn(1, 64, dtype=torch.float64)) is None
    odd = LayerSpec(64, 32, 3, 16, group_size=32)          # group not a multiple of d
    assert not cpu.spec_supported(odd)
    with pytest.raises(ValueError, match="method"):
        cpu.cpu_linear(torch.randn(1, 64), layer, "nope")


def test_empty_and_noncontiguous_inputs():
    spec = LayerSpec(64, 48, 4, 16, group_size=32, rotation_block=32)
    layer = random_layer(spec)
    for method in methods_for(spec, cpu.default_isa()):
        assert cpu.cpu_linear(torch.randn(0, 64), layer, method).shape == (0, 48)
        x = torch.randn(64, 3).t()                         # [3, 64], not contiguous
        check(cpu.cpu_linear(x, layer, method), ref_out(layer, x), x, "lut" if method == "lut" else "exact",
              f"non-contiguous {method}")


def test_op_has_a_fake_implementation():
    spec = LayerSpec(64, 48, 2, 256, group_size=32)
    layer = random_layer(spec)
    x = torch.randn(2, 64)
    meta = cpu._meta(spec, "direct", cpu.default_isa())
    args = (x, layer.codes, cpu._prepare(layer).tables, layer.scales, layer.rot_signs, None, meta)
    torch.library.opcheck(torch.ops.fasq.cpu_pq_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    spec_o = LayerSpec(64, 48, 2, 256, group_size=32, rotation_block=16)
    lo = layer_with_outliers(spec_o, 12, seed=4)
    args_o = (x, lo.codes, cpu._prepare(lo).tables, lo.scales, lo.rot_signs, None,
              cpu._meta(spec_o, "tiled", cpu.default_isa()), *cpu._cpu_outlier_csr(lo))
    torch.library.opcheck(torch.ops.fasq.cpu_pq_linear.default, args_o, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda v: layer(v), backend="eager", fullgraph=False)
    kind = "lut" if select(layer, x).name == "cpu_lut" else "exact"
    check(compiled(x), ref_out(layer, x), x, kind, "torch.compile(eager)")


def test_broken_compiler_warns_once_and_falls_back(tmp_path):
    """No working compiler: one warning, the kernels decline, and the reference gives the output."""
    script = textwrap.dedent("""
        import torch
        from fasq.format import LayerSpec
        from fasq.kernels import cpu, select
        from fasq import reference
        from tests_helper import random_layer
        layer = random_layer(LayerSpec(64, 40, 2, 256, group_size=32, rotation_block=16, has_bias=True))
        x = torch.randn(3, 64)
        y1, y2 = layer(x), layer(torch.randn(1, 64))
        assert not cpu.available() and select(layer, x) is None
        ref = reference.pq_linear(x, layer.spec, layer.codes, layer.codebooks, layer.scales, layer.rot_signs,
                                  layer.bias)
        assert torch.equal(y1, ref)
        print("OK")
    """)
    helper = tmp_path / "tests_helper.py"
    src = open(__file__).read()
    helper.write_text("import torch\nfrom fasq.format import LayerSpec, pack_codes\nfrom fasq.nn import PQLinear\n"
                      + src[src.index("def random_layer"):src.index("def ref_out")])
    env = dict(os.environ, CXX="/bin/false", FASQ_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path)
               + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if "could not build the CPU kernel" in ln]
    assert len(warnings) == 1, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# PQLinear.forward's fast path: the per-layer Plan (one C++ call for the whole layer, outliers included).
def layer_with_outliers(spec: LayerSpec, n: int, seed: int = 0) -> PQLinear:
    spec = LayerSpec(**{**spec.to_dict(), "n_outliers": n})
    base = random_layer(LayerSpec(**{**spec.to_dict(), "n_outliers": 0}), seed)
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(spec.in_features * spec.out_features, generator=g)[:n].int()
    val = (torch.randn(n, generator=g) * 3).half()
    b = base._buffers
    return PQLinear.from_tensors(spec, b["codes"], b["codebooks"], b["scales"], b["rot_signs"], b.get("bias"), idx, val)


PLAN_SPECS = [
    # (in, out, d, K, M, group, rotation_block, bias, outliers)
    (576, 192, 2, 256, 1, 128, 64, False, 110),    # SmolLM2 k/v
    (576, 576, 2, 256, 1, 128, 64, True, 330),     # SmolLM2 q/o
    (100, 33, 3, 64, 1, 0, 4, False, 5),           # in not a multiple of d
    (70, 130, 8, 256, 2, 16, 2, True, 0),
    (576, 192, 2, 512, 1, 256, 64, False, 110),    # SmolLM2 v at --preset 4bit: 9-bit codes
    (96, 50, 4, 4096, 1, 32, 32, False, 9),        # K > 512: direct
]


@pytest.mark.parametrize("shape", PLAN_SPECS, ids=[f"{s[0]}x{s[1]}-d{s[2]}-K{s[3]}-o{s[8]}" for s in PLAN_SPECS])
def test_module_fast_path_matches_reference(shape):
    i, o, d, k, m, g, rot, bias, n_out = shape
    spec = LayerSpec(i, o, d, k, num_codebooks=m, group_size=g, rotation_block=rot, has_bias=bias)
    layer = layer_with_outliers(spec, n_out, seed=i + o) if n_out else random_layer(spec, seed=i + o)
    gen = torch.Generator().manual_seed(5)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for t in (1, 2, 3, 5, 8, 9, 16, 17):
            x = torch.randn(1, t, i, generator=gen).to(dt)
            want = select(layer, x).name
            ref = ref_out(layer, x, outliers=True)
            for call in range(2):                      # the first call installs the plan, the second uses it
                if call and t <= cpu.FEW_MAX_TOKENS:
                    assert layer.__dict__.get("_fasq_plan") is not None
                check(layer(x), ref, x, "lut" if want == "cpu_lut" else "exact", f"{spec} {dt} tokens={t} call {call}")


def test_plan_follows_buffers_env_and_grad(monkeypatch):
    spec = LayerSpec(64, 300, 2, 256, group_size=32, rotation_block=16, has_bias=True, n_outliers=20)
    a, b = layer_with_outliers(spec, 20, seed=1), layer_with_outliers(spec, 20, seed=2)
    x = torch.randn(1, 64)
    kind = "lut" if cpu.lut_supported(spec) else "exact"
    a(x), a(x)
    plan = a.__dict__["_fasq_plan"]
    assert plan.run(x, a._buffers, __import__("fasq.kernels").kernels._generation) is not None
    a.load_state_dict(b.state_dict())                  # in-place copies: version counters change
    check(a(x), ref_out(b, x, outliers=True), x, kind, "after load_state_dict")
    check(a(x), ref_out(b, x, outliers=True), x, kind, "after load_state_dict, plan rebuilt")
    c = layer_with_outliers(spec, 20, seed=3)
    a._buffers["outlier_val"] = c.outlier_val.clone()  # a buffer object replaced
    a._buffers["outlier_idx"] = c.outlier_idx.clone()
    want = ref_out(b, x) + (ref_out(c, x, outliers=True) - ref_out(c, x))
    check(a(x), want, x, kind, "after replacing the outlier buffers")
    monkeypatch.setenv("FASQ_DISABLE_KERNELS", "all")  # the registry's switch: the plan must step aside
    ref = reference.pq_linear(x, spec, a.codes, a.codebooks, a.scales, a.rot_signs, a.bias)
    rows, cols = reference.outlier_rows_cols(a.outlier_idx, 64)
    assert torch.equal(a(x), reference.add_outliers_to_output(ref, x, rows, cols, a.outlier_val))
    monkeypatch.delenv("FASQ_DISABLE_KERNELS")
    xg = x.clone().requires_grad_()
    y = a(xg)                                          # autograd: the reference, with a graph
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_module_call_fast_path_honours_hooks_and_overrides():
    """PQLinear.__call__ lets the plan stand in for nn.Module.__call__ only when nothing else would
    run: module hooks, global module hooks, a forward replaced on the instance (as accelerate's
    hooks do), keyword arguments and module.compile() all take the usual path."""
    import torch.nn.modules.module as module_py
    spec = LayerSpec(64, 300, 2, 256, group_size=32, rotation_block=16)
    layer = random_layer(spec, seed=5)
    x = torch.randn(1, 64)
    kind = "lut" if cpu.lut_supported(spec) else "exact"
    with torch.no_grad():
        y0 = layer(x)
        assert layer.__dict__.get("_fasq_plan") is not None
        assert torch.equal(layer.__dict__["_fasq_plan"].call(layer.__dict__, x, cpu_generation()), layer(x))
        check(layer(x), ref_out(layer, x), x, kind, "fast path")
        seen = []
        h = layer.register_forward_hook(lambda m, i, o: seen.append("hook") or 2 * o)
        assert torch.equal(layer(x), 2 * y0) and seen == ["hook"]
        h.remove()
        h = layer.register_forward_pre_hook(lambda m, i: (3 * i[0],))
        check(layer(x), ref_out(layer, 3 * x), 3 * x, kind, "pre-hook")
        h.remove()
        h = module_py.register_module_forward_hook(lambda m, i, o: seen.append("global") or o)
        layer(x)
        h.remove()
        assert seen == ["hook", "global"]
        original = layer.forward
        layer.forward = lambda v: seen.append("override") or original(v)
        layer(x)
        del layer.forward
        assert seen == ["hook", "global", "override"]
        assert torch.equal(layer(x=x), y0) and torch.equal(layer(x), y0)
        layer.compile(backend="eager")                 # module.compile(): the compiled call runs
        assert layer.__dict__["_fasq_plan"].call(layer.__dict__, x, cpu_generation()) is None
        check(layer(x), ref_out(layer, x), x, kind, "module.compile()")


def cpu_generation() -> int:
    from fasq import kernels
    return kernels._generation


def test_layer_copies_and_pickles_after_calls():
    """The per-layer kernel caches (registry choices, C++ plan) are left out of copies and pickles."""
    import copy
    import io
    spec = LayerSpec(64, 300, 2, 256, group_size=32, rotation_block=16, n_outliers=10)
    layer = layer_with_outliers(spec, 10, seed=4)
    x = torch.randn(1, 64)
    y = layer(x)                                       # through the registry
    y2 = layer(x)                                      # through the plan (outliers summed in fp32 there)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert not any(k.startswith("_fasq_") for k in other.__dict__)
        assert torch.equal(other(x), y) and torch.equal(other(x), y2)


OUTLIER_SPECS = [
    # (in, out, d, K, M, group, rotation_block, bias, outliers)
    (576, 192, 2, 256, 1, 128, 64, False, 110),    # SmolLM2 k/v
    (100, 33, 3, 64, 1, 0, 4, False, 5),           # in not a multiple of d
    (96, 70, 2, 64, 1, 0, 0, True, 30),            # no rotation: an entry folds as itself
    (256, 130, 2, 16, 2, 64, 128, True, 60),       # two codebooks, a last row block of 2 rows
]


@pytest.mark.parametrize("shape", OUTLIER_SPECS, ids=[f"{s[0]}x{s[1]}-rot{s[6]}" for s in OUTLIER_SPECS])
def test_outliers_in_every_method(shape):
    """``cpu_linear(..., outliers=True)`` (what the registry's CPU kernels run): y includes the sparse
    correction for every method and ISA path.  TILED folds it into its tiles of W_r (h rotated values
    per entry) from h / 2 tokens and adds it to y below; both sides of that cut-off are covered."""
    i, o, d, k, m, g, rot, bias, n = shape
    spec = LayerSpec(i, o, d, k, num_codebooks=m, group_size=g, rotation_block=rot, has_bias=bias)
    layer = layer_with_outliers(spec, n, seed=i + o)
    gen = torch.Generator().manual_seed(11)
    for isa in isas_here():
        for method in methods_for(layer.spec, isa):
            for t in ((1, 5) if method != "tiled" else (1, 17, 40, 130)):
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    x = torch.randn(t, i, generator=gen).to(dt)
                    kind = "lut" if method == "lut" else "exact"
                    what = f"{spec} {isa} {method} {dt} tokens={t}"
                    y = cpu.cpu_linear(x, layer, method, isa=isa, outliers=True)
                    check(y, ref_out(layer, x, outliers=True), x, kind, what)
                    if dt == torch.float32:   # the correction is really there
                        without = ref_out(layer, x)
                        err = ((y - without).abs().max() / without.abs().max()).item()
                        assert err > 10 * TOL[(kind, dt)], what


def test_outlier_operands_are_checked():
    spec = LayerSpec(40, 70, 2, 64, group_size=0, rotation_block=8)
    layer = layer_with_outliers(spec, 20, seed=3)
    rowptr, cols, vals = cpu._cpu_outlier_csr(layer)
    x = torch.randn(3, 40)
    base = (x, layer.codes, cpu._prepare(layer).tables, layer.scales, layer.rot_signs, None,
            cpu._meta(layer.spec, "tiled", cpu.default_isa()))
    bad_cols = cols.clone()
    bad_cols[0] = 40
    bad_ptr = rowptr.clone()
    bad_ptr[5] = int(bad_ptr[6]) + 1                     # row 5 would end after row 6 starts
    for (rp, c, v), msg in (((rowptr, bad_cols, vals), "out of range"), ((bad_ptr, cols, vals), "decreases|cover"),
                            ((rowptr[:-1], cols, vals), "rowptr"), ((rowptr, cols, vals.half()), "fp32"),
                            ((rowptr.long(), cols, vals), "int32")):
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.fasq.cpu_pq_linear(*base, rp, c, v)
    with pytest.raises(RuntimeError, match="all of"):
        torch.ops.fasq.cpu_pq_linear(*base, rowptr, None, vals)


ROTATION_SPECS = [
    # (in, out, d, K, M, group, rotation_block)
    (576, 192, 2, 256, 1, 128, 64),     # SmolLM2 k/v
    (128, 70, 3, 64, 1, 0, 4),          # a sub-vector's rows straddle rotation blocks (d = 3, h = 4)
    (96, 40, 1, 16, 2, 32, 32),         # d = 1, two codebooks
    (256, 64, 8, 512, 1, 64, 256),      # 9-bit codes, h = 256 (strips of 16 columns)
    (256, 33, 4, 128, 1, 0, 128),       # odd log2(h): a radix-2 pass; one partial row block
    (72, 40, 2, 256, 1, 8, 8),
    (64, 20, 2, 64, 1, 16, 2),          # h = 2
]


@pytest.mark.parametrize("shape", ROTATION_SPECS, ids=[f"{s[0]}x{s[1]}-d{s[2]}-rot{s[6]}" for s in ROTATION_SPECS])
def test_tiled_rotates_input_or_weights(shape):
    """TILED on the repacked layout rotates x (few tokens) or, from out <= 3T tokens, its tiles of W_r
    back to the original basis (an FWHT along each rotation block's rows): both against the reference,
    with and without outliers (which then fold in as themselves)."""
    i, o, d, k, m, g, rot = shape
    spec = LayerSpec(i, o, d, k, num_codebooks=m, group_size=g, rotation_block=rot)
    for n in (0, 7):
        layer = layer_with_outliers(spec, n, seed=i + o + n) if n else random_layer(spec, seed=i + o)
        gen = torch.Generator().manual_seed(3)
        for t in (max(1, o // 4), -(-o // 3), o):        # rotating x, then the weights (o <= 3t)
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(t, i, generator=gen).to(dt)
                y = cpu.cpu_linear(x, layer, "tiled", outliers=True)
                check(y, ref_out(layer, x, outliers=True), x, "exact", f"{spec} outliers={n} {dt} tokens={t}")
