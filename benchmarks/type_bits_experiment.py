"""Experiment (docs/experiments.md): one layer type at a fixed, richer K; the size planner spends
what is left of the budget on the other layers.

    python benchmarks/type_bits_experiment.py TYPE K --name NAME --bits 3.25 key=value ...   # repo root

e.g. ``v_proj 256``: every v_proj at d=2, K=256 (the config's group size), the others planned as
usual (fasq.fit.allocate.plan, its menu and order) to land on the same total size.  Wraps
benchmarks/experiments.py (same arguments, same JSONL record) and changes no library code:
``fasq.fit.allocate.plan`` is replaced for this process only.
"""
from __future__ import annotations

import sys

import experiments  # benchmarks/experiments.py (this script's folder is on sys.path)

import fasq.fit.allocate as allocate

_original = allocate.plan


def _fixed(kind: str, k: int):
    def plan(layers, config, target_bits):
        fixed = [(n, lin) for n, lin in layers if allocate._type(n) == kind]
        rest = [(n, lin) for n, lin in layers if allocate._type(n) != kind]
        cfg = config.replace(subvector_dim=2, codebook_size=k, num_codebooks=1)
        fixed_bytes = sum(allocate.layer_bytes(lin, cfg) for _, lin in fixed)
        n_all = sum(lin.in_features * lin.out_features for _, lin in layers)
        n_rest = sum(lin.in_features * lin.out_features for _, lin in rest)
        rest_bits = (target_bits * n_all / 8.0 - fixed_bytes) * 8.0 / n_rest
        result = _original(rest, config, rest_bits)
        result.update({n: cfg for n, _ in fixed})
        return result
    return plan


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[2].isdigit():
        sys.exit(__doc__)
    kind, k = sys.argv.pop(1), int(sys.argv.pop(1))
    allocate.plan = _fixed(kind, k)
    experiments.main(sys.argv[1:])


if __name__ == "__main__":
    main()
