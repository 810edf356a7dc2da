import pytest
import torch

import fasq
from fasq import FASQConfig
from fasq.fit.equalize import equalize

from conftest import ARCHS, tiny_model


def with_random_norms(arch):
    m = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.1)
    return m


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["norms", "full"])
def test_equalize_preserves_the_function(arch, mode):
    m = with_random_norms(arch)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    done = equalize(m, mode)
    assert done["norms_folded"] == 4  # two blocks, two norms each
    if mode == "full":
        assert done["mlp_balanced"] == 2 and done["attention_balanced"] == 2
    with torch.no_grad():
        out = m(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_folded_norms_become_identity():
    m = with_random_norms("llama")
    equalize(m, "norms")
    assert torch.all(m.model.layers[0].input_layernorm.weight == 1)
    m = with_random_norms("gemma")     # Gemma's norm multiplies by (1 + weight)
    equalize(m, "norms")
    assert torch.all(m.model.layers[0].input_layernorm.weight == 0)


def test_quantize_with_equalize_saves_and_loads(tmp_path):
    m = with_random_norms("llama")
    fasq.quantize(m, FASQConfig(codebook_size=16, equalize="full"), progress=False)
    fasq.save(m, tmp_path / "q")
    loaded = fasq.load(tmp_path / "q")
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, loaded(ids).logits)


def test_bad_mode():
    with pytest.raises(ValueError, match="equalize='max'"):
        equalize(tiny_model("llama"), "max")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["power", "sampled"])
def test_power_mode_preserves_the_function(arch, mode, monkeypatch):
    """equalize="power" ("sampled") scales q/k/v and gate/up columns by the estimated (measured) input power and
    divides the norm gains by the same factors, then balances: exact in real arithmetic."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 32)
    m = with_random_norms(arch)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    done = equalize(m, mode)
    assert done["inputs_scaled"] == 4 and done["mlp_balanced"] == 2
    with torch.no_grad():
        out = m(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_residual_power_follows_what_the_weights_write():
    """The data-free residual model: a channel that every block's o_proj and down_proj write ten times more
    strongly, or that a Gemma 3 post-norm multiplies by 10, carries more power into the next block."""
    from fasq.fit.equalize import block_input_powers

    for arch in ("llama", "gemma3"):
        m = with_random_norms(arch)
        base = block_input_powers(m)
        with torch.no_grad():
            for blk in m.model.layers:
                if arch == "gemma3":
                    blk.post_feedforward_layernorm.weight[5] = 9.0     # gain 1 + 9
                else:
                    blk.mlp.down_proj.weight[5].mul_(10.0)
        boosted = block_input_powers(m)
        ratio = lambda p: float(p[5] / p.mean())  # noqa: E731
        # block 1's attention input: after block 0 wrote channel 5 more strongly
        assert ratio(boosted[1][0]) > 2 * ratio(base[1][0]), arch


def test_residual_moments_see_always_on_units():
    """A direction that every token's embedding shares makes the MLP units that read it "always on": their
    down_proj inputs are far larger than the rest's.  Where blocks normalize their outputs (Gemma 3) the residual
    model tracks the stream's mean, so it ranks such a unit first; the same per-channel power with no shared
    direction (each row's sign flipped at random) does not make it stand out.  Without output norms (Llama) the
    mean is not tracked and no unit estimate is given (balance keeps its own)."""
    from fasq.fit.equalize import block_input_powers

    g = torch.Generator().manual_seed(3)
    inner = {}
    for shared in (True, False):
        m = tiny_model("gemma3")
        emb = m.get_input_embeddings().weight
        hidden = emb.shape[1]
        c = torch.randn(hidden, generator=g)
        c = c / c.norm() * 2.0 * emb.detach().norm(dim=1).mean()
        with torch.no_grad():
            sign = torch.ones(emb.shape[0], 1) if shared else torch.randint(0, 2, (emb.shape[0], 1), generator=g) * 2.0 - 1
            emb.add_(sign * c)
            mlp = m.model.layers[0].mlp
            u = c / c.norm() * mlp.gate_proj.weight.norm(dim=1).mean()
            mlp.gate_proj.weight[7] = u
            mlp.up_proj.weight[7] = u
        inner[shared] = block_input_powers(m)[0][2]
    on, off = inner[True], inner[False]
    assert int(on.argmax()) == 7 and float(on[7] / on.median()) > 20
    assert float(off[7] / off.median()) < 0.25 * float(on[7] / on.median())
    assert all(p[2] is None for p in block_input_powers(tiny_model("llama")))
