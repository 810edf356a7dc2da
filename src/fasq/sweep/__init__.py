"""The compression-accuracy map: fasq over a grid of settings against GPTQ, AWQ, HQQ, NF4 and RTN,
each through its own library, measured the same way (docs/accuracy.md).

    fasq sweep --model smollm2 --text lee --out benchmarks/results/accuracy/lee

Heavy imports (transformers, the baseline libraries) happen inside the workers, not here.
"""
from .cli import add_cli, setup_baselines_venv
from .points import DEFAULT_BASELINES, DEFAULT_FASQ_GRID, Point, default_points, parse_setting
from .runner import SweepSettings, read_results, run_sweep
from .texts import Calibration

__all__ = ["add_cli", "setup_baselines_venv", "DEFAULT_BASELINES", "DEFAULT_FASQ_GRID", "Point", "default_points",
           "parse_setting", "SweepSettings", "read_results", "run_sweep", "Calibration"]
