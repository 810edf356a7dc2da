import json
import subprocess
import sys

import pytest

from fasq.cli import main


def test_quantize_info_eval_generate(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "-o", str(out), "-d", "2", "-k", "64", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quantized_layers"] == 14 and 3 < res["bits_per_weight"] < 6

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in info and "% of FP16" in info

    assert main(["eval", str(out), "--text", str(text_file), "--context-length", "32", "--json", "-q"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["perplexity"] > 1 and ev["bits_per_weight"] == pytest.approx(res["bits_per_weight"])

    assert main(["eval", str(model_dir), "--text", str(text_file), "--context-length", "32", "--json", "-q"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["tokens_scored"] == ev["tokens_scored"]  # same windows for both models

    assert main(["generate", str(out), "It is a truth", "--max-new-tokens", "5", "-q"]) == 0
    assert capsys.readouterr().out.startswith("It is a truth")


@pytest.mark.parametrize("in_memory", [False, True])
def test_presets_sample_text_and_say_so(model_dir, tmp_path, capsys, monkeypatch, in_memory):
    """--preset 4bit equalizes with "sampled" and codes with error feedback (streamed or in memory), tells the user
    it samples text first, and records both."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 16)
    out = tmp_path / "q"
    args = ["quantize", str(model_dir), "-o", str(out), "--preset", "4bit", "--json"]
    assert main(args + (["--in-memory"] if in_memory else [])) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["config"]["equalize"] == "sampled"
    assert ("sampling: measuring the activations' powers and each layer's input covariance on 32 x 16 tokens the "
            "model samples itself") in cap.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["equalize"] == "sampled" and qc["error_feedback"] is True and qc["sample_sequences"] == 32
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "plain"), "--preset", "4bit", "--no-error-feedback",
                 "--sample-sequences", "2", "--overwrite", "--json"]) == 0
    cap = capsys.readouterr()
    assert "activations' powers on 2 x 16 tokens" in cap.err and "error_feedback" not in json.loads(cap.out)["config"]


def test_existing_output_needs_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["quantize", str(model_dir), "-o", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_setting_is_a_clear_error(model_dir, tmp_path, capsys):
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "x"), "-k", "1", "-q"]) == 2
    assert "codebook_size=1" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fasq", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout


def test_bench_compares_models_side_by_side(model_dir, tmp_path, capsys):
    """fasq bench: each model decoded in its own process, alternating; speed relative to the first
    model, peak memory, and how many greedy tokens agree with the first model's."""
    out = tmp_path / "qb"
    assert main(["quantize", str(model_dir), "-o", str(out), "-d", "2", "-k", "16", "-q"]) == 0
    capsys.readouterr()
    assert main(["bench", str(model_dir), str(out), "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(model_dir), str(out)]
    base, q = rows
    assert base["bits_per_weight"] == 32.0 and 1 < q["bits_per_weight"] < 16
    assert len(base["all_tokens_per_s"]) == len(q["all_tokens_per_s"]) == 1
    assert base["speedup_vs_first_run_median"] == 1.0 and q["speedup_vs_first_run_median"] > 0
    assert base["same_tokens_as_first"] == len(base["generated"]) == 4
    assert q["weights_mib"] < base["weights_mib"] and q["peak_rss_mib"] > 0
    assert main(["bench", str(tmp_path / "missing"), "--new-tokens", "2", "--repeats", "1"]) == 2
    assert "missing" in capsys.readouterr().err


def test_natural_layer_order():
    from fasq.cli import natural_key

    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.self_attn", "model.layers.1.mlp", "lm_head"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.1.mlp", "model.layers.1.self_attn",
                                              "model.layers.2.mlp", "model.layers.10.mlp"]


def test_eval_reference_scores_the_source_on_the_same_windows(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "-o", str(out), "-k", "16", "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text_file), "--context-length", "32"]) == 0
    assert "--reference scores it" in capsys.readouterr().err
    assert main(["eval", str(out), "--text", str(text_file), "--context-length", "32", "--reference", "--json",
                 "-q"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["quantized"] and not r["reference"]["quantized"]
    assert r["reference"]["tokens_scored"] == r["tokens_scored"]
    assert r["reference"]["model"] == str(model_dir.resolve())


def test_bench_summary_agrees_with_its_own_steps():
    """A run stalled by other jobs: its total time says 0.9x, its median step 1.8x; the summary says 1.8x."""
    from fasq.bench import summarize

    def run(model, tps, step):
        return {"model": model, "decode_tokens_per_s": tps, "decode_step_ms_median": step, "peak_rss_mib": 1.0,
                "generated": [1, 2, 3]}

    rows = summarize({"fp32": [run("fp32", 2.0, 492.0), run("fp32", 2.1, 480.0)],
                      "q4": [run("q4", 1.8, 278.0), run("q4", 1.9, 270.0)]})
    q4 = rows[1]
    assert q4["speedup_vs_first_run_median"] == pytest.approx((492 / 278 + 480 / 270) / 2, rel=1e-3)
    assert q4["tokens_per_s_median_step"] == pytest.approx(1000 / 270)
    assert rows[0]["speedup_vs_first_run_median"] == 1.0
