import math

import pytest
import torch

from fasq.eval import perplexity
from fasq.eval.texts import load_text, reflow, wikitext_join

from conftest import SAMPLE_TEXT, tiny_model


def test_perplexity_windows_and_bits_per_byte(tokenizer):
    model = tiny_model("llama")
    r = perplexity(model, tokenizer, SAMPLE_TEXT, context_length=32, max_tokens=200, progress=False)
    assert r["windows"] == 200 // 32 and r["tokens_scored"] == r["windows"] * 31
    assert math.isclose(r["perplexity"], math.exp(r["nll_per_token"]))
    assert r["bits_per_byte"] == pytest.approx(r["nll_per_token"] * r["tokens_scored"] / math.log(2)
                                               / r["bytes_scored"])
    # a random model is near-uniform over its 320-token vocabulary
    assert 50 < r["perplexity"] < 5000


def test_perplexity_matches_manual_loss(tokenizer):
    model = tiny_model("llama")
    ids = torch.tensor(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:64]).view(2, 32)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    r = perplexity(model, tokenizer, SAMPLE_TEXT, context_length=32, max_tokens=64, progress=False)
    assert r["nll_per_token"] == pytest.approx(float(loss), rel=1e-5)


def test_large_vocabulary_scores_fewer_windows_per_forward(tokenizer, monkeypatch):
    """Logits are capped at LOGITS_BUDGET bytes per forward (Gemma-3's 262k vocabulary): the same windows and
    the same score, in smaller batches."""
    import sys

    ppl = sys.modules["fasq.eval.perplexity"]       # the module (fasq.eval re-exports the function by its name)

    model = tiny_model("llama")
    full = perplexity(model, tokenizer, SAMPLE_TEXT, context_length=32, max_tokens=200, progress=False)
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    monkeypatch.setattr(ppl, "LOGITS_BUDGET", 2 * 32 * 320 * 4)     # two windows of fp32 logits
    capped = perplexity(model, tokenizer, SAMPLE_TEXT, context_length=32, max_tokens=200, progress=False)
    assert max(seen) == 2 and sum(seen) == full["windows"]
    assert capped["nll_per_token"] == pytest.approx(full["nll_per_token"], rel=1e-6)


def test_too_short_text(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model("llama"), tokenizer, "hi", context_length=32, progress=False)


def test_reflow():
    assert reflow("a hard\nwrapped line\n\n\nnext\npara\n") == "a hard wrapped line\n\nnext para"


def test_text_file_and_unknown_source(text_file):
    assert load_text(str(text_file)) == SAMPLE_TEXT
    with pytest.raises(ValueError, match="not a file"):
        load_text("no-such-corpus")


def test_wikitext_format_local():
    # rows as `datasets` gives them for wikitext-2-raw-v1: title lines, blanks, paragraphs with newlines
    rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a game . \n", ""]
    text = wikitext_join(rows)
    assert text == " = Valkyria Chronicles III = \n Senjō no Valkyria 3 is a game . \n"


def test_wikitext_through_datasets_with_local_file(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    p = tmp_path / "wiki.parquet"
    datasets.Dataset.from_dict({"text": ["", " = T = \n", " body . \n"]}).to_parquet(str(p))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: real("parquet", data_files=str(p), split="train"))
    assert load_text("wikitext2") == " = T = \n body . \n"
