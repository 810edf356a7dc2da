"""fasq.sweep on a tiny random Llama: the CI-sized sweep (original, two fasq settings, RTN) writes its
JSON, table and plot; fasq's recorded sizes equal its stored bytes; a rerun resumes from the cache;
``methods`` re-runs only the selected rows.  Baseline adapters run when their library is installed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fasq.sweep import Point, SweepSettings, parse_setting, run_sweep
from fasq.sweep import runner as runner_mod
from fasq.sweep.points import default_points, fasq_config

from conftest import SAMPLE_TEXT, make_tokenizer, tiny_model

FASQ_POINTS = [Point("fasq", {"subvector_dim": 2, "codebook_size": 16, "group_size": 32}),
               Point("fasq", {"subvector_dim": 1, "codebook_size": 8, "group_size": 32})]
POINTS = [Point("original"), *FASQ_POINTS, Point("rtn", {"bits": 4, "group_size": 32})]


@pytest.fixture(scope="module")
def settings(model_dir, tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("\n\n".join([SAMPLE_TEXT] * 3))
    return SweepSettings(model=str(model_dir), text=str(text), context_length=64, max_tokens=256, batch_size=4,
                         threads=1)


@pytest.fixture(scope="module")
def swept(settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (doc,) = run_sweep(settings, out, points=POINTS, progress=False, command="pytest", isolate=False).values()
    return out, doc


def test_outputs_written(swept):
    out, doc = swept
    assert [r["status"] for r in doc["rows"]] == ["ok"] * 4, [r.get("error") for r in doc["rows"]]
    for name in ("results.json", "table.md", "plot.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "runs").glob("*.json"))) == 4
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]
    table = (out / "table.md").read_text()
    assert "| fasq | d=2 K=16 group_size=32 |" in table and "| RTN | 4-bit g32 |" in table
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # every row was scored on the same tokens
    assert len({r["eval_tokens_sha256"] for r in doc["rows"]}) == 1
    orig = next(r for r in doc["rows"] if r["method"] == "original")
    assert orig["bits_per_weight"] == 16.0 and orig["fraction_of_fp16"] == 1.0
    for r in doc["rows"]:
        assert r["perplexity"] > 1 and r["bits_per_byte"] > 0
        if r["method"] != "original":
            assert r["dequant_check"]["max_relative_error"] < 1e-3
            assert r["quantize_seconds"] >= 0 and r["peak_rss_mb"] > 0


def test_fasq_sizes_equal_stored_bytes(swept, tmp_path):
    """The recorded size of each fasq row is what fasq.save writes and what PQLinear holds."""
    from safetensors import safe_open

    import fasq
    from fasq.model import pq_layers

    _, doc = swept
    for r in (r for r in doc["rows"] if r["method"] == "fasq"):
        model = fasq.quantize(tiny_model("llama"), fasq_config(r["settings"]), progress=False)
        layer_bytes = sum(b.numel() * b.element_size() for _, m in pq_layers(model)
                          for n, b in m.named_buffers() if n != "bias")
        assert r["size"]["quantized_bytes"] == layer_bytes
        path = fasq.save(model, tmp_path / r["key"])
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert r["size"]["total_bytes"] == stored
        assert r["bits_per_weight"] == pytest.approx(8 * layer_bytes / r["size"]["quantized_weights"])


def test_rtn_size_accounting(swept):
    _, doc = swept
    r = next(r for r in doc["rows"] if r["method"] == "rtn")
    # tiny llama: in_features 64 (q,k,v,o,gate,up) and 136 (down); 4-bit codes in 32-bit words per row,
    # fp16 scale + fp16 min per group of 32 columns
    expected = 0
    for out_f, in_f in [(64, 64), (32, 64), (32, 64), (64, 64), (136, 64), (136, 64), (64, 136)]:
        expected += out_f * (-(-in_f * 4 // 32) * 4 + -(-in_f // 32) * 4)
    assert r["size"]["quantized_bytes"] == 2 * expected
    assert r["size"]["stored_tensors"].keys() == {"codes", "scales", "mins"}


def test_resume_and_methods(swept, settings, monkeypatch):
    out, doc = swept
    calls = []
    real = runner_mod.run_point
    monkeypatch.setattr(runner_mod, "run_point", lambda p, *a, **k: calls.append(p.key) or real(p, *a, **k))
    (again,) = run_sweep(settings, out, points=POINTS, progress=False, isolate=False).values()
    assert calls == [] and [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in doc["rows"]]
    # only fasq re-runs (forced); the other rows are carried over from results.json
    (again,) = run_sweep(settings, out, points=FASQ_POINTS, force=True, progress=False, isolate=False).values()
    assert sorted(calls) == sorted(p.key for p in FASQ_POINTS)
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in doc["rows"]]


def test_worker_process_and_failure(settings, tmp_path):
    """Points run in their own processes: one succeeds (with its own peak RSS), one fails and is recorded."""
    bad = Point("fasq", {"subvector_dim": 2, "codebook_size": 16, "kmeans_max_points": 10})
    texts = [settings.text, settings.text.replace("text.txt", "text2.txt")]
    Path(texts[1]).write_text("\n\n".join([SAMPLE_TEXT[::-1]] * 3))
    docs = run_sweep(settings, tmp_path, texts=texts, points=[Point("rtn", {"bits": 3, "group_size": 32}), bad],
                     progress=False)
    for text, sub in zip(texts, ("text", "text2")):
        failed, ok = docs[text]["rows"]   # rows are ordered by method: fasq before RTN
        assert ok["status"] == "ok" and ok["peak_rss_mb"] > 0 and ok["text"] == text
        assert failed["status"] == "failed" and "kmeans_max_points" in failed["error"]
        assert "Failed or not run" in (tmp_path / sub / "table.md").read_text()
    assert (tmp_path / "text" / "logs" / f"{ok['key']}.log").is_file()
    # one quantization scored on both texts: same size, different perplexity
    a, b = (docs[t]["rows"][1] for t in texts)
    assert a["size"] == b["size"] and a["perplexity"] != b["perplexity"]


def test_parse_setting_and_default_plan():
    assert parse_setting("d=2,K=256") == {"subvector_dim": 2, "codebook_size": 256}
    assert parse_setting('{"d": 4, "codebook_size": 256, "rotation": "none"}') == {
        "subvector_dim": 4, "codebook_size": 256, "rotation": "none"}
    with pytest.raises(ValueError, match="key=value"):
        parse_setting("d2")
    plan = default_points()
    fasq_bits = sorted(fasq_config(p.settings).nominal_bits_per_weight for p in plan if p.method == "fasq")
    assert len(fasq_bits) >= 8 and fasq_bits[0] <= 2.25 and fasq_bits[-1] >= 8
    assert {p.method for p in plan} == {"original", "fasq", "gptq", "awq", "hqq", "nf4", "llamacpp", "rtn"}
    assert len({p.key for p in plan}) == len(plan)
    assert {p.method for p in default_points(("fasq",))} == {"fasq"}


def _run_in_process(point: Point, settings, tmp_path) -> dict:
    """One point through the worker's ``run`` in this process, on the tiny model and text (one row)."""
    from fasq.sweep.worker import run

    req = {"point": point.to_dict(), "model_path": settings.model, "texts": [settings.text],
           "context_length": 64, "max_tokens": 256, "batch_size": 4, "threads": 1, "artifacts": str(tmp_path),
           "calibration": {"name": "persuasion", "n_samples": 2, "seq_len": 64}}
    threads = torch.get_num_threads()
    try:
        (row,) = run(req)
    finally:
        torch.set_num_threads(threads)
    return row


@pytest.mark.parametrize("method,settings_,lib", [("hqq", {"bits": 4, "group_size": 64}, "hqq"),
                                                 ("nf4", {"blocksize": 64, "double_quant": True}, "bitsandbytes")])
def test_baseline_adapter(method, settings_, lib, settings, tmp_path):
    """Calibration-free baselines on the tiny model, in process (skipped when the library is missing)."""
    pytest.importorskip(lib)
    row = _run_in_process(Point(method, settings_), settings, tmp_path)
    assert row["status"] == "ok" and row["dequant_check"]["max_relative_error"] < 2e-2
    # 4-bit codes plus per-group statistics; NF4 also stores fixed per-layer tables (about 1.3 KB:
    # its 16-entry and 256-entry code books and metadata), large next to these tiny layers.
    assert 4.0 < row["bits_per_weight"] < 7.0 and row["size"]["quantized_layers"] == 14
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1


def test_llmcompressor_awq_adapter(settings, tmp_path):
    """llm-compressor's AWQ on the tiny model (runs in the venv that has it: ``fasq sweep --setup-baselines``
    makes VENV-llmcompressor): packed layers counted at their stored size, decoded by the library."""
    pytest.importorskip("llmcompressor")
    point = Point("awq", {"bits": 4, "group_size": 8, "library": "llm-compressor"})   # 136 inputs: groups of 8
    row = _run_in_process(point, settings, tmp_path)
    assert row["status"] == "ok", row.get("error")
    assert row["library"] == "llm-compressor (AWQ)" and row["dequant_check"]["max_relative_error"] < 2e-2
    # 4-bit codes, a 16-bit scale and a 4-bit zero point per group of 8 (plus a 2-entry shape per layer)
    assert 6.5 <= row["bits_per_weight"] < 6.6 and row["size"]["quantized_layers"] == 14
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1


def test_awq_library_routing(tmp_path, monkeypatch):
    """llm-compressor's AWQ points go to that library's venv (beside the baselines venv, or named by
    $FASQ_LLMCOMPRESSOR_PYTHON); every other point keeps the sweep's interpreter; labels name the library."""
    from fasq.sweep.methods import Context, run_awq
    from fasq.sweep.runner import python_for

    monkeypatch.delenv("FASQ_LLMCOMPRESSOR_PYTHON", raising=False)
    base = tmp_path / "venv" / "bin" / "python"
    llmc = tmp_path / "venv-llmcompressor" / "bin" / "python"
    point = Point("awq", {"bits": 4, "group_size": 128, "library": "llm-compressor"})
    assert python_for(point, str(base)) == str(base)          # no venv beside: the point fails and says why
    llmc.parent.mkdir(parents=True)
    llmc.touch()
    assert python_for(point, str(base)) == str(llmc)
    assert python_for(Point("awq", {"bits": 4, "group_size": 128}), str(base)) == str(base)
    monkeypatch.setenv("FASQ_LLMCOMPRESSOR_PYTHON", "/opt/other/python")
    assert python_for(point, str(base)) == "/opt/other/python"
    assert point.label == "4-bit g128 (llm-compressor)"
    assert Point("awq", {"bits": 4, "group_size": 128}).label == "4-bit g128"
    with pytest.raises(ValueError, match="library='autoawq' is unknown"):
        run_awq(Point("awq", {"bits": 4, "library": "autoawq"}), Context("", None, None, tmp_path))


def test_report_section(swept, tmp_path):
    """The BENCHMARKS.md section: standing lines from the rows, replaced in place between its markers."""
    from fasq.sweep.report import BEGIN, END, section, standing, update_markdown

    _, doc = swept
    rows = [{"status": "ok", "method": "fasq", "label": "d=2 K=256", "bits_per_weight": 4.16, "perplexity": 40.0},
            {"status": "ok", "method": "gptq", "label": "4-bit g128", "settings": {"bits": 4},
             "bits_per_weight": 4.21, "perplexity": 35.0},
            {"status": "ok", "method": "nf4", "label": "NF4 b64", "settings": {}, "bits_per_weight": 4.15,
             "perplexity": 50.0}]
    lines = standing({**doc, "rows": rows})
    assert "beats 1 of 2 4-bit baselines" in lines[0] and "fasq worse by 14.3%" in lines[0]
    assert "no fasq row" in lines[1]
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkernels section\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    update_markdown(md, section({"lee": doc}, ["fasq sweep --text lee"]))
    text = md.read_text()
    assert "old" not in text and "kernels section" in text and text.rstrip().endswith("after")
    assert text.count(BEGIN) == 1 and "fasq sweep --text lee" in text and "| fasq |" in text


def test_report_sections_per_model(swept, tmp_path):
    """Each model's section has its own markers and plot paths; updating one leaves the other alone."""
    from fasq.sweep.cli import default_out
    from fasq.sweep.report import markers, section, update_markdown

    _, doc = swept
    assert default_out("smollm2", ["lee"]).as_posix() == "benchmarks/results/accuracy/lee"
    assert default_out("gemma3-270m", ["lee", "austen"]).as_posix() == "benchmarks/results/accuracy/gemma3-270m"
    assert default_out("/models/My-Model", ["austen"]).as_posix() == "benchmarks/results/accuracy/My-Model/austen"
    md = tmp_path / "BENCHMARKS.md"
    update_markdown(md, section({"lee": doc}, ["cmd-smol"]))
    base = "benchmarks/results/accuracy/gemma3-270m"
    update_markdown(md, section({"lee": doc}, ["cmd-gemma"], base=base, model="gemma3-270m"), model="gemma3-270m")
    update_markdown(md, section({"lee": doc}, ["cmd-gemma-2"], base=base, model="gemma3-270m"), model="gemma3-270m")
    text = md.read_text()
    begin, end = markers("gemma3-270m")
    assert text.count(begin) == 1 and text.count(end) == 1 and text.count(markers()[0]) == 1
    assert "cmd-smol" in text and "cmd-gemma-2" in text and "cmd-gemma\n" not in text
    assert f"({base}/lee/plot.png)" in text and "Gemma-3-270M" in text
    # a sweep in a directory of its own (e.g. the llama.cpp rows) gets its own section, the model's is kept
    other = "benchmarks/results/accuracy/smollm2-llamacpp"
    update_markdown(md, section({"lee": doc}, ["cmd-llama"], base=other, name="smollm2-llamacpp"),
                    name="smollm2-llamacpp")
    text = md.read_text()
    assert text.count(markers(name="smollm2-llamacpp")[0]) == 1 and text.count(markers()[0]) == 1
    assert "cmd-smol" in text and "cmd-llama" in text and f"({other}/lee/plot.png)" in text
    assert text.count("### lee\n") == 1 and "### lee (SmolLM2-135M-Instruct)" in text


def test_tied_embedding_counted_once(tmp_path):
    """With tied input/output embeddings the FP16 size counts the shared matrix once (fasq agrees)."""
    from transformers import AutoModelForCausalLM

    from fasq.sweep.worker import run
    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("\n\n".join([SAMPLE_TEXT] * 3))
    unique = sum(p.numel() for p in model.parameters())       # parameters() yields a tied tensor once
    req = {"model_path": str(tmp_path / "m"), "texts": [str(tmp_path / "t.txt")], "context_length": 64,
           "max_tokens": 128, "threads": 1, "artifacts": str(tmp_path), "calibration": {}}
    threads = torch.get_num_threads()
    try:
        (orig,) = run({**req, "point": Point("original").to_dict()})
        (fq,) = run({**req, "point": Point("fasq", {"subvector_dim": 2, "codebook_size": 16}).to_dict()})
    finally:
        torch.set_num_threads(threads)
    assert orig["size"]["fp16_bytes"] == 2 * unique == fq["size"]["fp16_bytes"]   # fasq's own report agrees


def test_cli_report_only(swept, settings):
    """The command line (benchmarks/accuracy.py and `fasq sweep` share it) rebuilds outputs from the cache."""
    from fasq.sweep.cli import main

    out, doc = swept
    rc = main(["--model", settings.model, "--text", settings.text, "--out", str(out), "--methods", "original,fasq",
               "--fasq-grid", "d=2,K=16,g=32", '{"d": 1, "K": 8, "group_size": 32}', "--context-length", "64",
               "--max-tokens", "256", "--report-only", "-q"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == [r["key"] for r in doc["rows"]]   # RTN g32 carried over
    assert not any("other fasq code" in n for r in rows for n in r.get("notes") or [])   # rows are current
    assert main(["--fasq-grid", "d=3,K=16", "--out", str(out), "-q"]) == 2   # invalid setting: clear error


def test_cli_section_named_after_out(settings, tmp_path):
    """`fasq sweep --out ELSEWHERE --benchmarks-md` writes a section named after ELSEWHERE, not the model's."""
    from fasq.sweep.cli import main
    from fasq.sweep.report import BEGIN

    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n{BEGIN}\nkept\n<!-- accuracy:end -->\n")
    out = tmp_path / "llamacpp-rows" / "lee"          # one text: the section is named after out's parent
    main(["--model", settings.model, "--text", settings.text, "--out", str(out), "--methods", "original",
          "--report-only", "--benchmarks-md", str(md), "-q"])
    text = md.read_text()
    assert "kept" in text and "<!-- accuracy-llamacpp-rows:begin -->" in text and text.count(BEGIN) == 1


def test_gemma3_awq_fix_keeps_the_function():
    """GPTQModel 7.6's AWQ scaled Gemma 3's (1 + w) norms as plain w and folded the MLP's scales into the wrong
    norm; after fasq.sweep.methods._fix_gemma3_awq its norm scaling is exact and the MLP reads
    pre_feedforward_layernorm (runs where gptqmodel is installed: the baselines venv)."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.models.definitions import gemma3
    from gptqmodel.quantization.awq.quantize.scale import scale_ln_fcs
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from fasq.sweep.methods import _fix_gemma3_awq

    _fix_gemma3_awq()
    block = gemma3.Gemma3QModel.module_tree[-1]
    assert list(block)[-2:] == ["pre_feedforward_layernorm", "mlp"] and "post_attention_layernorm" not in block
    torch.manual_seed(0)
    norm, lin = Gemma3RMSNorm(16), torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
        x = torch.randn(4, 16)
        ref = lin(norm(x))
        scale_ln_fcs(norm, [lin], torch.rand(16) + 0.5)
        torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_a_distill_point_runs_and_is_hashed_with_the_distillation(settings, swept, tmp_path):
    from fasq.sweep.worker import fasq_code_hash

    plain = dict(FASQ_POINTS[0].settings)
    point = Point("fasq", {**plain, "distill_steps": 2})
    assert fasq_config(point.settings) == fasq_config(plain)
    with pytest.raises(ValueError, match="distill_steps"):
        fasq_config({**plain, "distill_steps": -1})
    assert fasq_config({**point.settings, "distill_sequences": 8}) == fasq_config(plain)
    for bad in ({"distill_sequences": 0, "distill_steps": 2}, {"distill_sequences": 8}):   # (none: without steps)
        with pytest.raises(ValueError, match="distill_sequences"):
            fasq_config({**plain, **bad})
    assert fasq_code_hash(plain) == fasq_code_hash() != fasq_code_hash(point.settings)
    (doc,) = run_sweep(settings, tmp_path, points=[point], progress=False, isolate=False).values()
    (row,) = doc["rows"]
    assert row["status"] == "ok", row.get("error")
    assert row["fasq_code"] == fasq_code_hash(point.settings) and "distill_steps=2" in row["label"]
    before = next(r for r in swept[1]["rows"] if r["key"] == FASQ_POINTS[0].key)
    assert row["bits_per_weight"] == before["bits_per_weight"] and row["perplexity"] != before["perplexity"]
