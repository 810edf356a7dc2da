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
