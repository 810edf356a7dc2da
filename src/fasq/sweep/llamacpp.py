"""llama.cpp's GGUF files of a model, made once and cached: the F16 conversion of a checkpoint and each
quantized type (no importance matrix), for the sweep's ``llamacpp`` rows and benchmarks/cpu_llamacpp.py.

    gguf_for(model_dir, "Q4_K_M")   # -> ~/.cache/fasq/gguf/<model dir name>/Q4_K_M.gguf

llama.cpp is a measured peer, never a dependency of fasq: ``llama_cpp`` (llama-cpp-python, built from its
sdist by ``fasq sweep --setup-baselines``) is imported only here and in :mod:`fasq.sweep.llamacpp_eval`.
The F16 file comes from llama.cpp's own ``convert_hf_to_gguf.py``, vendored in the same sdist (found in
``$FASQ_LLAMA_CPP_SRC`` or ``cache_dir()/llama.cpp-<version>``, extracted from the sdist by ``pip download``
when missing); the quantized files from ``llama_model_quantize`` on that F16 file, with llama.cpp's own
per-tensor type choices (``Q4_K_M`` mixes Q4_K and Q6_K; rows whose length is not a multiple of 256 fall
back to 32-wide types).  A file is written under a temporary name and renamed, so a file at the final path is
whole; a ``<TYPE>.json`` beside it holds the key it was made from (the checkpoint's config, weight-file names,
sizes and times, llama.cpp's version, the type) and a file whose key no longer matches is made again.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"      # the llama-cpp-python release the sweep's baselines venv builds
# The types the sweep runs (issue 25): the common 4-bit and 3-bit K-quants and i-quants.
QTYPES = ("Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_S", "IQ3_XXS")
CONVERTED = ("F16", "F32")       # made by convert_hf_to_gguf.py; every other type by llama_model_quantize


def gguf_dir(model_dir: str | os.PathLike) -> Path:
    from ..data import cache_dir

    return cache_dir() / "gguf" / Path(model_dir).resolve().name


def source_key(model_dir: str | os.PathLike) -> str:
    """A hash of the checkpoint: its JSON files' bytes and its weight files' names, sizes and times."""
    p = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def gguf_for(model_dir: str | os.PathLike, qtype: str, threads: int = 2) -> Path:
    """The GGUF file of ``model_dir`` (a Hugging Face checkpoint directory) in llama.cpp type ``qtype``
    (``F16``, ``F32``, or any ``LLAMA_FTYPE_MOSTLY_<TYPE>``, e.g. ``Q4_K_M``), made on first use.

    Raises ``ValueError`` for an unknown type and ``RuntimeError`` (with llama.cpp's reason) when
    llama.cpp refuses to make it, e.g. a type that needs an importance matrix.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir={str(model_dir)!r}: not a checkpoint directory (no config.json)")
    qtype = qtype.upper()
    ftype = _ftype(qtype)
    out_dir = gguf_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out, meta_path = out_dir / f"{qtype}.gguf", out_dir / f"{qtype}.json"
    key = {"source": source_key(model_dir), "llama_cpp_python": llama_cpp_version(), "type": qtype}
    with _locked(out_dir / f".{qtype}.lock"):   # a sweep worker and a benchmark may ask at once
        if out.is_file() and _read_json(meta_path).get("key") == key:
            return out
        src = None if qtype in CONVERTED else gguf_for(model_dir, "F16", threads)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{qtype}.", suffix=".gguf.tmp", dir=out_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if src is None:
                _convert(model_dir, tmp, qtype.lower())
            else:
                _quantize(src, tmp, qtype, ftype, threads)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        _write_json_atomic(meta_path, {"key": key, "model_dir": str(model_dir.resolve()), "bytes": out.stat().st_size})
        log.info("made %s (%.1f MiB)", out, out.stat().st_size / 2**20)
    return out


def _ftype(qtype: str) -> int | None:
    if qtype in CONVERTED:
        return None
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"qtype={qtype!r} is not a llama.cpp file type: allowed are {known}")
    return int(ftype)


def _quantize(src: Path, dst: Path, qtype: str, ftype: int, threads: int) -> None:
    """``llama_model_quantize`` without an importance matrix; llama.cpp's log is kept for the error."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with _llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        why = " ".join(ln.strip() for ln in lines if "error" in ln.lower() or "fail" in ln.lower())[-800:]
        raise RuntimeError(f"llama.cpp refused to quantize {src.name} to {qtype} (llama_model_quantize returned "
                           f"{rc}): {why or 'no reason logged'}")


@contextlib.contextmanager
def _llama_log():
    """Collect llama.cpp's log lines (instead of llama-cpp-python's printing them) while inside."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        log.debug("llama.cpp: %s", "".join(lines)[-4000:])


def converter_dir() -> Path:
    """llama.cpp's conversion sources (convert_hf_to_gguf.py, conversion/, gguf-py/) of the installed
    llama-cpp-python's sdist: ``$FASQ_LLAMA_CPP_SRC``, or extracted once into the cache."""
    from ..data import cache_dir

    env = os.environ.get("FASQ_LLAMA_CPP_SRC")
    if env:
        d = Path(env)
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"FASQ_LLAMA_CPP_SRC={env!r}: no convert_hf_to_gguf.py there")
        return d
    version = llama_cpp_version()
    d = cache_dir() / f"llama.cpp-{version}"
    if not (d / "convert_hf_to_gguf.py").is_file():
        _fetch_converter(d, version)
    return d


def _fetch_converter(dest: Path, version: str) -> None:
    """Extract vendor/llama.cpp's conversion sources from the llama-cpp-python sdist (pip download)."""
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading the llama-cpp-python %s sdist for convert_hf_to_gguf.py", version)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        extract_converter(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")), dest)


def extract_converter(sdist: Path, dest: Path) -> Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ of the sdist's vendor/llama.cpp, into ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/vendor/llama.cpp/", 1)[1] if "/vendor/llama.cpp/" in m.name else ""
                if m.isfile() and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))):
                    m.name = rel
                    tar.extract(m, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dest


def _convert(model_dir: Path, dst: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py (in this interpreter; it needs torch, transformers, sentencepiece)."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(dst)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}   # its own gguf-py, as vendored
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}): "
                           f"{proc.stderr[-1500:]}")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
