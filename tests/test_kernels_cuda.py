"""The CUDA decode kernel (fasq/kernels/pq_cuda.cu, built with NVRTC; fasq/kernels/cuda_decode.py).

On a machine without a GPU: the launch planning, and a compile check of the source for sm_80 and
sm_90 with nvcc where nvcc is installed.  With a GPU: the kernel against the reference on random
layers (outputs poisoned first), every configuration the planner can pick, the registry's choice,
and CUDA-graph capture.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fasq import reference
from fasq.format import LayerSpec
from fasq.kernels import cuda_decode as cd
from fasq.nn import PQLinear

from conftest import CUDA_RTOL as RTOL, check_cuda_output, check_graph_replay_and_compile, random_pq_layer

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------
# Planning (no GPU).

def test_plan_picks_runs_that_fit_words_spans_and_scale_groups():
    f16 = torch.float16
    c = cd.plan(1, 4096, 4096, 2, 256, 16, 256, f16, "cpu")
    assert (c.bits, c.run, c.repl, c.scales) == (8, 32, True, True)       # a span = 256 columns = one group
    c = cd.plan(1, 4096, 4096, 2, 256, 32, 128, f16, "cpu")
    assert c.run == 16                                                    # groups of 128: spans of 128 columns
    c = cd.plan(1, 4096, 1024, 4, 4096, 32, 128, f16, "cpu")
    assert (c.bits, c.run, c.repl) == (12, 8, False)                      # 32 KiB codebook: one copy
    c = cd.plan(1, 4096, 1024, 2, 64, 16, 256, torch.bfloat16, "cpu")
    assert (c.bits, c.run, c.bf16) == (6, 32, True)
    assert cd.plan(1, 4096, 1024, 2, 256, 1, 4096, f16, "cpu").run == 32  # one scale per row: any span
    c = cd.plan(1, 4096, 1024, 2, 512, 16, 256, f16, "cpu")               # 9-bit codes (K = 512): 9 words a run
    assert (c.bits, c.run, c.repl) == (9, 32, True)                       # 64 KiB: still one copy per lane
    assert cd.plan(1, 3072, 72, 2, 1024, 6, 512, f16, "cpu").run == 16    # 10-bit: 5 words preferred to 10
    # Not served: 9+ tokens, fp32 inputs, d = 3, rows that are not whole spans, groups finer than a span.
    assert cd.plan(9, 4096, 1024, 2, 256, 16, 256, f16, "cpu") is None
    assert cd.plan(1, 4096, 1024, 2, 256, 16, 256, torch.float32, "cpu") is None
    assert cd.plan(1, 4095, 1024, 3, 256, 16, 256, f16, "cpu") is None
    assert cd.plan(1, 72, 40, 2, 256, 1, 72, f16, "cpu") is None
    assert cd.plan(1, 4096, 1024, 2, 256, 128, 32, f16, "cpu") is None


def test_plan_fuses_the_rotation_where_column_ranges_and_shared_memory_allow():
    f16 = torch.float16
    assert cd.plan(1, 4096, 4096, 2, 256, 16, 256, f16, "cpu", rot_block=256).rotb == 256
    assert cd.plan(1, 4096, 4096, 2, 256, 16, 256, f16, "cpu").rotb == 0          # x comes rotated
    assert cd.plan(1, 3072, 72, 2, 1024, 6, 512, f16, "cpu", rot_block=1024).rotb == 1024
    # One span (128 columns) per split cannot hold a 1024-column block: rotate first.
    assert cd.plan(1, 3072, 72, 2, 1024, 6, 512, f16, "cpu", splits=100, rot_block=1024).rotb == 0
    assert cd.plan(1, 4096, 4096, 2, 256, 16, 256, f16, "cpu", rot_block=2048).rotb == 0
    # 8 tokens of 14336 columns do not fit in shared memory next to the codebook; one token does.
    assert cd.plan(8, 14336, 4096, 2, 256, 56, 256, f16, "cpu", rot_block=256, force_rotation=True).rotb == 0
    assert cd.plan(1, 14336, 4096, 2, 256, 56, 256, f16, "cpu", rot_block=256).rotb == 256
    # Every block rotates all its columns for every token: beyond FUSE_LIMIT the separate
    # rotation is cheaper (unless forced).
    assert cd.plan(2, 4096, 4096, 2, 256, 16, 256, f16, "cpu", rot_block=256).rotb == 256
    assert cd.plan(8, 4096, 4096, 2, 256, 16, 256, f16, "cpu", rot_block=256).rotb == 0
    assert cd.plan(2, 14336, 4096, 2, 256, 56, 256, f16, "cpu", rot_block=256).rotb == 0
    assert cd.plan(8, 4096, 4096, 2, 256, 16, 256, f16, "cpu", rot_block=256, force_rotation=True).rotb == 256


def test_plan_splits_cover_every_span_once():
    for out_f, in_f in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (16, 256)):
        for forced in (0, 1, 2, 3, 7, 100):
            c = cd.plan(1, in_f, out_f, 2, 256, in_f // 256, 256, torch.float16, "cpu", splits=forced)
            n_spans = in_f // 2 // (4 * c.run)
            assert 1 <= c.splits <= n_spans
            assert (c.splits - 1) * c.spans_per_split < n_spans <= c.splits * c.spans_per_split


def test_source_compiles_with_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = Path(cd.__file__).with_name(cd.SOURCE)
    configs = [cd.plan(1, 4096, 4096, 2, 256, 16, 256, torch.float16, "cpu"),
               cd.plan(1, 4096, 4096, 2, 256, 16, 256, torch.bfloat16, "cpu", rot_block=256),
               cd.plan(2, 4096, 4096, 2, 64, 16, 256, torch.float16, "cpu", rot_block=16),
               cd.plan(8, 4096, 1024, 2, 64, 16, 256, torch.bfloat16, "cpu", splits=4),
               cd.plan(3, 4096, 1024, 4, 4096, 32, 128, torch.float16, "cpu", nwarps=8, rowt=1),
               cd.plan(1, 4096, 1024, 2, 16, 0, 0, torch.float16, "cpu", rowt=4),
               cd.plan(1, 4096, 14336, 2, 512, 16, 256, torch.float16, "cpu", rot_block=256)]
    configs.append(dataclasses.replace(configs[1], outliers=True))   # FQ_OUTLIERS (FASQ_CUDA_FUSED_OUTLIERS=1)
    for arch in ("sm_80", "sm_90"):
        for cfg in configs:
            for split, bias, fast in ((False, 1, True), (True, 0, True), (False, 3, False)):
                defines = [f"-D{line.split()[1]}={line.split()[2]}" for line in
                           cd._defines(cfg, split, bias, fast).splitlines()]
                r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-o", "/dev/null", *defines, str(src)],
                                   capture_output=True, text=True)
                assert r.returncode == 0, f"{arch} {cfg}: {r.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# GPU only.

@pytest.fixture
def poisoned(monkeypatch):
    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(cd, "_new_buffer", nan_buffer)


CASES = [dict(in_f=4096, out_f=1024, d=2, k=256, group=256, rot=256, bias=True),
         dict(in_f=4096, out_f=1000, d=2, k=256, group=128, rot=256),
         dict(in_f=2048, out_f=520, d=2, k=64, group=256, rot=64, bias=True),
         dict(in_f=2048, out_f=264, d=4, k=4096, group=128, rot=128),
         dict(in_f=1024, out_f=48, d=2, k=16, scales=False),
         dict(in_f=1024, out_f=200, d=4, k=256, group=0, rot=0),
         dict(in_f=3072, out_f=72, d=2, k=1024, group=512, rot=1024),
         dict(in_f=1024, out_f=136, d=2, k=512, group=256, rot=256, bias=True)]


def reference_out(layer, x):
    s = layer.spec
    return reference.pq_linear(x, s, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_cuda_decode_matches_reference(dtype, poisoned):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm_80+")
    for i, kw in enumerate(CASES):
        layer = random_pq_layer(**kw, seed=i, device="cuda")
        s = layer.spec
        n_groups = layer.scales.shape[1]
        for t in (1, 3, 8):
            x = torch.randn(t, s.in_features, device="cuda", dtype=dtype)
            ref = reference_out(layer, x)
            xr = cd.rotate(x, layer.rot_signs, s.rotation_block) if s.rotation_block else x
            for nwarps, rowt, splits in ((8, 1, 0), (16, 1, 0), (2, 4, 100)):
                for fused in (True, False):    # the kernel rotates x / x comes rotated
                    rot = s.rotation_block if fused else 0
                    cfg = cd.plan(t, s.in_features, s.out_features, s.subvector_dim, s.num_centroids, n_groups,
                                  s.effective_group, dtype, "cuda", nwarps=nwarps, rowt=rowt, splits=splits,
                                  rot_block=rot, force_rotation=True)
                    assert cfg is not None, kw
                    y = cd.pq_decode((x if fused else xr).contiguous(), layer.codes, layer.codebooks, layer.scales,
                                     layer.bias, s.in_features, s.subvector_dim, s.effective_group, cfg,
                                     rot_signs=layer.rot_signs, rotation_block=rot)
                    what = f"{kw} tokens={t} {cfg}"
                    check_cuda_output(y, ref, what, dtype)


@gpu
@needs_cuda
def test_gpu_outlier_correction_in_one_launch():
    """A layer with outliers through the registry: the CUDA decode kernel, then the one-launch
    correction (fasq.kernels.triton_kernels.triton_add_outliers), equals the reference."""
    from fasq.kernels import triton_kernels  # noqa: F401  (registers the CUDA outlier adder)
    base = random_pq_layer(4096, 1024, 2, 256, group=256, rot=256, seed=3)
    n = 4096
    spec = LayerSpec(4096, 1024, 2, 256, 1, 256, True, 256, False, n)
    g = torch.Generator().manual_seed(4)
    idx = torch.randperm(4096 * 1024, generator=g)[:n].to(torch.int32)
    val = torch.randn(n, generator=g).half()
    layer = PQLinear.from_tensors(spec, base.codes, base.codebooks, base.scales, base.rot_signs,
                                  outlier_idx=idx, outlier_val=val).to("cuda")
    for t in (1, 5):
        x = torch.randn(t, 4096, device="cuda", dtype=torch.float16)
        ref = reference_out(layer, x).float()
        rows, cols = reference.outlier_rows_cols(layer.outlier_idx, 4096)
        ref = reference.add_outliers_to_output(ref, x.float(), rows, cols, layer.outlier_val)
        y = layer(x)
        err = (y.float() - ref).abs().max().item()
        assert err <= 4e-3 * ref.abs().max().item(), f"tokens={t}: max error {err:.3g}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_outliers_in_the_kernel_epilogue(dtype, poisoned):
    """FQ_OUTLIERS (FASQ_CUDA_FUSED_OUTLIERS=1, off by default until this passes on a card): the kernel
    adds the sparse correction itself, with and without a split of the reduction dim."""
    from fasq.kernels import outlier_csr_cached
    base = random_pq_layer(4096, 1000, 2, 256, group=256, rot=256, seed=6)
    n = 3000
    spec = LayerSpec(4096, 1000, 2, 256, 1, 256, True, 256, False, n)
    g = torch.Generator().manual_seed(8)
    idx = torch.randperm(4096 * 1000, generator=g)[:n].to(torch.int32)
    layer = PQLinear.from_tensors(spec, base.codes, base.codebooks, base.scales, base.rot_signs,
                                  outlier_idx=idx, outlier_val=torch.randn(n, generator=g).half()).to("cuda")
    csr = outlier_csr_cached(layer)
    rows, cols = reference.outlier_rows_cols(layer.outlier_idx, 4096)
    for t in (1, 3):
        x = torch.randn(t, 4096, device="cuda", dtype=dtype)
        ref = reference.add_outliers_to_output(reference_out(layer, x).float(), x.float(), rows, cols,
                                               layer.outlier_val)
        for splits in (0, 3):
            cfg = cd.plan(t, 4096, 1000, 2, 256, 16, 256, dtype, "cuda", splits=splits, rot_block=256)
            cfg = dataclasses.replace(cfg, outliers=True)
            y = cd.pq_decode(x, layer.codes, layer.codebooks, layer.scales, None, 4096, 2, 256, cfg,
                             rot_signs=layer.rot_signs, rotation_block=256, outliers=csr)
            err = (y.float() - ref).abs().max().item()
            assert err <= RTOL[dtype] * ref.abs().max().item(), f"tokens={t} splits={splits}: max error {err:.3g}"


@gpu
@needs_cuda
def test_gpu_cuda_decode_is_the_registry_choice_and_captures_in_a_graph():
    import fasq.kernels as registry
    layer = random_pq_layer(4096, 1024, 2, 256, group=256, rot=256, bias=True, device="cuda")
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    assert registry.select(layer, x1).name == "cuda_decode"
    assert registry.select(layer, torch.randn(9, 4096, device="cuda", dtype=torch.float16)).name != "cuda_decode"
    ref = layer(x1)
    torch.testing.assert_close(ref, reference_out(layer, x1), rtol=0, atol=4e-3 * ref.abs().max().item())
    check_graph_replay_and_compile(layer, x1, ref)
