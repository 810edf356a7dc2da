"""Quantized token embedding and (tied) head: lookup against the reference, the tie through quantize, copies,
save/load, from_pretrained and streaming, size accounting, whole-model size targets, old formats."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

import fasq
from fasq import kernels, reference
from fasq.embedding import PQEmbedding
from fasq.io import FormatError
from fasq.nn import PQLinear

from conftest import random_pq_layer, tiny_model

CFG = fasq.FASQConfig(codebook_size=16, quantize_embeddings=True, embedding_codebook_size=64, outlier_fraction=0.003)


def _table(vocab=300, hidden=64, outliers=40, seed=0, rot=32, group=32):
    """A random PQ table [vocab, hidden] with rotation, scales and an (unsorted) outlier table."""
    lin = random_pq_layer(hidden, vocab, 2, 16, group=group, rot=rot, seed=seed)
    spec = dataclasses.replace(lin.spec, n_outliers=outliers)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(vocab * hidden, generator=g)[:outliers].to(torch.int32)   # any order loads
    val = torch.randn(outliers, generator=g).half()
    tensors = {n: getattr(lin, n) for n in ("codes", "codebooks", "scales", "rot_signs")}
    return spec, {**tensors, "outlier_idx": idx, "outlier_val": val}


@pytest.mark.parametrize("outliers,rot,length", [(0, 0, 17), (40, 32, 17), (200, 64, 17), (200, 32, 40)])
def test_lookup_equals_reference_rows(outliers, rot, length):
    """A few ids are decoded as they come (a decode step), many each distinct one once (length 40: 120 ids)."""
    spec, t = _table(outliers=outliers, rot=rot, group=32 if rot != 64 else 0)
    emb = PQEmbedding.from_tensors(spec, t, embed_scale=1.5)
    full = reference.add_outliers_to_weight(
        reference.dequantize(spec, t["codes"], t["codebooks"], t["scales"], t["rot_signs"]),
        (t["outlier_idx"], t["outlier_val"]) if outliers else None)
    ids = torch.randint(0, spec.out_features, (3, length), generator=torch.Generator().manual_seed(2))
    ids[0, :4] = ids[1, 0]                                   # repeated ids are decoded once, returned each time
    rows = torch.unique(t["outlier_idx"].long() // spec.in_features) if outliers else torch.tensor([], dtype=torch.long)
    ids[2, : min(17, rows.numel())] = rows[:17]              # rows that hold outliers
    got = emb(ids)
    assert got.shape == (3, length, spec.in_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[ids] * 1.5, rtol=0, atol=1e-6)
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, spec.in_features)
    with pytest.raises(IndexError, match="token ids"):
        emb(torch.tensor([spec.out_features]))


def test_lookup_follows_model_dtype_and_table_keeps_its_own():
    spec, t = _table()
    emb = PQEmbedding.from_tensors(spec, t).to(torch.bfloat16)
    assert emb(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    assert emb.codes.dtype == torch.int32 and emb.codebooks.dtype == torch.float16


@pytest.mark.parametrize("arch", ["llama", "gemma3"])   # untied head; tied head (Gemma's scaled embedding)
def test_quantize_ties_head_and_embedding(arch):
    model = tiny_model(arch)
    orig = model.get_input_embeddings().weight.detach().clone()
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    emb, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(emb, PQEmbedding) and isinstance(head, PQLinear)
    tied = model.config.tie_word_embeddings
    assert (emb.tied_head is head) == tied
    if tied:   # one table: the embedding holds no buffers, the head's are stored
        assert not any(n in dict(emb.named_buffers()) for n in ("codes", "codebooks"))
        assert not any(k.startswith("model.embed_tokens.") for k in model.state_dict())
    err = (emb.dequantize() - orig).norm() / orig.norm()
    assert err < 0.25                                          # 3 bits/weight (d=2, K=64) of a random matrix
    ids = torch.randint(0, 320, (2, 9))
    scale = 64 ** 0.5 if arch == "gemma3" else 1.0               # Gemma scales rows by sqrt(hidden)
    torch.testing.assert_close(emb(ids), emb.dequantize()[ids] * scale, rtol=1e-6, atol=1e-6)
    model.tie_weights()                                        # transformers' call must leave the PQ tie alone
    assert model.lm_head is head and model.get_input_embeddings() is emb


def test_head_runs_through_the_kernel_registry(monkeypatch):
    model = tiny_model("gemma3")
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    calls = []
    real = kernels.pq_linear
    monkeypatch.setattr(kernels, "pq_linear", lambda x, layer: calls.append(layer) or real(x, layer))
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 5)))
    assert model.lm_head in calls


def test_tie_survives_copy_pickle_and_to():
    model = tiny_model("gemma3")
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    ids = torch.randint(0, 320, (1, 7))
    ref = model(ids).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).to("cpu")):
        assert other.get_input_embeddings().tied_head is other.lm_head
        torch.testing.assert_close(other(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_size_report_counts_the_table_once(arch):
    plain, quant = tiny_model(arch), tiny_model(arch)
    fasq.quantize(plain, CFG.replace(quantize_embeddings=False), progress=False, num_workers=1)
    fasq.quantize(quant, CFG, progress=False, num_workers=1)
    a, b = fasq.model_size_report(plain), fasq.model_size_report(quant)
    assert a["bits_per_weight"] == b["bits_per_weight"]        # the body is the same
    spec = quant.get_input_embeddings().spec
    tables = 1 if quant.config.tie_word_embeddings else 2
    assert b["embedding_bytes"] == tables * spec.weight_storage_bytes()
    assert b["embedding_weights"] == tables * 320 * 64
    assert a["fp16_bytes"] == b["fp16_bytes"]
    # the 16-bit table(s) became the quantized ones: exactly that many bytes fewer
    assert a["total_bytes"] - b["total_bytes"] == tables * 2 * 320 * 64 - b["embedding_bytes"]
    assert b["model_bits_per_weight"] == pytest.approx(16 * b["fraction_of_fp16"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_save_load_round_trip_and_format_versions(tmp_path, arch):
    model = tiny_model(arch)
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    fasq.save(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["quantize_embeddings"] is True
    assert json.loads((tmp_path / "q" / "fasq.json").read_text())["format_version"] == 2
    loaded = fasq.load(tmp_path / "q")
    ids = torch.randint(0, 320, (2, 11))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (loaded.get_input_embeddings().tied_head is loaded.lm_head) == model.config.tie_word_embeddings
    assert fasq.model_size_report(loaded)["total_bytes"] == fasq.model_size_report(model)["total_bytes"]
    # a model without quantized embeddings is still written as format version 1, without the new fields
    plain = tiny_model(arch)
    fasq.quantize(plain, fasq.FASQConfig(codebook_size=16), progress=False, num_workers=1)
    fasq.save(plain, tmp_path / "p")
    qc1 = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc1["format_version"] == 1 and "embeddings" not in qc1
    assert not {"quantize_embeddings", "embedding_codebook_size", "size_scope"} & set(qc1)
    assert json.loads((tmp_path / "p" / "fasq.json").read_text())["format_version"] == 1
    assert isinstance(fasq.load(tmp_path / "p").get_input_embeddings(), torch.nn.Embedding)
    bf16 = fasq.load(tmp_path / "q", dtype=torch.bfloat16)       # lookups follow the dtype the model loads in
    assert bf16.get_input_embeddings()(ids).dtype == torch.bfloat16


def test_bad_embedding_records_are_refused(tmp_path):
    model = tiny_model("gemma3")
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    fasq.save(model, tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    good = json.loads(cfg_file.read_text())
    for change, match in [(lambda qc: qc.update(format_version=1), "needs format_version 2"),
                          (lambda qc: qc["embeddings"]["model.embed_tokens"].update(tied_head="nope"), "tied to"),
                          (lambda qc: qc["embeddings"]["model.embed_tokens"].update(num_centroids=1), "num_centroids"),
                          (lambda qc: qc.update(format_version=3), "format_version=3")]:
        bad = copy.deepcopy(good)
        change(bad["quantization_config"])
        cfg_file.write_text(json.dumps(bad))
        with pytest.raises(FormatError, match=match):
            fasq.load(tmp_path / "q", verify=False)


def test_from_pretrained_loads_the_tied_table(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gemma3")
    fasq.quantize(model, CFG, progress=False, num_workers=1)
    fasq.save(model, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert hf.get_input_embeddings().tied_head is hf.lm_head
    ids = torch.randint(0, 320, (1, 6))
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0)
    dense = hf.dequantize()                                   # back to nn.Embedding / nn.Linear, still tied
    assert type(dense.get_input_embeddings()) is torch.nn.Embedding
    assert dense.lm_head.weight is dense.get_input_embeddings().weight
    torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gemma3", torch.float32)])
def test_streaming_equals_in_memory(tmp_path, arch, dtype):
    from fasq.stream import quantize_checkpoint, verify
    from test_stream import assert_same_tensors, in_memory, make_checkpoint, stored_tensors

    src = make_checkpoint(tmp_path / "src", arch, dtype)
    r = quantize_checkpoint(src, tmp_path / "out", CFG, workers=2, max_shard_size="40KB", progress=False)
    ref = in_memory(src, dtype, CFG, tmp_path / "ref")
    assert_same_tensors(stored_tensors(ref), stored_tensors(tmp_path / "out"))
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "out") == qc(ref)
    rep = fasq.model_size_report(fasq.load(ref))
    for k in ("total_bytes", "fp16_bytes", "embedding_bytes", "quantized_bytes"):
        assert r[k] == rep[k], k
    verify(tmp_path / "out")


def test_one_shot_equals_table_added_afterwards():
    """benchmarks/embedding.py quantizes the body once and adds the table to copies: the same model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from embedding import original_tables, restore_tables

    cfg = fasq.preset("4bit", quantize_embeddings=True, embedding_codebook_size=64)
    for arch in ("llama", "gemma3"):
        one = tiny_model(arch)
        fasq.quantize(one, cfg, progress=False, num_workers=1)
        two = tiny_model(arch)
        tables = original_tables(two)
        fasq.quantize(two, cfg.replace(quantize_embeddings=False), progress=False, num_workers=1)
        restore_tables(two, tables)
        fasq.quantize(two, cfg.replace(equalize="none", target_bits=None), progress=False, num_workers=1)
        ids = torch.randint(0, 320, (2, 8))
        torch.testing.assert_close(two(ids).logits, one(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_whole_model_size_target(arch):
    """--size-of model: target bits/weight of the whole model (tables counted at their quantized size)."""
    target = 5.0
    model = tiny_model(arch)
    fasq.quantize(model, CFG.replace(size_scope="model"), target_bits=target, progress=False, num_workers=1)
    rep = fasq.model_size_report(model)
    assert rep["model_bits_per_weight"] <= target + 1e-9
    assert rep["model_bits_per_weight"] > target - 0.5          # the menu's steps on a tiny model
    alloc = model.config.quantization_config["allocation"]
    assert alloc["size_scope"] == "model" and alloc["target_bits"] == target
    lin = tiny_model(arch)                                       # the default scope: bits of the body's linears
    fasq.quantize(lin, CFG, target_bits=target, progress=False, num_workers=1)
    assert fasq.model_size_report(lin)["bits_per_weight"] <= target + 1e-9


def test_config_fields_are_checked():
    with pytest.raises(ValueError, match="embedding_codebook_size"):
        fasq.FASQConfig(embedding_codebook_size=1)
    with pytest.raises(ValueError, match="size_scope"):
        fasq.FASQConfig(size_scope="all")
    with pytest.raises(ValueError, match="quantize_embeddings"):
        fasq.FASQConfig(quantize_embeddings=1)
    c = fasq.FASQConfig(quantize_embeddings=True, embedding_subvector_dim=1, embedding_codebook_size=256)
    assert fasq.FASQConfig.from_dict(c.to_dict()) == c
    e = c.embedding_config()
    assert (e.subvector_dim, e.codebook_size, e.target_bits) == (1, 256, None)


def test_cli_flags_and_info(model_dir, tmp_path, capsys):
    """--quantize-embeddings through `fasq quantize` (a local checkpoint streams), `fasq info` shows the table."""
    from fasq.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "-o", str(out), "-k", "16", "--quantize-embeddings",
                 "--embedding-codebook-size", "32", "--bits", "5", "--size-of", "model", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedding/head table" in text and "of the whole model" in text
    model = fasq.load(out)
    assert isinstance(model.get_input_embeddings(), PQEmbedding)
    assert model.get_input_embeddings().spec.num_centroids == 32
    assert fasq.model_size_report(model)["model_bits_per_weight"] <= 5.0 + 1e-9
