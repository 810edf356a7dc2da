"""The blocked fit (fasq.fit.pq._quantize_blocked): embedding tables and large matrices fit in blocks of rows."""
import pytest
import torch

from fasq import FASQConfig
from fasq.fit.kmeans import sample_indices
from fasq.fit.pq import CHUNK_FROM_WEIGHTS, NonFiniteWeightError, fit_block_rows, quantize_weight
from fasq.nn import PQLinear

CONFIGS = [
    FASQConfig(),
    FASQConfig(subvector_dim=1, codebook_size=16, num_codebooks=2, group_size=32),
    FASQConfig(scale_mode="none", rotation="none"),
    FASQConfig(subvector_dim=3, codebook_size=100, group_size=12, outlier_fraction=0.01),
]


def ids(c):
    return f"d{c.subvector_dim}K{c.codebook_size}M{c.num_codebooks}g{c.group_size}{c.rotation}{c.scale_mode}"


def assert_same(a, b):
    (sa, ta), (sb, tb) = a, b
    assert sa == sb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def rel_err(spec, t, w):
    q = PQLinear.from_tensors(spec, **t).dequantize()
    return float((q - w).norm() / w.norm())


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
@pytest.mark.parametrize("block_rows", [300, 64, 7, 1000])
def test_blocked_equals_whole_when_every_subvector_is_sampled(cfg, block_rows):
    # 300 x 100 at d <= 3 has fewer sub-vectors than kmeans_max_points: both fits train on all of them,
    # so any block size (one block covering all rows, or many) gives the whole-matrix fit bit for bit.
    torch.manual_seed(0)
    w = torch.randn(300, 100) * 0.05
    whole = quantize_weight(w, cfg, "table", block_rows=0)
    assert_same(whole, quantize_weight(w, cfg, "table", block_rows=block_rows))
    assert_same(whole, quantize_weight(w, cfg, "table", table=True))   # the default block covers all rows


def test_blocked_depends_on_neither_block_size_nor_threads():
    # More sub-vectors than the sample (the case of a real table): the sample is drawn from the index
    # range alone, so blocks and threads do not change the result.
    torch.manual_seed(1)
    w = torch.randn(700, 64)
    cfg = FASQConfig(subvector_dim=1, codebook_size=32, kmeans_max_points=1024)
    ref = quantize_weight(w, cfg, "emb", block_rows=700)
    for rows in (1, 33, 256):
        assert_same(ref, quantize_weight(w, cfg, "emb", block_rows=rows))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_weight(w, cfg, "emb", block_rows=33)
        torch.set_num_threads(2)
        two = quantize_weight(w, cfg, "emb", block_rows=33)
    finally:
        torch.set_num_threads(threads)
    assert_same(ref, one)
    assert_same(ref, two)


def test_blocked_error_within_one_percent_of_whole():
    # Sampled differently (sample_indices vs randperm), so not equal: as accurate.  At d=2, K=256 two
    # samples of 16384 of the 131072 sub-vectors give errors within 0.7% of each other (3 tables); at d=1
    # k-means itself varies by about 2% from sample to sample, whole or blocked alike, so d=1 is not held
    # to 1% here (Gemma's and SmolLM2's 1:256 tables: perplexity within 0.02% of the whole fit's).
    torch.manual_seed(0)
    w = torch.randn(2048, 128) * 0.02
    cfg = FASQConfig(subvector_dim=2, codebook_size=256, kmeans_max_points=16384)
    whole = rel_err(*quantize_weight(w, cfg, "emb", block_rows=0), w)
    blocked = rel_err(*quantize_weight(w, cfg, "emb", block_rows=100), w)
    assert abs(blocked - whole) <= 0.01 * whole, (blocked, whole)


def test_outliers_are_the_global_top_magnitudes_ties_to_the_lowest_index():
    torch.manual_seed(3)
    w = (torch.randn(400, 50) * 4).round() / 4      # few distinct values: many ties at the threshold
    cfg = FASQConfig(subvector_dim=1, codebook_size=16, outlier_fraction=0.01)
    n = 200
    a = w.reshape(-1).abs()
    order = sorted(range(a.numel()), key=lambda i: (-float(a[i]), i))
    expect = torch.tensor(sorted(order[:n]), dtype=torch.int32)
    for rows in (400, 9, 1):
        spec, t = quantize_weight(w, cfg, "emb", block_rows=rows)
        assert spec.n_outliers == n
        assert torch.equal(t["outlier_idx"], expect)
        q = PQLinear.from_tensors(spec, **t).dequantize()
        flat = expect.long()
        torch.testing.assert_close(q.reshape(-1)[flat], w.reshape(-1)[flat], atol=2e-3, rtol=1e-3)


def test_blocked_keeps_the_callers_tensor_and_refuses_non_finite():
    w = torch.randn(50, 40)
    before = w.clone()
    quantize_weight(w, FASQConfig(codebook_size=16), "emb", table=True)
    assert torch.equal(w, before)
    w[7, 3] = float("nan")
    w[40, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError, match="'emb'.* 2 NaN/Inf"):
        quantize_weight(w, FASQConfig(codebook_size=16), "emb", block_rows=10)


def test_bf16_table_fits_in_blocks():
    torch.manual_seed(4)
    w = (torch.randn(500, 64) * 0.03).to(torch.bfloat16)
    cfg = FASQConfig(subvector_dim=1, codebook_size=64, kmeans_max_points=1024)
    spec, t = quantize_weight(w, cfg, "emb", block_rows=37)
    assert rel_err(spec, t, w.float()) < 0.05
    assert_same((spec, t), quantize_weight(w, cfg, "emb", block_rows=500))


def test_sample_indices_distinct_sorted_and_deterministic():
    for total, n in [(10, 20), (3000, 1000), (10**9, 5000)]:
        idx = sample_indices(total, n, torch.Generator().manual_seed(0))
        assert idx.shape[0] == min(total, n)
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < total
        assert torch.equal(idx, sample_indices(total, n, torch.Generator().manual_seed(0)))


def test_which_weights_are_blocked():
    assert fit_block_rows(14336, 4096) == 0                      # an 8B-class linear: unchanged, whole
    assert fit_block_rows(CHUNK_FROM_WEIGHTS // 1024 + 1, 1024) > 0
    assert fit_block_rows(1000, 64, table=True) > 0              # an embedding table always


@pytest.mark.parametrize("arch", ["llama", "gemma3"])   # untied head and table; tied (one table, the head's)
def test_quantize_fits_tables_blocked_and_linears_whole(arch, monkeypatch):
    import fasq.model
    from conftest import tiny_model
    from fasq.planning import plan_quantization

    cfg = FASQConfig(codebook_size=16, quantize_embeddings=True, embedding_codebook_size=64)
    model = tiny_model(arch)
    plan = plan_quantization(model, cfg)
    assert [lp.name for lp in plan.layers if lp.table] == ["lm_head"]
    calls = {}
    real = fasq.model.quantize_weight

    def spy(weight, config, name, **kw):
        calls[name] = kw.get("table", False)
        return real(weight, config, name, **kw)

    monkeypatch.setattr(fasq.model, "quantize_weight", spy)
    fasq.model.quantize(model, cfg, progress=False, num_workers=1)
    tables = {n for n, t in calls.items() if t}
    assert tables == ({"lm_head"} if model.config.tie_word_embeddings else {"lm_head", "model.embed_tokens"})
