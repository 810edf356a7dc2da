"""Build-and-cache for fasq's C++ CPU extensions (``torch.utils.cpp_extension``), never at import.

Each extension is compiled once per machine, source, flags and torch version into
``~/.cache/fasq/<subdir>/<hash>/`` (``$FASQ_CACHE`` overrides ``~/.cache/fasq`` as for every fasq cache,
and ``$FASQ_CACHE_DIR`` for the builds alone); a ``built.ok``
marker, written atomically after a successful build, is what later processes trust.  Flags are tried
in order (``-march=native`` with OpenMP first, then a portable ``-O3``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ATTEMPTS = (("native", ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]),
            ("portable", ["-O3"], []))


def cache_root() -> Path:
    from .data import cache_dir  # $FASQ_CACHE or ~/.cache/fasq, like every fasq cache

    return Path(os.environ.get("FASQ_CACHE_DIR") or cache_dir())


def cpu_flags() -> str:
    """The CPU's feature flags (part of the build key: a cached -march=native build is per CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(source: Path, cflags: list[str], headers: tuple[Path, ...] = ()) -> str:
    """The cache key: the source and every header it includes (by name and content), flags, torch,
    Python, compiler and CPU.  ``headers`` must list every file ``source`` includes from the package,
    so that editing any of them builds afresh."""
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(headers):
        h.update(b"\0" + header.name.encode() + b"\0" + header.read_bytes())
    for part in (torch.__version__, sys.version, " ".join(cflags), os.environ.get("CXX", ""), cpu_flags()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build(source: Path, prefix: str, subdir: str, cflags: list[str], ldflags: list[str],
          headers: tuple[Path, ...] = ()):
    """Compile ``source`` (or reuse the cached build) and import it as a Python module (loading it also
    registers any ``torch.library`` ops it defines).  ``headers``: the files it includes (build_key)."""
    from torch.utils import cpp_extension

    key = build_key(source, cflags, headers)
    name = f"{prefix}_{key}"
    build_dir = cache_root() / subdir / key
    so_path, marker = build_dir / f"{name}.so", build_dir / "built.ok"
    if marker.exists() and so_path.exists():
        return _import_module(name, so_path)
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("fasq: building %s in %s (once per machine, about a minute)", source.name, build_dir)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # cpp_extension's own warnings go to DEBUG
        warnings.simplefilter("always")
        lib = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
                                 build_directory=str(build_dir), is_python_module=True, verbose=False)
    for w in caught:
        log.debug("cpp_extension: %s", w.message)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(f"{torch.__version__} {' '.join(cflags)}\n")
    tmp.replace(marker)  # atomic: another process never loads a half-written library
    log.info("fasq: %s built in %.0f s", source.name, time.perf_counter() - t0)
    return lib


def _import_module(name: str, so_path: Path):
    spec = importlib.util.spec_from_file_location(name, so_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_first_that_works(source: Path, prefix: str, subdir: str, headers: tuple[Path, ...] = ()):
    """Try :data:`ATTEMPTS` in order (``headers``: the files ``source`` includes, see build_key); returns ``(label, module, failures)`` for the first that
    builds, ``failures`` naming the attempts before it that failed ("" when none).  Raises
    RuntimeError naming each attempt's last error line when none builds; compiler output goes to
    DEBUG."""
    errors: list[str] = []
    for label, cflags, ldflags in ATTEMPTS:
        try:
            return label, build(source, prefix, subdir, cflags, ldflags, headers), "; ".join(errors)
        except Exception as e:  # noqa: BLE001 - any build/load failure means: try the next flags
            msg = str(e).strip().splitlines()
            reason = msg[-1] if msg else type(e).__name__
            if not any(reason in err for err in errors):
                errors.append(f"{label}: {reason}")
            log.debug("fasq: build of %s (%s) failed:\n%s", source.name, label, e)
    raise RuntimeError("; ".join(errors))
