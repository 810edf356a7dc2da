"""Experiment (docs/experiments.md): the size planner's order within a layer type.

    python benchmarks/priority_experiment.py ORDER --name NAME --bits 3.25 key=value ...   # repo root

ORDER: ``early`` (the library's: earlier decoder layers first), ``late`` (later layers first) or
``ends`` (by distance from the nearer end of the stack: 0, 29, 1, 28, ...).  The type order
(the model family's ``priority``, fasq.families) is unchanged.  Wraps benchmarks/experiments.py (same arguments,
same JSONL record) and changes no library code: ``fasq.fit.allocate._priority`` is replaced for this
process only.
"""
from __future__ import annotations

import sys

import experiments  # benchmarks/experiments.py (this script's folder is on sys.path)

import fasq.fit.allocate as allocate

N_LAYERS = 30  # SmolLM2-135M's decoder layers (the model these experiments run on)
_original = allocate._priority


def _ordered(order: str):
    def priority(name: str, *family) -> tuple:
        t, i, n = _original(name, *family)
        if order == "late":
            i = -i
        elif order == "ends":
            i = min(i, N_LAYERS - 1 - i) * 2 + (i > (N_LAYERS - 1) / 2)
        return (t, i, n)
    return priority


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("early", "late", "ends"):
        sys.exit(__doc__)
    allocate._priority = _ordered(sys.argv.pop(1))
    experiments.main(sys.argv[1:])


if __name__ == "__main__":
    main()
