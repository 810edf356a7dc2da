"""Bit-identical output for any worker count and after a kill: stream-quantize one checkpoint with 1 worker,
with 2 workers, and with 2 workers killed (SIGKILL) after some units and resumed, each in a fresh process,
and compare every stored tensor.  Also the in-memory CLI (``--in-memory``) against streaming.

    python benchmarks/determinism.py                      # the bundled SmolLM2, --preset 4bit
    python benchmarks/determinism.py --model DIR --preset 3bit --kill-after 40

Writes benchmarks/results/determinism.json (and prints a summary).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import os, signal, sys
from fasq import preset
from fasq.stream import quantize_checkpoint, run
kill_after = int(sys.argv[4])
if kill_after:
    orig = run.Workspace.commit
    def commit(self, rec):
        orig(self, rec)
        if len(self.done) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    run.Workspace.commit = commit
quantize_checkpoint(sys.argv[1], sys.argv[2], preset(sys.argv[5]), workers=int(sys.argv[3]), progress=False)
"""


def fresh(args: list[str]) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if p.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"run failed ({p.returncode}): {p.stderr[-3000:]}")
    return p.returncode, time.perf_counter() - t0


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def differing(a: dict, b: dict) -> list[str]:
    import torch

    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local safetensors checkpoint (default: the bundled SmolLM2)")
    ap.add_argument("--preset", default="4bit")
    ap.add_argument("--kill-after", type=int, default=60, help="units journaled before the SIGKILL")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "determinism.json"))
    args = ap.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "src"))
        from fasq.data import smollm2_checkpoint
        args.model = str(smollm2_checkpoint())
    runs, rows = {}, []
    with tempfile.TemporaryDirectory(dir=os.environ.get("FASQ_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        for name, workers, kill in (("workers1", 1, 0), ("workers2", 2, 0), ("killed", 2, args.kill_after),
                                    ("resumed", 2, 0)):
            out = tmp / ("killed" if name == "resumed" else name)
            rc, secs = fresh(["-c", RUN, args.model, str(out), str(workers), str(kill), args.preset])
            runs[name] = {"workers": workers, "seconds": round(secs, 1), "killed": rc == -signal.SIGKILL}
            print(f"{name}: {secs:.1f}s" + (" (SIGKILL)" if rc else ""), flush=True)
        rc, secs = fresh(["-m", "fasq", "quantize", args.model, "-o", str(tmp / "in_memory"), "--preset",
                          args.preset, "--in-memory", "-q"])
        runs["in_memory_cli"] = {"seconds": round(secs, 1)}
        base = tensors(tmp / "workers1")
        for name in ("workers2", "killed", "in_memory"):
            diff = differing(base, tensors(tmp / name))
            rows.append({"compared": f"workers1 vs {name}", "tensors": len(base), "differing": len(diff),
                         "first_differing": diff[:5]})
            print(f"workers1 vs {name}: {len(base)} tensors, {len(diff)} differ {diff[:3]}")
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "command": "python benchmarks/determinism.py " + " ".join(sys.argv[1:]), "model": args.model,
              "preset": args.preset, "kill_after_units": args.kill_after, "runs": runs, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
