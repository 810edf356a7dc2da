"""fasq.distill: the continuous parameters of a quantized model tuned to the original model's outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

import fasq
from fasq.distill import DistillSettings, _kl, distill
from fasq.fit.samples import sample_tokens
from fasq.nn import PQLinear

CFG = fasq.FASQConfig(subvector_dim=2, codebook_size=16, group_size=32, kmeans_iters=8, outlier_fraction=0.0)


def _quantized(arch: str = "llama"):
    teacher = tiny_model(arch)
    model = fasq.quantize(copy.deepcopy(teacher), CFG, progress=False)
    return model, teacher


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_distill_lowers_the_divergence_on_text_it_did_not_tune_on(arch):
    model, teacher = _quantized(arch)
    train = sample_tokens(teacher, sequences=8, length=48, seed=1)
    held_out = sample_tokens(teacher, sequences=8, length=48, seed=2)
    with torch.no_grad():
        before = _kl(model, teacher, held_out).item()
    r = distill(model, teacher, DistillSettings(steps=24, batch=4, lr_norms=1e-2, lr_scales=1e-2, lr_codebooks=3e-3),
                ids=train, progress=False)
    with torch.no_grad():
        after = _kl(model, teacher, held_out).item()
    assert len(r["kl"]) == 24 and r["parameters"] > 0
    assert after < 0.9 * before, (before, after)


def test_distill_changes_only_scales_codebooks_and_norms_and_keeps_the_format(tmp_path, tokenizer):
    model, teacher = _quantized("gemma3")   # tied head: the head's (and the embedding's) table stays as it was
    before, norms = _buffers(model), {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    for n, p in model.named_parameters():
        p.requires_grad_("layers.0" in n)
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, PQLinear)}
    distill(model, teacher, DistillSettings(steps=4, batch=2, lr_norms=1e-2, lr_scales=1e-2, lr_codebooks=1e-2),
            ids=sample_tokens(teacher, sequences=4, length=32, seed=1), progress=False)
    after = _buffers(model)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith((".scales", ".codebooks")) for n in changed), changed
    assert not any("lm_head" in n or "embed" in n for n in changed)
    assert all(after[n].dtype == before[n].dtype for n in before)
    assert {n: m.spec for n, m in model.named_modules() if isinstance(m, PQLinear)} == specs
    assert any(not torch.equal(p, norms[n]) for n, p in model.named_parameters() if "norm" in n)
    assert all(p.requires_grad == ("layers.0" in n) for n, p in model.named_parameters())   # as they were
    # Saved and loaded, the tuned model is the same model.
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    fasq.save(model, tmp_path / "q", tokenizer=tokenizer)
    loaded = fasq.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_an_interrupted_distill_leaves_the_model_as_it_was(monkeypatch):
    import fasq.distill as mod

    model, teacher = _quantized()
    before = {**_buffers(model), **{n: p.detach().clone() for n, p in model.named_parameters()}}
    real, calls = mod._kl, []

    def failing(student, t, ids):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(student, t, ids)

    monkeypatch.setattr(mod, "_kl", failing)
    with pytest.raises(KeyboardInterrupt):
        distill(model, teacher, DistillSettings(steps=5, batch=2, lr_norms=1e-2),
                ids=sample_tokens(teacher, sequences=4, length=16, seed=1), progress=False)
    after = {**_buffers(model), **{n: p.detach() for n, p in model.named_parameters()}}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(isinstance(m, PQLinear) for n, m in model.named_modules() if n.endswith("proj"))


def test_settings_and_an_unquantized_model_are_refused():
    with pytest.raises(ValueError, match="steps"):
        DistillSettings(steps=0)
    with pytest.raises(ValueError, match="lr_scales"):
        DistillSettings(lr_scales=-1.0)
    with pytest.raises(ValueError, match="nothing would be tuned"):
        DistillSettings(lr_norms=0.0, lr_scales=0.0, lr_codebooks=0.0)
    with pytest.raises(ValueError, match="micro_batch"):
        DistillSettings(micro_batch=0)
    teacher = tiny_model()
    with pytest.raises(ValueError, match="no quantized"):
        distill(copy.deepcopy(teacher), teacher, progress=False)


def test_cli_quantize_distills_in_memory(model_dir, tmp_path, capsys):
    from fasq.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "-o", str(out), "-d", "2", "-k", "16", "--group-size", "32",
                 "--distill-steps", "2", "--json", "-q"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["distill"]["steps"] == 2 and r["distill"]["kl_first"] > 0
    assert fasq.load(out) is not None


def test_cli_distill_sequences(model_dir, tmp_path, capsys):
    """--distill-sequences (fasq distill --sequences) sets how many sequences are sampled; alone it is refused."""
    from fasq.cli import main

    quant = ["-d", "2", "-k", "16", "--group-size", "32", "--json", "-q"]
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "q"), *quant, "--distill-steps", "1",
                 "--distill-sequences", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["distill"]["sequences"] == 5
    assert main(["distill", str(tmp_path / "q"), "-o", str(tmp_path / "d"), "--steps", "1", "--sequences", "6",
                 "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["distill"]["sequences"] == 6
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "x"), *quant, "--distill-sequences", "5"]) == 2
    assert "--distill-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_rate_of_zero_leaves_that_part_as_it_was():
    model, teacher = _quantized()
    before = _buffers(model)
    distill(model, teacher, DistillSettings(steps=3, batch=2, lr_norms=1e-2, lr_scales=0.0, lr_codebooks=0.0),
            ids=sample_tokens(teacher, sequences=4, length=16, seed=1), progress=False)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_a_bf16_model_gets_steps_smaller_than_its_rounding():
    """Steps of 1e-3 on bf16 gains near 1 (spacing 2^-7) round away one by one: fp32 copies take them."""
    model, teacher = _quantized()
    model, teacher = model.to(torch.bfloat16), teacher.to(torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    distill(model, teacher, DistillSettings(steps=12, batch=2, lr_norms=1e-3, lr_scales=0.0, lr_codebooks=0.0),
            ids=sample_tokens(teacher, sequences=4, length=16, seed=1), progress=False)
    after = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    assert sum(int((after[n] != before[n]).sum()) for n in before) > 0


def test_micro_batches_take_the_same_steps_as_the_whole_batch():
    """The gradient summed over micro-batches (each layer's weight built once a step) is the whole batch's."""
    model, teacher = _quantized("gemma3")
    ids = sample_tokens(teacher, sequences=8, length=24, seed=1)
    runs = []
    for micro in (4, 1, 3):   # 3: an uneven last micro-batch
        m = copy.deepcopy(model)
        r = distill(m, teacher, DistillSettings(steps=3, batch=4, lr_norms=1e-2, lr_scales=1e-2, lr_codebooks=1e-2,
                                                micro_batch=micro), ids=ids, progress=False)
        assert r["micro_batch"] == micro
        runs.append((r, {**_buffers(m), **{n: p.detach() for n, p in m.named_parameters()}}))
    (whole, params), *parts = runs
    assert any(not torch.equal(b, params[n]) for n, b in _buffers(model).items())   # it did tune
    for r, other in parts:
        torch.testing.assert_close(r["kl"], whole["kl"], rtol=1e-5, atol=1e-7)
        for n in params:
            torch.testing.assert_close(other[n].float(), params[n].float(), rtol=1e-3, atol=1e-3)
    assert whole["kl_last"] == pytest.approx(sum(whole["kl"]) / 3) and whole["kl_first"] == whole["kl"][0]


def test_the_micro_batch_keeps_the_logits_under_the_budget(monkeypatch):
    import fasq.distill as mod

    model, _ = _quantized()
    vocab = model.config.vocab_size
    monkeypatch.setattr(mod, "LOGITS_BYTES", 4 * 16 * vocab * 3)   # three sequences of 16 tokens
    assert mod.micro_batch(DistillSettings(batch=8), model, 16) == 3
    assert mod.micro_batch(DistillSettings(batch=2), model, 16) == 2
    assert mod.micro_batch(DistillSettings(batch=8), model, 1000) == 1   # never fewer than one
    assert mod.micro_batch(DistillSettings(batch=8, micro_batch=5), model, 1000) == 5


def test_cli_distill_of_a_saved_model_is_quantize_with_distill_steps(model_dir, tmp_path, capsys):
    """`fasq quantize` then `fasq distill` gives the model `fasq quantize --distill-steps` gives, and keeps the
    manifest's source the original (so `fasq eval --reference` still finds it)."""
    from fasq.cli import main
    from fasq.io import source_of

    quant = ["-d", "2", "-k", "16", "--group-size", "32", "-q"]
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "one"), *quant, "--distill-steps", "2"]) == 0
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "q"), *quant]) == 0
    capsys.readouterr()
    assert main(["distill", str(tmp_path / "q"), "-o", str(tmp_path / "two"), "--steps", "2", "--json", "-q",
                 "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["distill"]["steps"] == 2 and r["distill"]["kl_first"] > 0 and r["distill"]["seed"] == 0
    one, two, q = (fasq.load(tmp_path / n) for n in ("one", "two", "q"))
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(two(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)
    assert source_of(tmp_path / "two") == source_of(tmp_path / "q") == str(model_dir.resolve())


def test_cli_distill_refuses_what_it_cannot_tune(model_dir, tmp_path, capsys):
    from fasq.cli import main

    assert main(["distill", str(model_dir), "-o", str(tmp_path / "d"), "-q"]) == 2   # not quantized
    assert "not a fasq-quantized directory" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "q"), "-d", "2", "-k", "16", "-q"]) == 0
    assert main(["distill", str(tmp_path / "q"), "-o", str(tmp_path / "q"), "--overwrite", "-q"]) == 2
    assert "input model" in capsys.readouterr().err
    if not torch.cuda.is_available():   # a device the machine lacks is refused before anything loads
        with pytest.raises(SystemExit):
            main(["distill", str(tmp_path / "q"), "-o", str(tmp_path / "d"), "--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", str(tmp_path / "q"), "-o", str(tmp_path / "d"), "--device", "banana"])
    assert "not a device" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
