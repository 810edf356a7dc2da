"""``fasq verify``: check a quantized directory against its manifest without loading the model.

Reads every data file once: the whole-file sha256 of the manifest's ``files`` (what :func:`fasq.io.load`
checks) and, for directories written by streaming, each tensor's sha256 from ``tensors``, so a corruption
is pinned to a tensor.  Also checks that every quantized module's buffers are present with the shapes and
dtypes its LayerSpec implies, and that the index (when sharded) matches the files.  Works on an unfinished
``<out>.partial`` directory too, reporting how many units are done and whole.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import io
from .. import manifest as fasq_manifest
from ..io import FormatError
from .plan import INDEX_NAME
from .run import DATA_DIR, JOURNAL_NAME, PARTIAL_SUFFIX, PLAN_NAME, read_journal
from .safetensors_io import DTYPE_NAMES, CheckpointError, hash_file_and_ranges, hash_ranges, read_header

MAX_LISTED = 8


def verify(path) -> dict:
    """Check ``path``; returns a summary, or raises :class:`fasq.io.FormatError` listing what is wrong."""
    path = Path(path)
    if (path / PLAN_NAME).is_file() and (path / DATA_DIR).is_dir():
        return verify_partial(path)
    if not path.is_dir():
        hint = ""
        if Path(str(path) + PARTIAL_SUFFIX).is_dir():
            hint = f" ({path}{PARTIAL_SUFFIX} holds an unfinished run: rerun the quantize command to finish it)"
        raise FormatError(f"{path}: no such directory{hint}")
    manifest = fasq_manifest.read(path)  # shape, versions, and that every defining file is covered
    files = manifest["files"]
    tensors = manifest.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(t, dict) for t in tensors.values()):
        raise FormatError(f"{path / io.MANIFEST_NAME}: 'tensors' must map tensor names to objects")
    _, specs, raw = io.read_quantization_config(path)
    embeddings = io.parse_embeddings(raw["quantization_config"], specs, str(path / "config.json"))
    specs = {**specs, **{n: spec for n, (spec, tied) in embeddings.items() if tied is None}}  # tables stored apart
    problems: list[str] = []
    stored: dict[str, tuple[str, str, tuple]] = {}  # tensor -> (file, dtype, shape)
    n_bytes = 0
    for fname, info in files.items():
        f = path / fname
        if not f.is_file():
            problems.append(f"data file {fname} is missing")
            continue
        size = f.stat().st_size
        n_bytes += size
        if size != info.get("bytes"):
            problems.append(f"{fname}: {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced)")
            continue
        if not fname.endswith(".safetensors"):
            if io.sha256_file(f) != info.get("sha256"):
                problems.append(f"{fname}: checksum mismatch (the file is corrupted)")
            continue
        try:
            entries, _ = read_header(f)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        stored.update({n: (fname, e.dtype, e.shape) for n, e in entries.items()})
        listed = [n for n, t in tensors.items() if t.get("file") == fname]
        for n in listed:
            e, t = entries.get(n), tensors[n]
            if e is None or [e.begin, e.end] != t.get("byte_range") or e.dtype != t.get("dtype"):
                problems.append(f"{fname}: tensor {n} is not where the manifest puts it")
        listed = [n for n in listed if n in entries]
        whole, per = hash_file_and_ranges(f, [(entries[n].begin, entries[n].end) for n in listed])
        bad = [n for n, h in zip(listed, per) if h != tensors[n].get("sha256")]
        if bad:
            problems.append(f"{fname}: {len(bad)} tensor(s) fail their checksum: {bad[:MAX_LISTED]}")
        elif whole != info.get("sha256"):
            problems.append(f"{fname}: checksum mismatch (the file is corrupted)")
    missing_in_files = sorted(set(tensors) - set(stored))
    if missing_in_files:
        problems.append(f"tensors in the manifest but in no data file: {missing_in_files[:MAX_LISTED]}")
    for mod, spec in specs.items():
        dts = spec.buffer_dtypes()
        for buf, shape in spec.buffer_shapes().items():
            name = f"{mod}.{buf}"
            got = stored.get(name)
            if got is None:
                problems.append(f"quantized module {mod}: buffer {buf} is not stored")
            elif got[1] != DTYPE_NAMES[dts[buf]] or tuple(got[2]) != tuple(shape):
                problems.append(f"{name}: stored {got[1]} {list(got[2])}, its LayerSpec implies "
                                f"{DTYPE_NAMES[dts[buf]]} {list(shape)}")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{INDEX_NAME}: unreadable ({e})")
        else:
            wrong = sorted(n for n in set(wmap) | set(stored) if wmap.get(n) != stored.get(n, (None,))[0])
            if wrong:
                problems.append(f"{INDEX_NAME} does not match the data files for {len(wrong)} tensor(s): "
                                f"{wrong[:MAX_LISTED]}")
    if problems:
        raise FormatError(f"{path}: " + "; ".join(problems[:MAX_LISTED])
                          + (f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""))
    return {"path": str(path), "complete": True, "files": len(files), "tensors": len(stored),
            "tensors_with_checksums": len(tensors), "quantized_modules": len(specs), "bytes": n_bytes}


def verify_partial(root: Path) -> dict:
    """Re-hash the units an unfinished run has journaled (what a resume would keep)."""
    plan = json.loads((root / PLAN_NAME).read_text())
    data = root / DATA_DIR
    total = plan.get("units_total")
    layouts: dict[Path, dict] = {}
    ok = bad = 0
    for rec in read_journal(root / JOURNAL_NAME):
        if not rec["outputs"]:  # an equalize unit that changed nothing
            ok += 1
            continue
        # equalize units wrote scratch/<block>.safetensors (path from root); the others a file of output/
        path = root / rec["file"] if rec["unit"].startswith("equalize:") else data / rec["file"]
        if path not in layouts:
            try:
                layouts[path] = read_header(path)[0]
            except CheckpointError:
                layouts[path] = {}
        ents = layouts[path]
        names = sorted(rec["outputs"])
        if not all(n in ents for n in names):
            bad += 1
            continue
        got = hash_ranges(path, [(ents[n].begin, ents[n].end) for n in names])
        if got == [rec["outputs"][n] for n in names]:
            ok += 1
        else:
            bad += 1
    return {"path": str(root), "complete": False, "units_done": ok, "units_damaged": bad, "units_total": total}
