"""equalize="sampled": channel powers measured on text the model writes itself (fasq.fit.samples)."""
import json
import logging

import torch

import fasq
from fasq import FASQConfig
from fasq.fit import samples
from fasq.fit.equalize import equalize
from fasq.fit.samples import _nucleus, channel_powers, sample_tokens, sampled_powers, start_token

from conftest import tiny_model


def test_samples_start_from_the_start_token_and_repeat_with_the_seed():
    m = tiny_model("llama")
    a = sample_tokens(m, sequences=3, length=12)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.all(a[:, 0] == start_token(m)) and int(a.max()) < m.config.vocab_size and int(a.min()) >= 0
    assert torch.equal(a, sample_tokens(m, sequences=3, length=12))          # same seed, same tokens
    assert not torch.equal(a, sample_tokens(m, sequences=3, length=12, seed=1))
    assert len({tuple(r.tolist()) for r in a}) == 3                           # one batch, different sequences


def test_start_token_falls_back_from_bos_to_eos():
    m = tiny_model("llama")
    m.config.bos_token_id, m.generation_config.bos_token_id = 7, 7
    assert start_token(m) == 7
    m.config.bos_token_id = m.generation_config.bos_token_id = None
    m.config.eos_token_id = m.generation_config.eos_token_id = [5, 9]
    assert start_token(m) == 5


def test_nucleus_keeps_only_the_top_p_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.full((4, 50), -10.0)
    logits[:, 3] = 10.0                                     # 0.99+ of the mass: the nucleus is this token alone
    assert torch.all(_nucleus(logits, 0.95, gen) == 3)
    logits[:, 8] = 10.0                                     # two equal tokens: both in, nothing else
    picks = torch.cat([_nucleus(logits, 0.95, gen) for _ in range(50)])
    assert set(picks.flatten().tolist()) == {3, 8}


def test_channel_powers_are_the_mean_square_of_each_input():
    m = tiny_model("llama")
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    p = channel_powers(m, ids)
    assert len(p) == 2 and [t.shape[0] for t in p[0]] == [64, 64, 136]
    blk = m.model.layers[0]
    with torch.no_grad():
        x = blk.input_layernorm(m.model.embed_tokens(ids))               # q/k/v's input in the first block
    torch.testing.assert_close(p[0][0], x.pow(2).mean((0, 1)), rtol=1e-5, atol=1e-7)
    assert all(bool((t >= 0).all()) and t.dtype == torch.float32 for blk_p in p for t in blk_p)


def test_sampled_mode_weighs_columns_by_the_measured_power():
    """The q/k/v columns are scaled by p ** (POWER_EXPONENT / 2) (geometric mean 1) for the measured p."""
    m = tiny_model("llama")
    w0 = m.model.layers[1].self_attn.q_proj.weight.detach().clone()
    p = sampled_powers(m)
    equalize(m, "sampled", powers=p)
    s = (m.model.layers[1].self_attn.q_proj.weight / w0)[0]
    want = p[1][0].pow(0.25)
    torch.testing.assert_close(s, want / torch.exp(want.log().mean()), rtol=1e-4, atol=1e-6)


def test_quantize_sampled_records_the_mode_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "LENGTH", 16)
    m = tiny_model("qwen3")
    fasq.quantize(m, FASQConfig(codebook_size=16, equalize="sampled"), progress=False)
    fasq.save(m, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["equalize"] == "sampled"
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, fasq.load(tmp_path / "q")(ids).logits)


def test_streaming_samples_where_the_model_fits_its_budget_and_says_when_not(caplog):
    from fasq.stream.run import streamable

    cfg = FASQConfig(equalize="sampled")
    assert streamable(cfg, model_bytes=100, budget=100) == cfg
    with caplog.at_level(logging.WARNING):
        assert streamable(cfg, model_bytes=101, budget=100) == cfg.replace(equalize="power")
    assert "equalize='sampled' samples text with the whole model" in caplog.text
    assert streamable(FASQConfig(equalize="full"), model_bytes=101, budget=100).equalize == "full"
