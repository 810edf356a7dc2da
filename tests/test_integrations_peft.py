"""LoRA on fasq models with PEFT and the HF Trainer (src/fasq/integrations/peft.py, PQLinear's backward)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import fasq  # noqa: E402
from fasq import FASQConfig  # noqa: E402
from fasq.integrations import register_transformers  # noqa: E402
from fasq.integrations.peft import PQLoraLinear  # noqa: E402
from fasq.nn import PQLinear  # noqa: E402

from conftest import SAMPLE_TEXT, make_tokenizer, random_pq_layer, tiny_model  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    register_transformers()
    cfg = FASQConfig(codebook_size=16, outlier_fraction=0.002)
    model = fasq.quantize(tiny_model("llama"), cfg, progress=False)
    out = tmp_path_factory.mktemp("peft") / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    return out


def from_pretrained(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def lora(model, seed=0):
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      lora_dropout=0.0, init_lora_weights=False))


def batch(n=4, length=32):
    ids = make_tokenizer()(SAMPLE_TEXT, return_tensors="pt").input_ids[0]
    ids = torch.stack([ids[i * length:(i + 1) * length] for i in range(n)])
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("kw", [dict(), dict(rot=16, bias=True, group=32)])
def test_backward_to_the_input_matches_the_dequantized_weight(kw):
    layer = random_pq_layer(64, 48, 2, 16, seed=3, **kw)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    dy = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, dy @ layer.dequantize(), rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


def test_lora_gradients_equal_those_of_the_dequantized_model(saved):
    """Every LoRA gradient, through every PQLinear backward, equals the one through plain nn.Linear layers
    holding the dequantized weights."""
    pq = lora(from_pretrained(saved))
    plain = lora(from_pretrained(saved).dequantize())
    assert isinstance(pq.base_model.model.model.layers[0].mlp.up_proj, PQLoraLinear)
    assert isinstance(pq.base_model.model.model.layers[0].mlp.up_proj.base_layer, PQLinear)
    b = batch(2, 16)
    pq(**b).loss.backward()
    plain(**b).loss.backward()
    grads = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=2e-4, atol=1e-6)


def test_trainer_lowers_the_loss_and_adapters_reload(saved, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lora(from_pretrained(saved))
    b = batch()
    with torch.no_grad():
        before = model(**b).loss.item()
    data = [{k: v[i] for k, v in b.items()} for i in range(len(b["input_ids"]))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, learning_rate=1e-2,
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = model(**b).loss.item()
        logits = model(**b).logits
    assert after < 0.8 * before, (before, after)

    model.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(from_pretrained(saved), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(**b).logits, logits)


def test_merge_says_why_it_cannot(saved):
    model = lora(from_pretrained(saved))
    with pytest.raises(NotImplementedError, match="re-quantizing"):
        model.merge_and_unload()


@pytest.mark.parametrize("kw, match", [(dict(use_dora=True), "variants"), (dict(lora_bias=True), "lora_bias")])
def test_what_needs_the_base_weight_is_refused(saved, kw, match):
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(from_pretrained(saved), peft.LoraConfig(r=2, target_modules=["q_proj"], **kw))


def test_peft_dispatch_registers_without_import_fasq(saved):
    """A fresh interpreter with the installed hook (what fasq-hook.pth runs): import peft, load, attach LoRA."""
    code = ("import _fasq_hook; _fasq_hook.install()\n"
            "import sys, torch, peft\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=['q_proj']))\n"
            "assert type(m.base_model.model.model.layers[0].self_attn.q_proj).__name__ == 'PQLoraLinear'\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code, str(saved)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
