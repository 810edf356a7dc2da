"""benchmarks/cpu_llamacpp.py's bookkeeping (no engine runs): per-round ratios and their median, pairs without
a complete round left out, and the table's target verdicts read off the ratios."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_llamacpp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_llamacpp", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(engine, setting, rnd, decode, prompt, threads=1):
    return {"engine_name": engine, "setting": setting, "round": rnd, "threads": threads, "decode_tok_s": decode,
            "prompt_tok_s": prompt, "peak_rss_mib": 100.0 + rnd, "file_bytes": 2**20, "load_avg_1min": [1.0, 1.0]}


def test_ratios_are_medians_of_per_round_ratios(bench):
    runs = [_run("fasq", "4bit", 0, 10.0, 90.0), _run("llamacpp", "Q4_K_M", 0, 20.0, 100.0),
            _run("fasq", "4bit", 1, 30.0, 90.0), _run("llamacpp", "Q4_K_M", 1, 20.0, 100.0),
            _run("fasq", "4bit", 2, 12.0, 70.0), _run("llamacpp", "Q4_K_M", 2, 10.0, 100.0),
            _run("fasq", "3bit", 0, 5.0, 50.0)]                    # no llama.cpp Q3_K_M run: no 3bit row
    rows = bench.summarize("smollm2", [1], {"runs": runs})
    assert [(r["fasq"], r["llamacpp"]) for r in rows] == [("4bit", "Q4_K_M")]
    r = rows[0]
    assert r["decode_ratios"] == [0.5, 1.5, 1.2] and r["decode_ratio"] == 1.2     # not 52/50 from the sums
    assert r["prompt_ratios"] == [0.9, 0.9, 0.7] and r["prompt_ratio"] == 0.9
    assert r["fasq_decode_tok_s"] == 12.0 and r["llamacpp_decode_tok_s"] == 20.0
    assert r["fasq_peak_rss_mib"] == 102.0


def test_markdown_states_each_target(bench):
    rows = bench.summarize("gemma3-270m", [2], {"runs": [
        _run("fasq", "4bit", 0, 10.0, 70.0, 2), _run("llamacpp", "Q4_K_M", 0, 20.0, 100.0, 2),
        _run("fasq", "3bit", 0, 30.0, 90.0, 2), _run("llamacpp", "Q3_K_M", 0, 20.0, 100.0, 2)]})
    doc = {"date": "2026-12-06", "commit": "abc", "command": "python benchmarks/cpu_llamacpp.py", "new_tokens": 128,
           "prompt_tokens": 512, "rounds": 1, "load_summary": "1.0-1.0", "rows": rows, "complete": False,
           "machine": {"cpu": "cpu", "cores": 2, "llama_cpp_python": "0.3.36", "torch": "2.13"}}
    md = bench.markdown(doc)
    assert "4bit vs Q4_K_M: decode 0.50x (NOT met), prompt 0.70x (NOT met)" in md
    assert "3bit vs Q3_K_M: decode 1.50x (met), prompt 0.90x (met)" in md
    assert "Incomplete run" in md
