"""lm-eval-harness scores a fasq directory through ``--model hf --model_args pretrained=DIR`` (issue 23.7).

Skipped without lm-eval (``pip install lm-eval``; it is not in the dev extra: it pulls in datasets,
evaluate, scikit-learn, ...).  The task is local (a JSONL file), so nothing is downloaded.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import fasq  # noqa: E402
from fasq import FASQConfig  # noqa: E402

from conftest import make_tokenizer, tiny_model  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
DOCS = [{"question": "It is a truth universally", "choices": [" acknowledged", " fortune", " wife"], "label": 0},
        {"question": "a single man in possession of a good", "choices": [" fortune", " man", " town"], "label": 0},
        {"question": "strong winds today pushed a huge", "choices": [" bushfire", " truth", " daughters"],
         "label": 0}]
TASK = """task: fasq_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False)
    fasq.save(model, root / "q", tokenizer=make_tokenizer())
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tasks" / "fasq_local.yaml").write_text(TASK.format(data=root / "tasks" / "data.jsonl"))
    return root


def loglikelihoods(samples_dir: Path) -> list:
    (path,) = samples_dir.rglob("samples_fasq_local_*.jsonl")
    rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])
    return [[float(r[0][0]) for r in row["resps"]] for row in rows]


def test_lm_eval_cli_scores_a_fasq_directory(setup):
    """The lm_eval CLI in a fresh interpreter, with only the hook that fasq-hook.pth runs, gives the
    same per-choice loglikelihoods as lm-eval on the model that fasq.load returns."""
    root = setup
    args = ["--model", "hf", "--model_args", f"pretrained={root / 'q'},dtype=float32", "--tasks", "fasq_local",
            "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "1",
            "--output_path", str(root / "cli"), "--log_samples"]
    code = ("import sys, _fasq_hook; _fasq_hook.install()\n"
            "from lm_eval.__main__ import cli_evaluate\n"
            "sys.argv = ['lm_eval', *sys.argv[1:]]\n"
            "cli_evaluate()\n"
            "assert 'fasq' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unknown quantization type" not in proc.stderr and "newly initialized" not in proc.stderr
    cli = loglikelihoods(root / "cli")

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = fasq.load(root / "q")
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=make_tokenizer(), batch_size=1),
                          tasks=["fasq_local"], task_manager=TaskManager(include_path=str(root / "tasks")),
                          log_samples=True)
    direct = [[float(r[0][0]) for r in s["resps"]] for s in sorted(out["samples"]["fasq_local"],
                                                                   key=lambda s: s["doc_id"])]
    assert len(cli) == len(DOCS) and all(len(c) == 3 for c in cli)
    torch.testing.assert_close(torch.tensor(cli), torch.tensor(direct), rtol=1e-5, atol=1e-5)
