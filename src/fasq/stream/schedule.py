"""Scheduling under a memory budget: which units run now, on a thread pool, and sizes in bytes."""
from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch
from tqdm.auto import tqdm

from .plan import Unit

log = logging.getLogger(__name__)


def parse_size(s) -> int:
    """Bytes from ``1234``, ``"500MB"``, ``"2GiB"``, ``"1.5G"`` (K/M/G/T are powers of 1000, Ki/Mi/... of 1024)."""
    if isinstance(s, (int, float)):
        return int(s)
    t = str(s).strip().upper().replace(" ", "").rstrip("B")
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    num = t.rstrip("KMGTI")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise ValueError(f"size {s!r} is invalid: use bytes or a number with K/M/G/T or KiB/MiB/GiB/TiB") from None
    if value <= 0:
        raise ValueError(f"size {s!r} must be positive")
    return int(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def default_memory_budget() -> int:
    """Half the memory available now (for in-flight tensors)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1 << 30, avail // 2)


def _trim_malloc() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed chunks under 32 MiB in its arenas)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_units(work, todo: list[Unit], dev: torch.device, workers: int, budget: int,
               progress: bool, desc: str = "quantize") -> None:
    """Run units on a thread pool, admitting one only while the estimated memory of those in flight stays
    within ``budget`` (the first unit that fits, in plan order; a unit larger than the budget runs alone)."""
    from ..model import single_threaded

    est = {u.name: u.memory_estimate(dev.type) for u in todo}
    pending = list(todo)
    inflight: dict = {}
    used = 0
    warned = False
    total = len(work.plan.prep_units if desc == "equalize" else work.plan.units)
    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit="block" if desc == "equalize" else "tensor",
               disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fasq-stream")
    try:
        # Each worker single-threaded (like fasq.quantize): same results as in memory, no OpenMP oversubscription.
        with single_threaded(workers > 1 and dev.type == "cpu"):
            while pending or inflight:
                while pending and len(inflight) < workers:
                    i = next((i for i, u in enumerate(pending) if used + est[u.name] <= budget), None)
                    if i is None:
                        if inflight:
                            break
                        i = 0
                        if not warned:
                            warned = True
                            log.warning("%s needs about %s, more than max_memory=%s; running such tensors alone",
                                        pending[0].name, human_bytes(est[pending[0].name]), human_bytes(budget))
                    u = pending.pop(i)
                    used += est[u.name]
                    inflight[pool.submit(work.run_unit, u, dev)] = u
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in finished:
                    u = inflight.pop(f)
                    used -= est[u.name]
                    work.commit(f.result())
                    _trim_malloc()
                    bar.set_postfix_str(u.name, refresh=False)
                    bar.update(1)
    finally:
        # Let running units end before the files close (a worker must never write to a recycled fd).
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
