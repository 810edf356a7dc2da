import pytest
import torch

from fasq import FASQConfig
from fasq.fit.kmeans import kmeans
from fasq.fit.pq import NonFiniteWeightError, quantize_weight
from fasq.nn import PQLinear


def rel_err(spec, t, w):
    q = PQLinear.from_tensors(spec, **t).dequantize()
    return float((q - w).norm() / w.norm())


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_quantize_is_deterministic_for_a_seed(backend):
    pytest.importorskip("faiss") if backend == "faiss" else None
    w = torch.randn(48, 96)
    cfg = FASQConfig(codebook_size=32, kmeans_backend=backend)
    a = quantize_weight(w, cfg, "layer")[1]
    b = quantize_weight(w, cfg, "layer")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = quantize_weight(w, cfg.replace(seed=1), "layer")[1]
    assert not torch.equal(a["codebooks"], c["codebooks"])


@pytest.mark.parametrize("cfg", [
    FASQConfig(),
    FASQConfig(rotation="none", group_size=0),
    FASQConfig(subvector_dim=3, codebook_size=100, group_size=12),
    FASQConfig(num_codebooks=2, codebook_size=16, subvector_dim=4, group_size=32),
    FASQConfig(scale_mode="none", rotation="none"),
    FASQConfig(scale_mode="absmax", refine_iters=0),
], ids=lambda c: f"d{c.subvector_dim}K{c.codebook_size}M{c.num_codebooks}g{c.group_size}{c.rotation}{c.scale_mode}")
def test_error_small_and_format_consistent(cfg):
    torch.manual_seed(0)
    w = torch.randn(64, 200) * 0.05
    spec, t = quantize_weight(w, cfg, "x")
    assert rel_err(spec, t, w) < 0.45
    for name, shape in spec.buffer_shapes().items():
        assert tuple(t[name].shape) == shape, name


def test_more_bits_means_less_error():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    errs = [rel_err(*quantize_weight(w, FASQConfig(codebook_size=k), "x"), w) for k in (16, 64, 256)]
    assert errs[0] > errs[1] > errs[2]


def test_residual_codebook_reduces_error():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    one = rel_err(*quantize_weight(w, FASQConfig(codebook_size=16), "x"), w)
    two = rel_err(*quantize_weight(w, FASQConfig(codebook_size=16, num_codebooks=2), "x"), w)
    assert two < 0.8 * one


@pytest.mark.parametrize("in_features", [1, 5, 37, 130])
def test_any_in_features(in_features):
    w = torch.randn(9, in_features)
    spec, t = quantize_weight(w, FASQConfig(subvector_dim=4, codebook_size=16, group_size=8), "odd")
    q = PQLinear.from_tensors(spec, **t)
    assert q.dequantize().shape == (9, in_features)
    assert q(torch.randn(2, in_features)).shape == (2, 9)


def test_codebook_larger_than_data():
    w = torch.randn(4, 8)   # 16 sub-vectors, K = 65536
    spec, t = quantize_weight(w, FASQConfig(codebook_size=65536, rotation="none", scale_mode="none"), "tiny")
    assert rel_err(spec, t, w) < 1e-3  # every sub-vector gets its own centroid (fp16 rounding only)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_layer(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(NonFiniteWeightError, match="model.layers.3.mlp.up_proj"):
        quantize_weight(w, FASQConfig(), "model.layers.3.mlp.up_proj")


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4, 4, 4), FASQConfig(), "conv")


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = centres[torch.randint(0, 4, (2000,), generator=g)] + 0.1 * torch.randn(2000, 2, generator=g)
    for backend in ("torch", "faiss"):
        if backend == "faiss":
            pytest.importorskip("faiss")
        c, a = kmeans(x, 4, backend=backend, seed=0)
        err = (x - c[a]).pow(2).sum(1).mean()
        assert float(err) < 0.05, backend


def test_outliers_are_exact_and_cut_the_error():
    """The largest weights leave the matrix and come back exactly through the sparse side table."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 200, generator=gen)
    planted = [(3, 7, 40.0), (10, 190, -35.0), (47, 0, 25.0)]
    for r, c, v in planted:
        w[r, c] = v
    before = w.clone()
    cfg = FASQConfig(subvector_dim=2, codebook_size=16, group_size=40, outlier_fraction=0.001)
    spec, t = quantize_weight(w, cfg, "layer")
    assert torch.equal(w, before)                         # the caller's tensor is untouched
    assert spec.n_outliers == round(0.001 * w.numel()) and t["outlier_idx"].shape == (spec.n_outliers,)
    q = PQLinear.from_tensors(spec, **t)
    wd = q.dequantize()
    for r, c, v in planted:
        assert abs(float(wd[r, c]) - v) <= 0.02 * abs(v)  # fp16 rounding of the correction only
    s0, t0 = quantize_weight(w, cfg.replace(outlier_fraction=0.0), "layer")
    err = lambda m: float((m.dequantize() - w).norm() / w.norm())  # noqa: E731
    assert err(q) < 0.95 * err(PQLinear.from_tensors(s0, **t0))
    assert spec.storage_bytes() - s0.storage_bytes() == 6 * spec.n_outliers
    x = torch.randn(3, 5, 200, generator=gen)
    torch.testing.assert_close(q(x), x @ wd.T, rtol=1e-4, atol=1e-4)  # the kernels' output gets the correction


def test_outlier_fraction_validated():
    with pytest.raises(ValueError, match="outlier_fraction"):
        FASQConfig(outlier_fraction=0.5)
    assert FASQConfig(outlier_fraction=0).outlier_fraction == 0.0
