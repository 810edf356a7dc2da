"""Experiment (docs/experiments.md row 35): k-means with N restarts per layer (seeds seed + 7919 r),
keeping the codebook with the lowest squared error on the layer's normalized sub-vectors.

    python benchmarks/restarts_experiment.py N --name NAME key=value ...   # run from the repo root

It wraps benchmarks/experiments.py (same arguments, same JSONL record) and changes no library code:
``fasq.fit.pq.kmeans`` is replaced for this process only.
"""
from __future__ import annotations

import sys
import threading

import experiments  # benchmarks/experiments.py (this script's folder is on sys.path)

import fasq.fit.pq as pq

_original = pq.kmeans
_lock = threading.Lock()
_calls = [0]


def _best_of(restarts: int):
    def kmeans(x, k, seed=0, **kw):
        best = None
        for r in range(restarts):
            cent, idx = _original(x, k, seed=seed + 7919 * r, **kw)
            sse = float((x - cent[idx]).pow(2).sum())
            if best is None or sse < best[0]:
                best = (sse, cent, idx)
        with _lock:
            _calls[0] += 1
        return best[1], best[2]
    return kmeans


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit(__doc__)
    pq.kmeans = _best_of(int(sys.argv.pop(1)))
    try:
        experiments.main(sys.argv[1:])
    finally:
        print(f"k-means calls: {_calls[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
