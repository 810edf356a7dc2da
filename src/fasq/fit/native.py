"""The C++ nearest-centroid kernel for fitting (``nearest.cpp``), built on first use and cached.

k-means assignment is most of a quantization's time; this kernel is 2-8x faster than faiss's
generic build and than torch on this kind of data (low d, K <= 64k).  Nothing is compiled at import;
when no compiler works, one warning is logged and :func:`nearest` returns None (callers fall back).
``FASQ_NATIVE_FIT=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from ..native import build_first_that_works

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nearest.cpp")
MAX_DIM = 8
_state: dict = {}
_lock = threading.Lock()


def module():
    """The loaded extension, or None (disabled, or the build failed: warned once).

    Thread-safe: the first callers wait for the one build.  (The result is published only once it is
    final: a worker thread that saw "no kernel" while another was still building fell back to faiss,
    and the output depended on thread timing.)"""
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            _state["mod"] = _build()
    return _state["mod"]


def _build():
    if os.environ.get("FASQ_NATIVE_FIT", "1") == "0":
        return None
    try:
        label, mod, failed = build_first_that_works(SOURCE, "fasq_nearest", "fit_kernels")
    except RuntimeError as e:
        log.warning("fasq: could not build the k-means kernel (%s); fitting uses faiss or torch "
                    "instead. Compiler output is logged at DEBUG level by fasq.native.", e)
        return None
    if label != "native":
        log.warning("fasq: k-means kernel built without -march=native/OpenMP (%s); fitting will be "
                    "slower", failed)
    return mod


def _module_for(x: torch.Tensor, centroids: torch.Tensor):
    """The extension when it applies to these inputs (CPU, 1 <= d <= 8, built), else None."""
    if x.device.type != "cpu" or centroids.device.type != "cpu" or not 1 <= x.shape[1] <= MAX_DIM:
        return None
    return module()


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor | None:
    """Index of the nearest centroid (squared L2) for each row of ``x`` [N, d] -> [N] int64, or None
    where the kernel does not apply (not CPU, d > 8, or no kernel)."""
    mod = _module_for(x, centroids)
    return None if mod is None else mod.nearest(x.float().contiguous(), centroids.float().contiguous())


def lloyd_stats(x: torch.Tensor, centroids: torch.Tensor):
    """(codes [N] int64, per-centroid sums [K, d] and counts [K], float64) of one Lloyd step, or None
    where the kernel does not apply (see :func:`nearest`)."""
    mod = _module_for(x, centroids)
    return None if mod is None else tuple(mod.lloyd_stats(x.float().contiguous(), centroids.float().contiguous()))
