"""The lean path's C++ glue (``lean_cpu.cpp``), built on first use through :mod:`fasq.native` (cached per
machine under ``~/.cache/fasq/decode_kernels/``).  None when it cannot build: the engine then computes
the same steps with torch ops (slower, same results up to fp32 rounding), after one log line."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lean_cpu.cpp")


@functools.lru_cache(maxsize=1)
def library():
    from ..native import build_first_that_works

    try:
        _, lib, _ = build_first_that_works(SOURCE, "fasq_lean_cpu", "decode_kernels")
        return lib
    except RuntimeError as e:
        log.warning("fasq: could not build the lean decode glue (%s); the lean path uses torch ops", e)
        return None
