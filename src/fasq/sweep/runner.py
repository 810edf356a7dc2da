"""Run a sweep: every point in its own worker process, results cached as one JSON each, so an
interrupted sweep resumes and ``methods=("fasq",)`` re-runs only the fasq rows.

Layout of ``out``::

    runs/<point key>.json    one result (or recorded failure) per point: the cache
    logs/<point key>.log     the worker's output
    results.json             the whole run: settings, machine, command, every row
    table.md, plot.png       the table and the Pareto plot
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .points import METHOD_ORDER, Point, default_points
from .texts import Calibration
from .util import environment, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 8192   # per model and text: 16 windows of 512 (docs/accuracy.md, "Evaluation")
@dataclasses.dataclass
class SweepSettings:
    model: str = "smollm2"
    text: str = "lee"
    context_length: int = 512
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    batch_size: int = 4
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    threads: int = 2

    def eval_key(self, model_path: str, text: str | None = None) -> dict:
        """What must match for a cached row to be reused."""
        from .methods import _model_fingerprint
        return {"model": _model_fingerprint(model_path), "text": text or self.text,
                "context_length": self.context_length, "max_tokens": self.max_tokens}


def resolve_model_path(model: str) -> str:
    from ..data import resolve_model

    path, kw = resolve_model(model)
    if kw or not Path(path).is_dir():
        raise ValueError(f"--model {model!r}: the sweep needs a local model directory, 'smollm2' or 'gemma3-270m' "
                         f"(got {path!r}{' with ' + str(kw) if kw else ''}); convert GGUF files first")
    return path


def _cached(path: Path, point: Point, eval_key: dict, code_hash: str, report_only: bool = False) -> dict | None:
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if row.get("eval_key") != eval_key or row.get("key") != point.key:
        return None
    if row.get("status") != "ok" and not report_only:
        return None   # a failure is retried by the next run (shown as it is by report_only)
    if point.method == "fasq" and row.get("fasq_code") != code_hash:
        if not report_only:
            return None
        row.setdefault("notes", []).append("made by other fasq code than the current checkout")
    return row


def run_point(point: Point, req: dict, log_path: Path, python: str, timeout: float,
              isolate: bool = True) -> list[dict]:
    """Run one point (quantize once, score each of ``req["texts"]``) in a worker process; one row per
    text.  A crash or timeout becomes failed rows.

    ``isolate=False`` runs it in this process instead (tests: no interpreter start-up, but the peak RSS
    is then this process's, not the method's alone).
    """
    from .worker import failed_rows

    t0 = time.perf_counter()
    if not isolate:
        rows = _run_in_process(point, req)
    else:
        rows = _run_subprocess(point, req, log_path, python, timeout)
    for r in rows:
        r["wall_seconds"] = time.perf_counter() - t0
    return rows if rows else failed_rows(req, RuntimeError("worker returned no rows"))


def _run_subprocess(point: Point, req: dict, log_path: Path, python: str, timeout: float) -> list[dict]:
    from .worker import failed_rows

    log_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix="fasq-sweep-"))
    outs = [tmpdir / f"{i}.json" for i in range(len(req["texts"]))]
    req_path = tmpdir / "request.json"
    req_path.write_text(json.dumps({**req, "outs": [str(o) for o in outs]}))
    env = dict(os.environ, OMP_NUM_THREADS=str(req["threads"]), GPTQMODEL_CPU_WORKERS=str(req["threads"]),
               TOKENIZERS_PARALLELISM="false")
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([python, "-m", "fasq.sweep.worker", str(req_path)], stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            except BaseException:   # Ctrl-C: stop the worker too, then let the sweep stop
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        _trim_log(log_path)
        if all(o.is_file() for o in outs):
            return [json.loads(o.read_text()) for o in outs]
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
        why = f"timed out after {timeout:.0f}s" if rc is None else f"worker exited with code {rc}"
        return failed_rows(req, RuntimeError(f"{why} (log {log_path}): ...{tail}"))
    finally:
        for f in tmpdir.iterdir():
            f.unlink()
        tmpdir.rmdir()


def _trim_log(path: Path, head: int = 4000, tail: int = 20000) -> None:
    """Keep a worker log small enough to commit: its start and its end (libraries' progress bars
    can write megabytes)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    if len(text) > head + tail + 100:
        path.write_text(f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}")


def _run_in_process(point: Point, req: dict) -> list[dict]:
    import torch

    from .worker import failed_rows, run
    threads = torch.get_num_threads()
    try:
        rows = run(req)
    except Exception as e:
        rows = failed_rows(req, e)
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        r["request"] = req
    return rows


def text_dirs(out: str | os.PathLike, texts: Sequence[str]) -> dict[str, Path]:
    """Output directory per text: ``out`` itself for one text, ``out/<text name>`` for several."""
    out = Path(out)
    if len(texts) == 1:
        return {texts[0]: out}
    names = [Path(t).stem for t in texts]
    if len(set(names)) != len(names):
        raise ValueError(f"texts {list(texts)} have clashing names {names}")
    return {t: out / n for t, n in zip(texts, names)}


def llmcompressor_venv(baselines_venv: Path) -> Path:
    """Where ``fasq sweep --setup-baselines VENV`` puts llm-compressor's venv: ``VENV-llmcompressor`` beside it."""
    return baselines_venv.parent / f"{baselines_venv.name}-llmcompressor"


def python_for(point: Point, python: str) -> str:
    """The interpreter that runs ``point``: ``python``, except for llm-compressor's AWQ points, which need
    that library's own venv (it pins transformers <= 5.17): ``$FASQ_LLMCOMPRESSOR_PYTHON``, else the venv
    ``<venv>-llmcompressor`` beside ``python``'s venv (made by ``fasq sweep --setup-baselines``), else
    ``python`` itself (where llm-compressor is missing the point fails and says so)."""
    if point.settings.get("library") != "llm-compressor":
        return python
    env = os.environ.get("FASQ_LLMCOMPRESSOR_PYTHON")
    if env:
        return env
    beside = llmcompressor_venv(Path(python).parent.parent) / "bin" / "python"   # .../VENV/bin/python -> VENV
    return str(beside) if beside.exists() else python


def run_sweep(settings: SweepSettings, out: str | os.PathLike, *, texts: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, fasq_grid: Sequence[dict] | None = None,
              points: Sequence[Point] | None = None, force: bool = False, python: str | None = None,
              artifacts: str | os.PathLike | None = None, timeout: float = 7200, progress: bool = True,
              command: str | None = None, isolate: bool = True, report_only: bool = False) -> dict[str, dict]:
    """Run (or resume) a sweep and write its JSON, table and plot for each text; returns
    ``{text: results document}``.

    Each point is quantized once and scored on every text (``texts``, default ``[settings.text]``);
    with several texts each gets ``out/<text name>``.  ``methods`` limits which points run; rows of
    other methods are carried over from the previous results.  ``force`` re-runs the selected points
    even when cached.  ``isolate=False`` runs the points in this process (see :func:`run_point`).
    ``report_only`` runs nothing: it rewrites the outputs from the cached rows (fasq rows made by other
    fasq code included, with a note), leaving out points never run.
    """
    from ..data import cache_dir
    from .worker import fasq_code_hash   # worker.py stamps each fasq row with it; here cached rows are checked

    texts = list(texts or [settings.text])
    dirs = text_dirs(out, texts)
    for d in dirs.values():
        (d / "runs").mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(settings.model)
    plan = list(points) if points is not None else default_points(
        tuple(methods) if methods else None, tuple(fasq_grid) if fasq_grid is not None else None)
    keys = {t: settings.eval_key(model_path, t) for t in texts}
    code_hash = fasq_code_hash()
    python = python or os.environ.get("FASQ_SWEEP_PYTHON") or sys.executable
    artifacts = Path(artifacts) if artifacts else cache_dir() / "sweep-artifacts"
    base_req = {"model": settings.model, "model_path": model_path,
                "context_length": settings.context_length, "max_tokens": settings.max_tokens,
                "batch_size": settings.batch_size, "calibration": dataclasses.asdict(settings.calibration),
                "threads": settings.threads, "artifacts": str(artifacts), "progress": False}

    rows: dict[str, list[dict]] = {t: [] for t in texts}
    bar = tqdm(plan, desc="sweep", unit="point", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.key, refresh=True)
        paths = {t: dirs[t] / "runs" / f"{point.key}.json" for t in texts}
        point_hash = fasq_code_hash(point.settings) if point.method == "fasq" else code_hash
        got = {t: None if force else _cached(paths[t], point, keys[t], point_hash, report_only) for t in texts}
        pending = [] if report_only else [t for t in texts if got[t] is None]
        if pending:
            log_path = dirs[pending[0]] / "logs" / f"{point.key}.log"
            new = run_point(point, {**base_req, "point": point.to_dict(), "texts": pending}, log_path,
                            python_for(point, python), timeout, isolate)
            for t, row in zip(pending, new):
                row.update(eval_key=keys[t], finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"))
                row.setdefault("fasq_code", point_hash if point.method == "fasq" else None)
                write_json_atomic(paths[t], row)
                got[t] = row
                msg = (f"{point.key} on {Path(t).stem}: perplexity {row['perplexity']:.3f} at "
                       f"{row['bits_per_weight']:.3f} bits/weight" if row["status"] == "ok"
                       else f"{point.key} on {Path(t).stem}: FAILED {row['error'][:200]}")
                tqdm.write(msg) if progress else log.info(msg)
        for t in texts:
            if got[t] is not None:
                rows[t].append(got[t])
            elif report_only:
                rows[t].append({"status": "not run", **point.to_dict(), "text": t, "eval_key": keys[t],
                                "error": "not run yet (no cached result for this point)"})
    bar.close()
    selected = {p.method for p in plan}
    return {t: _write_outputs(settings, t, dirs[t], rows[t], selected, keys[t], model_path, python, code_hash,
                              command, report_only) for t in texts}


def _write_outputs(settings: SweepSettings, text: str, out: Path, rows: list[dict], selected: set[str],
                   eval_key: dict, model_path: str, python: str, code_hash: str, command: str | None,
                   report_only: bool = False) -> dict:
    from .plot import write_plot
    from .table import write_table

    previous_doc = _load_previous(out / "results.json")
    previous = list(previous_doc.get("rows", []))
    if report_only:
        command = f"{command} (outputs rebuilt from the cached rows of earlier runs)"
    carried = [r for r in previous if r.get("method") not in selected and r.get("eval_key") == eval_key]
    rows = sorted(carried + rows, key=_row_order)
    doc = {
        "model": settings.model, "model_path": model_path, "text": text,
        "eval": {"context_length": settings.context_length, "max_tokens": settings.max_tokens,
                 "batch_size": settings.batch_size},
        "calibration": settings.calibration.to_dict(),
        "command": command, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": environment(), "worker_python": python, "fasq_code": code_hash, "rows": rows,
    }
    write_json_atomic(out / "results.json", doc)
    write_table(doc, out / "table.md")
    try:
        write_plot(doc, out / "plot.png")
    except ImportError as e:  # matplotlib is an optional extra
        log.warning("plot not written: %s", e)
    return doc


def _load_previous(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _row_order(row: dict) -> tuple:
    m = row.get("method", "")
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, -(row.get("bits_per_weight") or 0.0),
            row.get("key", ""))


def read_results(out: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out) / "results.json").read_text())
