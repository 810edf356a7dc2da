"""The manifest ``fasq.json`` of a saved model directory: which files define the model, with their sizes
and sha256, and the check of a directory against it.

Every file that defines the model is covered: the weights (``model.safetensors``, or every shard the
index names, and the index itself), ``config.json`` (it holds the per-module layout: a changed
``rotation_block`` would load with wrong logits) and ``generation_config.json`` when present.  A manifest
that leaves one of them out is refused, so an empty ``"files": {}`` checks nothing only in the sense that
it fails.  Tokenizer files are copied beside the model but are not part of it.

Schemas: 1 (``fasq.save`` before 2026-12): ``files`` = the weights only; 2 (streaming) adds ``tensors``,
``units``, ``stream``; 3 adds config.json and generation_config.json to ``files``, and ``source`` (the
model it was quantized from: an absolute path, or a hub id; ``fasq eval --reference`` scores it).  A manifest of schema
1 or 2 is still read (with a warning that config.json is not covered); its weights must be listed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from .errors import FormatError
from .format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from .outputs import MANIFEST_NAME
from .version import __version__

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_NAME = "generation_config.json"
SCHEMA = 3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_index(path: Path) -> dict[str, str] | None:
    """The sharded index's ``weight_map`` (tensor -> shard file), or None when the weights are one file."""
    index = Path(path) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        wmap = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and _plain_name(v) for k, v in wmap.items()):
        raise FormatError(f"{index}: 'weight_map' must map tensor names to file names in the directory")
    return wmap


def weight_files(path: Path) -> list[str]:
    """The safetensors files holding the weights: the shards the index names, else model.safetensors."""
    wmap = read_index(path)
    return sorted(set(wmap.values())) if wmap is not None else [WEIGHTS_NAME]


def defining_files(path: Path) -> list[str]:
    """Every file of ``path`` that defines the model (what the manifest must cover), in a fixed order."""
    path = Path(path)
    names = weight_files(path)
    if (path / INDEX_NAME).is_file():
        names.append(INDEX_NAME)
    names.append(CONFIG_NAME)
    if (path / GENERATION_NAME).is_file():
        names.append(GENERATION_NAME)
    return names


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def build(path: Path, known: dict[str, dict] | None = None, **extra) -> dict:
    """The manifest of directory ``path``: ``known`` entries (already hashed, e.g. by streaming's single
    pass) plus the other defining files, hashed now."""
    known = dict(known or {})
    files = {n: known.get(n) or file_entry(Path(path) / n) for n in defining_files(path)}
    return {"fasq_version": __version__, "format_version": _format_version_of(Path(path)), "schema": SCHEMA,
            "files": files, **extra}


def _format_version_of(path: Path) -> int:
    """The format version config.json's quantization_config declares (1 unless the model needs 2)."""
    try:
        qc = read_json_object(path / CONFIG_NAME, "").get("quantization_config")
    except FormatError:
        qc = None
    fv = qc.get("format_version") if isinstance(qc, dict) else None
    return fv if fv in READABLE_FORMAT_VERSIONS else FORMAT_VERSION


def write(path: Path, manifest: dict) -> None:
    """Write ``fasq.json`` atomically (synced, then renamed)."""
    target = Path(path) / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def read_json_object(file: Path, missing: str) -> dict:
    """The JSON object in ``file``; :class:`FormatError` with ``missing`` when there is no such file, and
    naming the file when it is not valid JSON or not an object."""
    if not file.is_file():
        raise FormatError(missing)
    try:
        obj = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{file}: must be a JSON object")
    return obj


def read(path: Path) -> dict:
    """The manifest of ``path``, checked for shape and coverage (not yet against the files: :func:`verify`)."""
    path = Path(path)
    mf = path / MANIFEST_NAME
    manifest = read_json_object(mf, f"{path}: manifest {MANIFEST_NAME} missing (incomplete or not written by fasq)")
    fv = manifest.get("format_version")
    if fv not in READABLE_FORMAT_VERSIONS or isinstance(fv, bool):
        raise FormatError(f"{mf}: format_version={fv!r}, but this fasq reads format versions "
                          f"{list(READABLE_FORMAT_VERSIONS)}")
    schema = manifest.get("schema", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise FormatError(f"{mf}: schema={schema!r} must be a positive integer")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FormatError(f"{mf}: 'files' must be an object mapping file names to their sha256 and bytes, "
                          f"got {type(files).__name__}")
    for name, info in files.items():
        if not _plain_name(name):
            raise FormatError(f"{mf}: {name!r} is not a file name in the directory")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and _SHA256.match(info["sha256"])
                and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)
                and info["bytes"] >= 0):
            raise FormatError(f"{mf}: the entry of {name} must be {{'sha256': 64 hex digits, 'bytes': an integer "
                              f">= 0}}, got {info!r}")
    required = defining_files(path)
    if schema < SCHEMA:
        required = [n for n in required if n not in (CONFIG_NAME, GENERATION_NAME)]
        log.warning("%s: manifest schema %s (written by an older fasq) does not cover config.json; re-save the "
                    "model to protect it", mf, schema)
    uncovered = [n for n in required if n not in files]
    if uncovered:
        raise FormatError(f"{mf}: {uncovered} define the model but are not covered by the manifest (edited or "
                          "replaced after saving?)")
    return manifest


def verify(path: Path) -> dict:
    """Check every file the manifest lists against its size and sha256; returns the manifest."""
    path = Path(path)
    manifest = read(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise FormatError(f"{path}: data file {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise FormatError(f"{f}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
        if sha256_file(f) != info["sha256"]:
            raise FormatError(f"{f}: checksum mismatch (the file is corrupted or was edited after saving)")
    return manifest
