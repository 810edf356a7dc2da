"""Error feedback (fasq.fit.feedback): GPTQ's update over sub-vectors, against input covariances measured on
text the model samples itself."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import fasq
from fasq.config import preset
from fasq.fit import feedback
from fasq.fit.kmeans import assign
from fasq.fit.pq import quantize_weight
from fasq.fit.samples import sample_tokens
from fasq.nn import PQLinear
from fasq.reference import rotate

from conftest import tiny_config, tiny_model


def _weighted_error(w, wq, h):
    d = w - wq
    return float(torch.einsum("ij,jk,ik->", d, h, d))


def _correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few strong, correlated directions, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim)[:, None]
    return torch.randn(n, dim, generator=g) @ mix


def _stored_weight(spec, t):
    return PQLinear.from_tensors(spec, **t).dequantize()


def test_identity_covariance_codes_each_sub_vector_by_its_nearest_centroid():
    """With H = I nothing is pushed onto other columns: the codes are the plain nearest-centroid codes."""
    g = torch.Generator().manual_seed(0)
    w, book = torch.randn(16, 64, generator=g), torch.randn(32, 2, generator=g)
    s = w.reshape(16, 2, 32).abs().amax(-1)
    codes = feedback.feedback_codes(w, s, 32, book, 64, torch.eye(64))
    plain = assign((w.reshape(16, 2, 32) / s[..., None]).reshape(-1, 2), book)
    assert torch.equal(codes, plain)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_feedback_lowers_the_output_error_it_measures(rotation):
    """On the inputs whose covariance it was given, a layer coded with feedback has a smaller output error
    (W - Q) x than one coded sub-vector by sub-vector, with or without the rotation, outliers included."""
    x = _correlated(2048, 128)
    h = x.T @ x / x.shape[0]
    w = torch.randn(96, 128)
    cfg = fasq.FASQConfig(codebook_size=16, group_size=64, rotation=rotation, rotation_block=32)
    spec, plain = quantize_weight(w, cfg, "layer")
    spec2, fed = quantize_weight(w, cfg, "layer", hessian=h)
    assert spec2 == spec and torch.equal(fed["scales"], plain["scales"])
    assert torch.equal(fed["codebooks"], plain["codebooks"]) and not torch.equal(fed["codes"], plain["codes"])
    e_plain, e_fed = (_weighted_error(w, _stored_weight(spec, t), h) for t in (plain, fed))
    assert e_fed < 0.7 * e_plain


def test_rotated_covariance_is_that_of_the_rotated_inputs():
    x = _correlated(512, 64)
    signs = (torch.randint(0, 2, (64,)) * 2 - 1).to(torch.int8)
    xr = rotate(x, signs, 16)
    assert torch.allclose(feedback.rotated(x.T @ x, signs, 16), xr.T @ xr, rtol=1e-4, atol=1e-3)
    assert feedback.rotated(x.T @ x, signs, 0) is not None


def test_covariances_are_each_inputs_second_moment_shared_where_inputs_are(llama):
    ids = torch.randint(0, 320, (3, 10))
    names = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.0." in n]
    cov = feedback.covariances(llama, ids, names)
    assert set(cov) == set(names)
    a = "model.layers.0.self_attn."
    assert cov[a + "q_proj"] is cov[a + "k_proj"] is cov[a + "v_proj"]    # one input, one matrix
    assert cov[a + "o_proj"] is not cov[a + "q_proj"]
    seen = []
    hook = llama.get_submodule("model.layers.0.mlp.down_proj").register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1]).detach()))
    for row in ids:
        llama(input_ids=row[None], use_cache=False)
    hook.remove()
    x = torch.cat(seen)
    assert torch.allclose(cov["model.layers.0.mlp.down_proj"], x.T @ x / ids.numel(), rtol=1e-4, atol=1e-6)


def _linears(model, part=".layers."):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and part in n]


def test_steps_go_block_by_block(llama):
    names = _linears(llama)
    steps = [sorted(s) for s in feedback.sequential_covariances(llama, torch.randint(0, 320, (2, 8)), names)]
    assert steps == [sorted(n for n in names if f".layers.{i}." in n) for i in range(len(llama.model.layers))]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_each_step_measures_the_model_as_the_steps_before_it_left_it(arch):
    """Changing each step's layers before the next (as the caller quantizes them) gives every later block's layers
    the covariance of the changed model's inputs, exactly as whole forwards of that model measure it: the blocks
    are replayed one by one with each block's own masks and position embeddings (Gemma 3 mixes sliding and full
    attention)."""
    def make():
        if arch == "llama":
            return tiny_model(arch).eval()
        from transformers import AutoModelForCausalLM
        cfg = tiny_config(arch, 320)
        cfg.sliding_window, cfg.layer_types = 4, ["sliding_attention", "full_attention"]   # masks differ by block
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    model = make()
    ids = torch.randint(0, 320, (3, 12))
    names = _linears(model)
    got = {}
    for step in feedback.sequential_covariances(model, ids, names):
        got.update(step)
        for n in step:
            with torch.no_grad():
                model.get_submodule(n).weight.mul_(0.5).add_(0.01)   # any change, as quantizing makes one
    want = feedback.covariances(make(), ids, names[:1])  # the first layer sees the unchanged model
    assert torch.allclose(got[names[0]], want[names[0]], rtol=1e-4, atol=1e-6)
    changed = make()
    for n in names:
        if ".layers.0." in n:
            with torch.no_grad():
                changed.get_submodule(n).weight.mul_(0.5).add_(0.01)
    later = [n for n in names if ".layers.1." in n]
    want = feedback.covariances(changed, ids, later)
    assert all(torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6) for n in later)


def test_a_layer_no_sample_reaches_is_in_a_step_without_a_covariance(llama):
    """(an MoE expert never routed to): it is still fit, with the plain codes."""
    llama.model.layers[0].mlp.unused = torch.nn.Linear(64, 64)
    names = _linears(llama)
    steps = list(feedback.sequential_covariances(llama, torch.randint(0, 320, (2, 8)), names))
    assert sorted(n for s in steps for n in s) == sorted(names)
    assert [s["model.layers.0.mlp.unused"] for s in steps if "model.layers.0.mlp.unused" in s] == [None]


def test_blocks_that_cannot_be_called_alone_are_measured_by_whole_forwards(llama, monkeypatch, caplog):
    monkeypatch.setattr(feedback, "_replays", lambda *a: False)
    ids = torch.randint(0, 320, (2, 8))
    names = _linears(llama)
    with caplog.at_level("WARNING"):
        steps = list(feedback.sequential_covariances(llama, ids, names))
    assert "cannot be called one by one" in caplog.text
    assert len(steps) == 1 and set(steps[0]) == set(names)
    want = feedback.covariances(llama, ids, names)
    assert all(torch.equal(steps[0][n], want[n]) for n in names)


def test_a_second_block_never_called_falls_back_to_whole_forwards(caplog):
    """A list of blocks of which the forward calls only the first (as an early-exit model might): nothing to check
    the replay against, so whole forwards measure, and the unreached block's layers get no covariance."""
    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2))

        def forward(self, input_ids, **_):
            return self.layers[0](self.emb(input_ids))

    torch.manual_seed(0)
    model = TwoBlocks().eval()
    ids = torch.randint(0, 16, (2, 5))
    with caplog.at_level("WARNING"):
        steps = list(feedback.sequential_covariances(model, ids, ["layers.0.0", "layers.1.0"]))
    assert "cannot be called one by one" in caplog.text
    got = {n: h for s in steps for n, h in s.items()}
    assert got["layers.1.0"] is None
    assert torch.allclose(got["layers.0.0"], feedback.covariances(model, ids, ["layers.0.0"])["layers.0.0"])


def test_a_split_block_is_measured_group_after_group(llama):
    """The ``split`` hook (experiments: GPTQ's "true sequential" order): each group is a step of its own, measured
    with the groups before it changed as the caller changes them."""
    names = _linears(llama)
    attn = lambda ns: [[n for n in ns if ".self_attn." in n], [n for n in ns if ".mlp." in n]]   # noqa: E731
    ids = torch.randint(0, 320, (2, 8))
    changed = copy.deepcopy(llama)
    steps, got = [], {}
    for step in feedback.sequential_covariances(llama, ids, names, split=lambda b, p, x, c, ns: attn(ns)):
        steps.append(sorted(step))
        got.update(step)
        for n in step:
            with torch.no_grad():
                llama.get_submodule(n).weight.mul_(0.5)
    want = [sorted(g) for i in range(len(llama.model.layers))
            for g in attn([n for n in names if f".layers.{i}." in n])]
    assert steps == want
    first_attn, first_mlp = attn([n for n in names if ".layers.0." in n])
    for n in first_attn:
        with torch.no_grad():
            changed.get_submodule(n).weight.mul_(0.5)
    measured = feedback.covariances(changed, ids, first_mlp)
    assert all(torch.allclose(got[n], measured[n], rtol=1e-4, atol=1e-6) for n in first_mlp)


def test_passes_split_by_bytes_and_keep_every_layer(llama):
    names = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    one = feedback.covariance_passes(llama, names)
    assert one == [names]
    small = feedback.covariance_passes(llama, names, limit=1)
    assert [n for p in small for n in p] == names and all(len(p) == 1 for p in small)


def test_quantize_with_feedback_records_it_reloads_and_workers_do_not_change_it(tmp_path, monkeypatch):
    """fasq.quantize(error_feedback=True): the codes do not depend on how many threads fit the layers; the saved
    model records the feedback and reloads."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 16)
    cfg = preset("4bit", error_feedback=True, sample_sequences=3, target_bits=None)
    a = fasq.quantize(tiny_model("llama"), cfg, progress=False, num_workers=2)
    b = fasq.quantize(tiny_model("llama"), cfg, progress=False, num_workers=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = fasq.quantize(tiny_model("llama"), cfg.replace(error_feedback=False), progress=False)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.codes"], c.state_dict()["model.layers.0.mlp.up_proj.codes"])
    fasq.save(a, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["error_feedback"] is True and qc["sample_sequences"] == 3
    ids = torch.randint(0, 320, (1, 12))
    assert torch.equal(fasq.load(tmp_path / "q")(ids).logits, a(ids).logits)


def test_feedback_lowers_the_model_error_on_its_own_samples(monkeypatch):
    """The whole model: on text it samples (another seed than the one measured), the quantized model with
    feedback stays closer to the original than without."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 32)
    ref = tiny_model("llama").eval()
    ids = sample_tokens(ref, sequences=4, length=32, seed=5)
    want = ref(ids).logits
    err = {}
    for fb in (False, True):
        m = fasq.quantize(tiny_model("llama"), preset("4bit", error_feedback=fb, target_bits=None), progress=False)
        err[fb] = float((m(ids).logits - want).pow(2).mean())
    assert err[True] < err[False]


def test_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="sample_sequences"):
        fasq.FASQConfig(sample_sequences=0)
    with pytest.raises(ValueError, match="error_feedback"):
        fasq.FASQConfig(error_feedback="yes")
    assert "error_feedback" not in fasq.FASQConfig().to_dict()    # older fasq versions read configs without it
    assert fasq.FASQConfig.from_dict(fasq.FASQConfig(error_feedback=True).to_dict()).error_feedback


def test_a_covariance_that_cannot_be_used_leaves_the_plain_codes(caplog):
    w = torch.randn(8, 64)
    cfg = fasq.FASQConfig(codebook_size=16, group_size=32)
    _, plain = quantize_weight(w, cfg, "layer")
    for bad in (torch.full((64, 64), float("nan")), -torch.eye(64) * 1e30):
        _, t = quantize_weight(w, cfg, "layer", hessian=bad)
        assert torch.equal(t["codes"], plain["codes"])
    _, t = quantize_weight(w, cfg, "layer", hessian=torch.zeros(64, 64))    # dead inputs: nothing to weigh
    assert torch.equal(t["codes"], plain["codes"])
    assert "coding without it" in caplog.text
