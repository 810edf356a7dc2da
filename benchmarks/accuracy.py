"""Compression-accuracy sweep (the same as `fasq sweep`): fasq's grid against GPTQ, AWQ, HQQ, NF4, RTN.

    python benchmarks/accuracy.py --model smollm2 --text lee --out benchmarks/results/accuracy/lee

See docs/accuracy.md.
"""
import sys

from fasq.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
