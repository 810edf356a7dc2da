"""The v2 CUDA decode kernel (fasq.kernels.cuda_decode_v2) on a GPU, against the reference and against
its CPU emulator; and, without a GPU, its opt-in registry entry.

GPU tests (``@pytest.mark.gpu``, skipped without CUDA; ``scripts/gpu_check.sh`` runs them): every
buffer the kernel writes starts as NaN; 8- and 6-bit codes, awkward shapes (rows and columns that end
inside a tile and a span), bias, rotation, per-row / per-group / no scales; 1-16 tokens; forced splits
of the reduction dim; fused q/k/v and gate/up launches; bit-exact against the emulator on dyadic values
(where every order of summation gives the same bits); deterministic across runs and CUDA-graph replays.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fasq import reference
from fasq.format import LayerSpec, pack_codes
from fasq.kernels import cuda_decode_v2 as V
from fasq.kernels import cuda_emulate as E
from fasq.kernels import cuda_layout as L
from fasq.kernels.cuda_common import rotate
from fasq.nn import PQLinear

from conftest import CUDA_RTOL as RTOL, check_cuda_output as _check, random_pq_layer

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                reason="needs a CUDA GPU, sm_80+")
LAYERS = [dict(in_f=4096, out_f=1024, d=2, k=256, group=256, rot=256, bias=True),
          dict(in_f=2048, out_f=520, d=2, k=64, group=256, rot=64),
          dict(in_f=1000, out_f=33, d=2, k=256, group=0, bias=True),
          dict(in_f=1024, out_f=200, d=2, k=64, scales=False),
          dict(in_f=14336, out_f=64, d=2, k=256, group=128, rot=256)]
TOKENS = (1, 2, 3, 8, 9, 16)


def test_registry_entry_is_opt_in():
    """Without FASQ_CUDA_V2=1 importing the module registers nothing (the v1 kernel stays the default)."""
    code = ("import fasq.kernels as K, fasq.kernels.cuda_decode_v2 as V; "
            "print(V.ENABLED, 'cuda_decode_v2' in [k.name for k in K.kernels()])")
    for env, want in (("0", "False False"), ("1", "True True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "FASQ_CUDA_V2": env}).stdout.strip()
        assert out == want


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(V, "_new_buffer", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_v2_matches_reference(dtype, poisoned):
    for i, kw in enumerate(LAYERS):
        layer = random_pq_layer(**kw, seed=i, device="cuda")
        s = layer.spec
        ops = V.layer_operands([layer])
        for t in TOKENS:
            x = torch.randn(t, s.in_features, device="cuda", dtype=dtype)
            ref = reference.pq_linear(x, s, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias)
            _check(V.layer_linear(x, layer), ref, f"{kw} tokens={t}", dtype)
            xr = rotate(x, layer.rot_signs, s.rotation_block) if s.rotation_block else x
            for slices in (1, ops.layout.n_spans):   # no split; every span its own slice
                launch = V.plan(ops.layout, t, dtype, slices=slices)
                if launch is not None:
                    _check(V.run(xr.contiguous(), ops, slices), ref, f"{kw} tokens={t} slices={slices}", dtype)
            assert int(ops.counters.abs().sum()) == 0, "split counters not reset"


@gpu
@needs_cuda
@pytest.mark.parametrize("k", [256, 64])
def test_gpu_v2_bit_exact_against_the_emulator(k, poisoned):
    """Dyadic values: the kernel's bits equal the emulator's (and the reference's) exactly."""
    gen = torch.Generator().manual_seed(k)
    spec = LayerSpec(in_features=1000, out_features=40, subvector_dim=2, num_centroids=k, group_size=256)
    codes = pack_codes(torch.randint(0, k, (1, 40, spec.n_sub), generator=gen), spec.bits)
    cb = (torch.randint(-8, 9, (1, k, 2), generator=gen).float() / 8).half()
    sc = (2.0 ** torch.randint(-2, 2, (40, spec.n_groups), generator=gen).float()).half()
    lay = L.repack(spec, codes, sc)
    ops = V.operands(L.repack(spec, codes.cuda(), sc.cuda()), [cb[0].cuda()], [None])
    for t in (1, 5, 16):
        x = (torch.randint(-8, 9, (t, 1000), generator=gen).float() / 4).half()
        for slices in (1, 2, 4, 8):
            want = E.emulate_linear(lay, [cb[0]], x, V.ROWT, slices)
            got = V.run(x.cuda(), ops, slices).cpu()
            assert torch.equal(got, want), f"k={k} tokens={t} slices={slices}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_v2_fused_qkv_and_gate_up(dtype, poisoned):
    g = torch.Generator().manual_seed(0)
    signs = (torch.randint(0, 2, (1024,), generator=g) * 2 - 1).to(torch.int8)
    for k, outs in ((256, (1024, 256, 256)), (64, (2816, 2816)), (256, (520, 40))):
        layers = [random_pq_layer(1024, o, 2, k, group=256, rot=256, bias=i == 0, seed=i, device="cuda")
                  for i, o in enumerate(outs)]
        for lay in layers:
            lay.rot_signs.copy_(signs.cuda())       # one rotation serves all (the fit must share signs)
        if len(layers) > 2 and torch.cuda.get_device_properties(0).shared_memory_per_block_optin < 192 * 1024:
            continue                                 # three tables need two 64 KiB regions + alignment
        for t in (1, 4, 16):
            x = torch.randn(t, 1024, device="cuda", dtype=dtype)
            ys = V.fused_linear(x, layers)
            for lay, y in zip(layers, ys):
                s = lay.spec
                ref = reference.pq_linear(x, s, lay.codes, lay.codebooks, lay.scales, lay.rot_signs, lay.bias)
                _check(y, ref, f"fused {outs} k={k} tokens={t}", dtype)


@gpu
@needs_cuda
def test_gpu_v2_deterministic_and_graph_replay():
    layer = random_pq_layer(4096, 1024, 2, 256, group=256, rot=256, seed=3, device="cuda")
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    ops = V.layer_operands([layer])
    first = V.layer_linear(x, layer)
    for _ in range(3):
        assert torch.equal(V.layer_linear(x, layer), first)      # split-K in slice order: same bits
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = V.layer_linear(static_x, layer)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, first)
    assert int(ops.counters.abs().sum()) == 0


def test_fused_rejects_layers_that_cannot_share_a_launch():
    a = random_pq_layer(512, 64, 2, 256, group=256, rot=256, seed=0)
    b = random_pq_layer(512, 64, 2, 256, group=256, rot=256, seed=1)    # other signs
    assert "rotation signs" in V.check_fusable([a, b])
    c = random_pq_layer(512, 64, 2, 64, group=256, rot=256, seed=0)
    assert "code width" in V.check_fusable([a, c])
    assert V.check_fusable([a, a]) == ""
    with pytest.raises(ValueError, match="rotation signs"):
        V.fused_linear(torch.randn(1, 512), [a, b])
    assert isinstance(a, PQLinear)


def test_gpu_v2_benchmark_dry_run(tmp_path):
    """benchmarks/gpu_v2.py on the CPU: the emulator's checks pass and the targets JSON has the issue's
    format, every row unmeasured."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import gpu_v2
    finally:
        sys.path.pop(0)
    assert gpu_v2.main(["--dry-run", "--out", str(tmp_path / "v2.json"), "--targets", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert set(t) >= {"card", "date", "commit", "targets"} and len(t["targets"]) == len(gpu_v2.TARGETS)
    assert all(set(r) == {"name", "goal", "measured", "unit"} and r["measured"] is None for r in t["targets"])


def test_gpu_check_script_keeps_its_time_guards(tmp_path):
    """scripts/gpu_check.sh with DRY=1 and a 14 s total: steps past the total are skipped, not run, and
    steps.json (valid JSON) says so."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "DRY": "1", "TOTAL_S": "14", "OUT": str(tmp_path)}, timeout=120)
    steps = json.loads((tmp_path / "steps.json").read_text())
    names = [s["step"] for s in steps["steps"]]
    assert names[0] == "env" and {"tests_v2", "v2", "e2e", "static_v2"} <= set(names), r.stdout[-2000:]
    assert steps["elapsed_s"] <= 14 + 10
    assert any(s.get("skipped") == "no time left" for s in steps["steps"])


def test_e2e_harness_runs_fasq_linears_as_their_dense_weights():
    """benchmarks/gpu_e2e.py's model with fasq linears (fused q/k/v and gate/up on the CPU path) gives
    the logits of the same model with those layers' dequantized weights as dense linears: the harness
    wires the fused outputs (q/k/v split, gate/up chunk) right.  Null linears change the logits."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import gpu_e2e as H
    finally:
        sys.path.pop(0)
    cfg = H.Cfg(dim=128, n_layers=2, n_heads=4, n_kv=2, inter=256, vocab=100, max_seq=32)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    fasq = H.Model(cfg, "4bit d2 K256", dev, torch.float32).eval()
    torch.manual_seed(0)
    dense = H.Model(cfg, "fp16", dev, torch.float32).eval()
    torch.manual_seed(0)
    null = H.Model(cfg, "null", dev, torch.float32).eval()
    with torch.no_grad():
        for bf, bd in zip(fasq.blocks, dense.blocks):
            for name in ("wqkv", "wo", "w13", "w2"):
                m = getattr(bf, name)
                parts = m.layers if isinstance(m, H.FasqFused) else [m]
                getattr(bd, name).weight.copy_(torch.cat([p.dequantize() for p in parts]))
        assert torch.equal(fasq.emb.weight, dense.emb.weight) and torch.equal(fasq.head.weight, null.head.weight)
        tokens, pos = torch.randint(0, 100, (1, 12)), torch.arange(12)
        yf, yd, yn = fasq(tokens, pos), dense(tokens, pos), null(tokens, pos)
    assert (yf - yd).abs().max() <= 1e-3 * yd.abs().max()
    assert (yf - yn).abs().max() > 0.05 * yd.abs().max()
    assert H.linear_bytes(fasq) < H.linear_bytes(dense) / 3
