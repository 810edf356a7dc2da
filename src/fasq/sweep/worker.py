"""One sweep point in its own process: quantize, account the stored bytes, evaluate, write one JSON.

    python -m fasq.sweep.worker REQUEST.json

Evaluation runs on dense fp32 weights decoded by each library's own dequantizer (checked against the
library's own forward on two layers, see ``dequant_check``), so every method is scored with the same
arithmetic and the same speed; tensors a method does not quantize are rounded to fp16, as stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from .points import Point
from .sizes import size_plan, stored_size, unquantized_size
from .texts import Calibration, eval_prefix, token_digest
from .util import environment, write_json_atomic

log = logging.getLogger(__name__)


# The fasq sources whose changes change a fasq row (the runner re-runs a cached row made by other code).
FASQ_CODE = ("config.py", "families.py", "planning.py", "format.py", "model.py", "reference.py", "nn.py", "io.py",
             "fit")


# ... and, for a point with ``distill_steps``, the distillation's (rows without it keep the hash they had).
DISTILL_CODE = ("distill.py",)


def fasq_code_hash(settings: dict | None = None) -> str:
    """A hash of :data:`FASQ_CODE` (and :data:`DISTILL_CODE` where ``settings`` distill), the fasq sources this
    process imports to make a fasq row of those settings."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in FASQ_CODE + (DISTILL_CODE if (settings or {}).get("distill_steps") else ()):
        p = root / name
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def dequant_check(q, n_layers: int = 2) -> dict:
    """Relative error between each library's forward and x @ dequantized(W).T on the first and last layer."""
    worst = 0.0
    checked = []
    picks = [q.modules[0], q.modules[-1]][:n_layers]
    gen = torch.Generator().manual_seed(0)
    run = q.forward or (lambda m, v: m(v))
    for name, mod in picks:
        w = q.dequantize(mod).float()
        x = torch.randn(3, w.shape[1], generator=gen)
        try:
            y_lib = run(mod, x).float()
        except RuntimeError:  # libraries whose CPU forward computes in fp16 only
            y_lib = run(mod, x.half()).float()
        y = x @ w.T
        if getattr(mod, "bias", None) is not None:
            y = y + mod.bias.float()
        err = float((y_lib - y).norm() / y.norm().clamp_min(1e-12))
        worst = max(worst, err)
        checked.append(name)
    return {"layers": checked, "max_relative_error": worst}


@torch.no_grad()
def densify(q) -> nn.Module:
    """Replace each quantized layer by an fp32 nn.Linear holding its decoded weight; round the rest to fp16."""
    from ..nn import set_module

    model = q.model
    dense_ids = set()
    from ..nn import PQLinear

    heads = [(n, m) for n, m in q.tables if isinstance(m, PQLinear)]   # an untied PQEmbedding stays as it is
    for name, mod in q.modules + heads:
        w = q.dequantize(mod).float()
        bias = getattr(mod, "bias", None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.float())
        set_module(model, name, lin)
        dense_ids.add(id(lin.weight))
    if getattr(model, "is_quantized", False):   # transformers' flag from loading a quantized checkpoint: no
        model.is_quantized = False               # quantized layer is left, and a flagged model refuses .float()
    model.float()
    round_to_fp16(model, skip=dense_ids)
    return model


@torch.no_grad()
def round_to_fp16(model: nn.Module, skip: set[int] = frozenset()) -> None:
    """Round every floating parameter (not in ``skip``) to fp16 precision: what a 16-bit file stores."""
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point():
            p.copy_(p.half().float())


def run(req: dict) -> list[dict]:
    """Quantize once, then score every text in ``req["texts"]``; one row per text, in order."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..eval import perplexity, perplexity_of
    from ..eval.perplexity import tokenize
    from .methods import ADAPTERS, Context, load_original, peak_rss_mb

    t_start = time.perf_counter()
    point = Point(req["point"]["method"], req["point"]["settings"])
    code_hash = fasq_code_hash(point.settings)   # the fasq sources this row is made by (a cached row is checked against it)
    torch.set_num_threads(int(req.get("threads", 2)))
    torch.manual_seed(0)
    model_path = req["model_path"]
    texts = list(req["texts"])
    tok = AutoTokenizer.from_pretrained(model_path)
    prefixes = {t: eval_prefix(tok, t, req["max_tokens"]) for t in texts}
    calibration = Calibration(**req["calibration"])

    from accelerate import init_empty_weights
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    skeleton.tie_weights()  # from_config may leave tied tensors untied: they would count twice
    plan = size_plan(skeleton)
    del skeleton

    result: dict = {}
    model = logits_of = None
    if point.method == "original":
        model = load_original(model_path)
        round_to_fp16(model)
        size = unquantized_size(plan)
        result.update(library="transformers", version=environment()["transformers"], config={},
                      quantize_seconds=0.0, peak_rss_mb=peak_rss_mb(), calibration=None, from_cache=False,
                      notes=["weights as loaded (dequantized from the Q4_1 GGUF), rounded to fp16"])
    elif point.method == "llamacpp":   # no torch model: llama.cpp's logits on the same windows
        from .llamacpp_eval import prepare
        fields, size, logits_of = prepare(point, model_path, plan, req["context_length"], int(req.get("threads", 2)))
        result.update(fields)
    else:
        if point.method in ("gptq", "awq"):
            for t in texts:
                calibration.check_disjoint(t, len(prefixes[t]))
        ctx = Context(model_path, tok, calibration, Path(req["artifacts"]), int(req.get("threads", 2)),
                      bool(req.get("progress", False)))
        q = ADAPTERS[point.method](point, ctx)
        size = stored_size(plan, q.modules, q.tables)
        if point.method == "fasq":
            from ..model import model_size_report
            rep = model_size_report(q.model)
            rep["table_bytes"] = rep.get("embedding_bytes", 0)
            for k in ("quantized_bytes", "total_bytes", "fp16_bytes", "table_bytes"):
                if rep[k] != size[k]:
                    raise AssertionError(f"fasq {k}: model_size_report says {rep[k]}, the stored tensors {size[k]}")
        check = dequant_check(q)
        if check["max_relative_error"] > 2e-2:
            raise AssertionError(f"{q.library}: its forward and its dequantized weights disagree "
                                 f"(relative error {check['max_relative_error']:.3g} on {check['layers']})")
        result.update(library=q.library, version=q.version, config=q.config, quantize_seconds=q.quantize_seconds,
                      peak_rss_mb=q.peak_rss_mb, calibration=q.calibration, from_cache=q.from_cache, notes=q.notes,
                      dequant_check=check)
        model = densify(q)
        del q
    if len(texts) > 1:
        result["notes"] = result.get("notes", []) + [f"quantized once, scored on {', '.join(texts)}"]
    rows = []
    for text in texts:
        t_eval = time.perf_counter()
        ppl = (perplexity(model, tok, prefixes[text], context_length=req["context_length"],
                          max_tokens=req["max_tokens"], batch_size=req.get("batch_size", 4),
                          progress=bool(req.get("progress", False))) if model is not None else
               perplexity_of(logits_of, tok, prefixes[text], context_length=req["context_length"],
                             max_tokens=req["max_tokens"], batch_size=1, progress=bool(req.get("progress", False))))
        ids = tokenize(tok, prefixes[text])[: ppl["text_tokens"]]
        rows.append({
            "status": "ok", **point.to_dict(), "text": text, **result,
            "bits_per_weight": size["bits_per_weight"], "fraction_of_fp16": size["fraction_of_fp16"], "size": size,
            "perplexity": ppl["perplexity"], "bits_per_byte": ppl["bits_per_byte"],
            "nll_per_token": ppl["nll_per_token"], "tokens_scored": ppl["tokens_scored"], "windows": ppl["windows"],
            "context_length": ppl["context_length"], "eval_tokens_sha256": token_digest(ids),
            "eval_seconds": time.perf_counter() - t_eval, "worker_seconds": time.perf_counter() - t_start,
            "environment": environment(), "fasq_code": code_hash if point.method == "fasq" else None,
        })
    return rows


def failed_rows(req: dict, error: BaseException, tb: str = "") -> list[dict]:
    point = Point(req["point"]["method"], req["point"]["settings"])
    return [{"status": "failed", **point.to_dict(), "text": t, "error": f"{type(error).__name__}: {error}".strip()[:2000],
             "traceback": tb[-6000:]} for t in req["texts"]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fasq.sweep.worker REQUEST.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = run(req)
    except BaseException as e:  # record the failure; the sweep goes on
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        rows = failed_rows(req, e, tb)
    for row, out in zip(rows, req["outs"]):
        row["request"] = {k: v for k, v in req.items() if k != "outs"}
        write_json_atomic(Path(out), row)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
