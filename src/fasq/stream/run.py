"""Run a streaming quantization: the work directory, the journal, resuming, the equalize pass, the units
(scheduled by :mod:`fasq.stream.schedule`), and the atomic finish.

Layout while running (``<out>`` is the requested output)::

    <out>.partial/
        plan.json       what this run is: source fingerprint, settings, output files (compared on resume)
        journal.jsonl   one line per finished unit: its output tensors' sha256, appended after the data is synced
        .lock           held while a process works here
        scratch/        equalized tensors of each decoder block (when the config equalizes)
        output/         the future <out>: safetensors files preallocated with their final headers

A unit's tensors are written at their planned offsets and ``fdatasync``-ed before its journal line is
appended and ``fsync``-ed, so a journal line always names data that reached the disk.  On resume every
journaled unit is re-hashed; a unit whose bytes no longer match (or with a torn line) is redone.  When all
units are done, ``output/`` gets config.json, the index, the tokenizer files and the manifest, and is
renamed to ``<out>`` in one step; then ``<out>.partial`` is removed.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import manifest as fasq_manifest
from ..config import FASQConfig
from ..errors import StorageRangeError, check_fp16_range
from ..fit.pq import NonFiniteWeightError, quantize_weight
from ..format import LayerSpec
from ..model import single_threaded, warn_if_larger
from ..nn import set_module
from ..nn import PQLinear
from ..outputs import check_output, move_into_place, remove_stale_temporaries
from .plan import COMPANION_PATTERNS, INDEX_NAME, Plan, Unit, build_plan, open_source
from .schedule import default_memory_budget, human_bytes, parse_size, run_units
from .safetensors_io import (DTYPES, CheckpointError, FileWriter, TensorEntry, hash_file_and_ranges, hash_ranges,
                             iter_chunks, read_header, read_tensor, tensor_bytes)

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = ".lock"
DATA_DIR = "output"
SCRATCH_DIR = "scratch"


class DiskFullError(OSError):
    """The output's file system ran out of space; the partial output was removed."""


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def read_journal(path: Path) -> list[dict]:
    """The journal's records; a torn last line (a crash mid-append) is dropped."""
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "unit" in rec and isinstance(rec.get("outputs"), dict):
                recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------
class Workspace:
    """The ``<out>.partial`` directory of one run: creates or resumes it, runs and commits units, finishes."""

    def __init__(self, root: Path, plan: Plan):
        self.root = root
        self.data = root / DATA_DIR
        self.plan = plan
        self.scratch = root / SCRATCH_DIR
        self.writers: dict[str, FileWriter] = {}
        self.done: dict[str, dict] = {}
        self.powers: dict[str, tuple] = {}  # equalize="power" / "sampled": each block's powers, by equalize unit
        # error_feedback: the layers Workspace.sample fit (name -> (spec, tensors)), written by their quantize units
        self.fitted: dict[str, tuple[LayerSpec, dict[str, torch.Tensor]]] = {}
        self.overrides: dict[str, TensorEntry] = {}  # checkpoint tensor -> its equalized copy in scratch/
        self.resumed = 0
        self._lock_fd: int | None = None
        self._journal = None

    @classmethod
    def open(cls, root: Path, plan: Plan, *, restart: bool = False) -> "Workspace":
        ws = cls(root, plan)
        if restart or not (root / PLAN_NAME).is_file():
            need = sum(f.size for f in plan.files) + plan.scratch_bytes_max
            free = shutil.disk_usage(root.parent).free
            if need > free:  # checked before anything is created
                raise DiskFullError(errno.ENOSPC, f"not enough disk space for the output: it needs "
                                    f"{human_bytes(need)}, {root.parent} has {human_bytes(free)} free; "
                                    "nothing was written")
        root.mkdir(parents=True, exist_ok=True)
        fresh = True
        try:
            ws._lock()
            fresh = restart or not (root / PLAN_NAME).is_file()
            if fresh:  # new, restarted, or a start that died before its plan was written: nothing to keep
                for p in root.iterdir():
                    if p.name != LOCK_NAME:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            ws.data.mkdir(exist_ok=True)
            ws.scratch.mkdir(exist_ok=True)
            if fresh:
                plan_json = {"identity": plan.identity(), "units_total": len(plan.prep_units) + len(plan.units)}
                _write_atomic(root / PLAN_NAME, json.dumps(plan_json, indent=1))
            else:
                old = json.loads((root / PLAN_NAME).read_text()).get("identity", {})
                diffs = _diff(old, plan.identity())
                if diffs:
                    raise ValueError(f"{root} holds an unfinished run with other settings or input ("
                                     + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
                                     + "): rerun with the same settings to resume, or pass --restart "
                                     "(restart=True) to discard it")
            for f in plan.files:
                ws.writers[f.file] = FileWriter(ws.data / f.file, f, fresh=fresh)
            if not fresh:
                ws._verify_journal()
            ws._journal = open(root / JOURNAL_NAME, "a")
        except BaseException as e:
            held = ws._lock_fd is not None
            ws.close()
            if fresh and held:
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DiskFullError(errno.ENOSPC, f"disk full while creating {root}: {e}; nothing was kept") from None
            raise
        return ws

    def _lock(self) -> None:
        lock = self.root / LOCK_NAME
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ValueError(f"{self.root}: another fasq run is writing here (lock held)") from None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _verify_journal(self) -> None:
        """Keep the journaled units whose bytes still hash to their record; rewrite the journal with them."""
        units = {u.name: u for u in self.plan.prep_units + self.plan.units}
        good = []
        for rec in read_journal(self.root / JOURNAL_NAME):
            u = units.get(rec["unit"])
            if u is None or rec["unit"] in self.done:
                continue
            if u.kind == "equalize":
                entries = self._scratch_entries(rec)
                if entries is None or set(entries) != set(rec["outputs"]):
                    continue
            else:
                if set(rec["outputs"]) != {o.name for o in u.outputs}:
                    continue
                entries = self.plan.file_of(u).entries
            if any(rec["outputs"][n] != hash_ranges(self.data / e.file, [(e.begin, e.end)])[0]
                   for n, e in ((n, entries[n]) for n in rec["outputs"])):
                log.warning("%s: the stored tensors of %s fail their checksum; redoing it", self.root, u.name)
                continue
            self.done[u.name] = rec
            good.append(rec)
        self.resumed = len(good)
        _write_atomic(self.root / JOURNAL_NAME, "".join(json.dumps(r) + "\n" for r in good))
        log.info("%s: resuming, %d of %d units already done and whole", self.root, len(good), len(self.plan.units))

    def _scratch_entries(self, rec: dict) -> dict[str, TensorEntry] | None:
        """The tensors of an equalize unit's scratch file (file names made absolute), or None if unreadable."""
        if rec.get("file") is None:
            return {}
        path = (self.root / rec["file"]).absolute()  # read from the source root: must not be relative
        try:
            entries = read_header(path)[0]
        except CheckpointError:
            return None
        return {n: dataclasses.replace(e, file=str(path)) for n, e in entries.items()}

    def load_overrides(self) -> None:
        """After the equalize units: read each changed tensor from scratch/ instead of the checkpoint."""
        for u in self.plan.prep_units:
            self.overrides.update(self._scratch_entries(self.done[u.name]) or {})

    def _read(self, entry: TensorEntry) -> torch.Tensor:
        return read_tensor(self.plan.source.path, self.overrides.get(entry.name, entry))

    # ------------------------------------------------------------------------------------------
    def run_unit(self, u: Unit, device: torch.device) -> dict:
        """Compute one unit and write its tensors (thread-safe; returns the journal record)."""
        t0 = time.perf_counter()
        if u.kind == "equalize":
            return {**self._run_equalize(u), "seconds": round(time.perf_counter() - t0, 3)}
        w = self.writers[self.plan.file_of(u).file]
        hashes = {}
        src = self.plan.source.path
        if u.kind == "quantize":
            if u.name in self.fitted:
                spec, tensors = self.fitted.pop(u.name)
            elif self.plan.config.error_feedback and u.name in feedback_layers(self.plan):
                raise RuntimeError(f"internal: {u.name}: error feedback's layer was not fit by Workspace.sample")
            else:
                weight = self._read(u.sources[0])
                bias = self._read(u.sources[1]) if len(u.sources) > 1 else None
                spec, tensors = quantize_weight(weight, u.config, u.name, bias=bias, device=device, table=u.table)
                del weight, bias
            if spec != u.spec:
                raise RuntimeError(f"internal: {u.name}: quantize_weight made {spec}, the plan expected {u.spec} "
                                   "(fasq.fit.pq.planned_spec is out of date)")
            for buf, t in tensors.items():
                hashes[f"{u.name}.{buf}"] = w.write(f"{u.name}.{buf}", t)
        else:
            out = u.outputs[0]
            ent = w.layout.entries[out.name]
            h = hashlib.sha256()
            pos = ent.begin
            entry = self.overrides.get(u.sources[0].name, u.sources[0])
            chunk_dtype = entry.dtype
            for chunk in iter_chunks(src, entry):
                if chunk.is_floating_point() and not bool(chunk.isfinite().all()):  # as fasq.quantize refuses it
                    raise NonFiniteWeightError(f"tensor {out.name!r}: NaN/Inf values in the input; fasq cannot "
                                               "quantize this model")
                if out.dtype != chunk_dtype:
                    if out.dtype == "F16":
                        check_fp16_range(chunk, f"tensor {out.name}")
                    chunk = chunk.to(DTYPES[out.dtype])
                data = tensor_bytes(chunk)
                w.write_at(data, pos)
                h.update(data)
                pos += len(data)
            if pos != ent.end:
                raise RuntimeError(f"internal: {out.name}: wrote {pos - ent.begin} bytes, planned {ent.nbytes}")
            hashes[out.name] = h.hexdigest()
        w.sync()
        return {"unit": u.name, "file": w.layout.file, "outputs": hashes, "seconds": round(time.perf_counter() - t0, 3)}

    def _load_block(self, u: Unit, hashed: bool = True) -> tuple[torch.nn.Module, dict[str, str]]:
        """An equalize unit's decoder block with its stored tensors (in their stored dtype), and the sha256 of
        each tensor as read (``hashed``; the power pre-pass only reads the block and needs none)."""
        blk = copy.deepcopy(u.module)
        before = {}
        for local, e in zip(list(blk.state_dict()), u.sources):
            t = read_tensor(self.plan.source.path, e)
            if t.is_floating_point() and not bool(t.isfinite().all()):  # counted before equalize spreads it
                raise NonFiniteWeightError(f"tensor {e.name!r}: {int((~t.isfinite()).sum())} NaN/Inf values in the "
                                           "input; fasq cannot quantize it")
            if hashed:
                before[local] = hashlib.sha256(tensor_bytes(t)).hexdigest()
            mod_name, _, leaf = local.rpartition(".")
            mod = blk.get_submodule(mod_name) if mod_name else blk
            if leaf in mod._parameters:
                mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[leaf] = t
        return blk, before

    def block_powers(self) -> None:
        """equalize="power": the data-free input powers of every decoder block, block after block in model
        order (fasq.fit.equalize.ResidualPower, as fasq.quantize computes them on the whole model), one block
        in memory at a time; the embedding table is read in row blocks."""
        from ..families import family_for
        from ..fit.equalize import EMBEDDING_ROWS, ResidualPower, power_of_row_blocks

        cfg = self.plan.source.hf_config
        ent = self.plan.power_embedding
        rows, row_bytes = ent.shape[0], ent.nbytes // ent.shape[0]

        def row_blocks():
            for i in range(0, rows, EMBEDDING_ROWS):
                n = min(EMBEDDING_ROWS, rows - i)
                begin = ent.begin + i * row_bytes
                yield read_tensor(self.plan.source.path, dataclasses.replace(
                    ent, shape=(n, *ent.shape[1:]), begin=begin, end=begin + n * row_bytes))

        start = power_of_row_blocks(row_blocks(), rows, self.plan.power_embed_scale)
        res = ResidualPower(start, cfg, family_for(getattr(cfg, "model_type", None)))
        for u in self.plan.prep_units:
            self.powers[u.name] = res.step(self._load_block(u, hashed=False)[0])

    def sample(self, device: torch.device, workers: int = 1) -> None:
        """equalize="sampled" and error feedback: load the checkpoint whole, in its stored dtype, on ``device`` (the
        run checked that it fits the memory budget), draw the samples (:func:`fasq.fit.samples.draw`) and measure
        every block's input powers on them (equalize="sampled"); with ``error_feedback``, equalize the loaded model
        as the equalize units do and fit every layer that takes feedback in GPTQ's order, as fasq.quantize does
        (:func:`fasq.fit.feedback.fitted_in_order`: each layer's covariance needs the layers before it quantized; a
        block's layers on ``workers`` threads), keeping the results for the quantize units to write; then free the
        model."""
        from transformers import AutoModelForCausalLM

        from ..fit.equalize import equalize
        from ..fit.feedback import fitted_in_order
        from ..fit.samples import draw, sampled_powers
        from ..io import stored_dtype

        cfg = self.plan.config
        path = self.plan.source.path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=stored_dtype(str(path)) or torch.float32).to(device)
        ids = draw(model, sequences=cfg.sample_sequences)
        powers = None
        if cfg.equalize == "sampled":
            powers = sampled_powers(model, ids)
            for u, p in zip(self.plan.prep_units, powers, strict=True):
                self.powers[u.name] = p
        if cfg.error_feedback:
            if cfg.equalize != "none":
                equalize(model, cfg.equalize, powers=powers)
            units = feedback_layers(self.plan)

            def fit(name: str, h: torch.Tensor | None):
                lin = model.get_submodule(name)
                return name, quantize_weight(lin.weight, units[name].config, name, bias=lin.bias, device=device,
                                             hessian=h)

            with single_threaded(workers > 1), ThreadPoolExecutor(max_workers=workers) as pool:
                for name, (spec, tensors) in fitted_in_order(model, ids, list(units), fit, pool):
                    set_module(model, name, PQLinear.from_tensors(spec, **tensors))
                    self.fitted[name] = spec, {k: v.cpu() for k, v in tensors.items()}

    def _run_equalize(self, u: Unit) -> dict:
        """Load one decoder block in its stored dtype, run fasq.fit.equalize.equalize on it exactly as
        fasq.quantize runs it on the whole model (the transforms act block by block; equalize="power" with the
        block's powers from :meth:`block_powers`), and write the tensors it changed to
        scratch/<block>.safetensors (atomically)."""
        from safetensors.torch import save_file

        from ..fit.equalize import POWER_MODES, equalize

        prefix = u.name.split(":", 1)[1]
        blk, before = self._load_block(u)
        holder = torch.nn.Module()
        holder.block = blk
        holder.config = self.plan.source.hf_config
        mode = self.plan.config.equalize
        equalize(holder, mode, powers=[self.powers[u.name]] if mode in POWER_MODES else None)
        changed, hashes = {}, {}
        for local, t in blk.state_dict().items():
            h = hashlib.sha256(tensor_bytes(t)).hexdigest()
            if local in before and h != before[local]:
                changed[f"{prefix}.{local}"] = t.detach().contiguous()
                hashes[f"{prefix}.{local}"] = h
        rel = None
        if changed:
            rel = f"{SCRATCH_DIR}/{prefix}.safetensors"
            tmp = self.root / (rel + ".tmp")
            save_file(changed, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.root / rel)
        return {"unit": u.name, "file": rel, "outputs": hashes}

    def commit(self, rec: dict) -> None:
        """Record a finished unit (its data is already synced)."""
        self._journal.write(json.dumps(rec) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.done[rec["unit"]] = rec

    # ------------------------------------------------------------------------------------------
    def finish(self, out: Path, *, overwrite: bool, force: bool = False) -> dict:
        """Write config, index, companions and manifest into ``output/``, then move it to ``out``."""
        plan = self.plan
        for w in self.writers.values():
            w.sync()
        hf = plan.source.hf_config
        saved = getattr(hf, "quantization_config", None)
        hf.quantization_config = plan.quantization_config()
        try:
            hf.to_json_file(str(self.data / "config.json"))
        finally:
            if saved is None:
                del hf.quantization_config
            else:
                hf.quantization_config = saved
        if len(plan.files) > 1:
            total = sum(e.nbytes for f in plan.files for e in f.entries.values())
            _write_atomic(self.data / INDEX_NAME, json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(plan.weight_map.items()))}, indent=2))
        for pattern in COMPANION_PATTERNS:
            for p in sorted(plan.source.path.glob(pattern)):
                if p.is_file():
                    shutil.copyfile(p, self.data / p.name)
        manifest = self._manifest()
        fasq_manifest.write(self.data, manifest)
        _fsync_dir(self.data)
        move_into_place(self.data, out, overwrite=overwrite, force=force)
        _fsync_dir(out.parent)
        return manifest

    def _manifest(self) -> dict:
        """io.save's manifest (files: sha256, bytes) plus per-tensor checksums and per-unit settings.  The
        final pass re-hashes every tensor: a mismatch with the journal means the data changed on disk."""
        plan = self.plan
        files, tensors = {}, {}
        for f in plan.files:
            names = list(f.entries)
            ranges = [(f.entries[n].begin, f.entries[n].end) for n in names]
            whole, per = hash_file_and_ranges(self.data / f.file, ranges)
            files[f.file] = {"sha256": whole, "bytes": f.size}
            for n, h in zip(names, per):
                e = f.entries[n]
                tensors[n] = {"file": f.file, "dtype": e.dtype, "shape": list(e.shape), "byte_range": [e.begin, e.end],
                              "sha256": h}
        journaled = {n: h for rec in self.done.values() for n, h in rec["outputs"].items()}
        bad = [n for n, t in tensors.items() if journaled.get(n) != t["sha256"]]
        if bad:
            raise RuntimeError(f"{self.data}: {len(bad)} tensor(s) changed on disk after they were written, e.g. "
                               f"{bad[0]}; rerun to redo them")
        units = {u.name: {**u.describe(plan.config), "outputs": [o.name for o in u.outputs],
                          "seconds": self.done[u.name].get("seconds")} for u in plan.units}
        for u in plan.prep_units:  # what equalize changed (then read from scratch/ instead of the checkpoint)
            units[u.name] = {**u.describe(plan.config), "changed": sorted(self.done[u.name]["outputs"]),
                             "seconds": self.done[u.name].get("seconds")}
        return fasq_manifest.build(self.data, files, source=str(plan.source.path.resolve()), tensors=tensors,
                                   units=units, stream=plan.identity())

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._unlock()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
def feedback_layers(plan: Plan) -> dict[str, Unit]:
    """The layers a run with ``error_feedback`` fits in :meth:`Workspace.sample`, by name: every quantized linear but
    the embedding tables (fit in blocks of rows, without feedback)."""
    return {u.name: u for u in plan.units if u.kind == "quantize" and not u.table}


def _text_config(plan: Plan):
    """The decoder's config (a multimodal checkpoint's text config; a text model's own)."""
    cfg = plan.source.hf_config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def covariance_bytes(plan: Plan) -> int:
    """What :meth:`Workspace.sample` holds for ``error_feedback`` besides the model: the layers it fits until their
    units write them, one decoder block's fp32 [in, in] input covariances at a time (the largest block's: an upper
    bound, layers fed the same input share one), and the samples' hidden states (fp32, and the next block's)."""
    from ..fit.samples import LENGTH

    units = feedback_layers(plan)
    blocks: dict[str, int] = {}
    for name, u in units.items():
        m = re.match(r"(.*?\.\d+)\.", name)
        key = m.group(1) if m else name
        blocks[key] = blocks.get(key, 0) + 4 * u.spec.in_features ** 2
    hidden = getattr(_text_config(plan), "hidden_size", 0) or 0
    return (sum(u.spec.weight_storage_bytes() for u in units.values()) + max(blocks.values(), default=0)
            + 2 * 4 * plan.config.sample_sequences * LENGTH * hidden)


def sampling_bytes(plan: Plan) -> int:
    """What drawing the samples (:func:`fasq.fit.samples.sample_tokens`: all ``sample_sequences`` in one batch)
    holds besides the model: the KV cache of ``sample_sequences`` x LENGTH tokens in the checkpoint's floating
    dtype (keys and values of every layer), a third more for the cache's growth (each step reallocates it), and a
    few fp32 copies of one step's logits (the nucleus sampling's probabilities and candidates).  An estimate from
    the config, checked against the quantizations' peak RSS: from 64 to 128 sequences at 3 bits it rose by 1035 MiB
    (SmolLM2-135M, fp32) and 1113 MiB (Gemma-3-270M) on the mean of the sweep's seeds 0-3, where this rises by 1008
    and 1024 MiB."""
    from ..fit.equalize import _head_layout
    from ..fit.samples import LENGTH
    from ..io import stored_dtype

    c = _text_config(plan)
    layout = _head_layout(c)                                    # (heads, key/value heads, head dim)
    kv_width = 2 * layout[1] * layout[2] if layout else 0       # keys and values, per token and layer
    itemsize = (stored_dtype(str(plan.source.path)) or torch.float32).itemsize   # the dtype Workspace.sample loads
    seqs = plan.config.sample_sequences
    kv = seqs * LENGTH * (getattr(c, "num_hidden_layers", 0) or 0) * kv_width * itemsize * 4 // 3
    logits = 4 * 4 * seqs * (getattr(c, "vocab_size", 0) or 0)
    return kv + logits


def streamable(config: FASQConfig, model_bytes: int, budget: int, covariances: int = 0,
               sampling: int = 0) -> FASQConfig:
    """The config a streaming run uses.  ``equalize="sampled"`` and ``error_feedback`` sample text with the whole
    model, so the run loads the checkpoint once for that (then frees it) where its stored size, with what drawing
    the samples holds (``sampling`` bytes: :func:`sampling_bytes`) and, for error feedback, the ``covariances``
    bytes it then holds (:func:`covariance_bytes`; the two are not held at once), fits the memory budget; where it
    does not, the run uses ``"power"`` (estimated from the weights alone, one block at a time) and no error
    feedback, and says so."""
    if config.error_feedback and model_bytes + max(covariances, sampling) > budget:
        log.warning("error feedback samples text with the whole model and fits its layers there (with their input "
                    "covariances), %s in all, more than this run's memory budget of %s: this streaming run codes "
                    "without it, and records that. Raise --max-memory for error feedback.",
                    human_bytes(model_bytes + max(covariances, sampling)), human_bytes(budget))
        config = config.replace(error_feedback=False)
    if config.equalize != "sampled" or model_bytes + sampling <= budget:
        return config
    log.warning("equalize='sampled' samples text with the whole model, which takes %s with the sampling's KV cache, "
                "more than this run's memory budget of %s: this streaming run uses equalize='power' (estimated from "
                "the weights alone) instead, and records that. Raise --max-memory for 'sampled'.",
                human_bytes(model_bytes + sampling), human_bytes(budget))
    return config.replace(equalize="power")


def quantize_checkpoint(source, output, config: FASQConfig | None = None, *,
                        layer_configs: dict[str, FASQConfig] | None = None, device=None, workers: int | None = None,
                        max_memory=None, max_shard_size="5GB", target_bits: float | None = None,
                        target_fraction: float | None = None, overwrite: bool = False, restart: bool = False,
                        force: bool = False, progress: bool = True) -> dict:
    """Quantize the Hugging Face checkpoint directory ``source`` into the fasq directory ``output``, tensor by
    tensor, never holding the model in memory.  Resumes an interrupted run of the same command.

    ``max_memory`` (bytes or "4GiB"; default half the available memory) bounds the estimated working memory
    of the tensors in flight; ``workers`` (default: all cores, 2 on a GPU) run units in parallel.
    ``layer_configs``, ``target_bits`` and ``target_fraction`` mean what they mean to ``fasq.quantize``.
    The result is bit-identical to ``fasq.quantize`` of the model loaded in its stored dtype, then ``fasq.save``.
    Returns a summary (sizes, seconds, units done now and before).
    """
    t0 = time.perf_counter()
    config = config or FASQConfig()
    out = Path(output).absolute()  # every path of the run is absolute: a relative -o must not meet the source root
    work_root = partial_dir(out)
    check_output(out, sources=(source,), overwrite=overwrite, force=force)
    if out.exists() and work_root.is_dir() and not (work_root / DATA_DIR).exists():
        shutil.rmtree(work_root, ignore_errors=True)  # left by a run that ended between its rename and cleanup
    remove_stale_temporaries(out)  # a replaced output's .old-<pid> left by a killed finish
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is available here")
    budget = parse_size(max_memory) if max_memory is not None else default_memory_budget()
    workers = int(workers or ((os.cpu_count() or 1) if dev.type == "cpu" else 2))
    src = open_source(source)
    model_bytes = sum((src.path / f).stat().st_size for f in src.files)
    plan = build_plan(src, config, layer_configs, parse_size(max_shard_size), target_bits, target_fraction)
    usable = streamable(config, model_bytes, budget, covariance_bytes(plan) if config.error_feedback else 0,
                        sampling_bytes(plan))
    if usable != config:
        config = usable
        plan = build_plan(src, config, layer_configs, parse_size(max_shard_size), target_bits, target_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Workspace.open(work_root, plan, restart=restart)
    prep = [u for u in plan.prep_units if u.name not in work.done]
    todo = [u for u in plan.units if u.name not in work.done]
    try:
        todo_feedback = feedback_layers(plan).keys() & {u.name for u in todo} if plan.config.error_feedback else set()
        if prep and plan.config.equalize == "power":
            work.block_powers()
        if (prep and plan.config.equalize == "sampled") or todo_feedback:   # a resumed run measures again
            from ..cli_args import announce_sampling
            announce_sampling(plan.config, show=progress)
            work.sample(dev, workers)
        if prep:
            run_units(work, prep, dev, workers, budget, progress, desc="equalize")
        work.load_overrides()
        run_units(work, todo, dev, workers, budget, progress)
        manifest = work.finish(out, overwrite=overwrite, force=force)
    except (CheckpointError, NonFiniteWeightError, StorageRangeError, DiskFullError):
        work.discard()
        raise
    except OSError as e:
        if e.errno != errno.ENOSPC:
            work.close()
            raise
        work.discard()
        need = human_bytes(sum(f.size for f in plan.files))
        raise DiskFullError(errno.ENOSPC, f"disk full while writing {work_root} ({e}); the partial output was "
                            f"removed: it needs {need} plus the config and tokenizer files; free some space and "
                            "rerun") from None
    except BaseException:
        work.close()  # kept: rerun the same command to resume
        raise
    work.close()
    shutil.rmtree(work_root, ignore_errors=True)
    warn_if_larger(plan.size_report())
    secs = {u: m["seconds"] for u, m in manifest["units"].items()}
    return {"output": str(output), "units": len(plan.prep_units) + len(plan.units), "units_resumed": work.resumed,
            "units_run": len(prep) + len(todo), "blocks_equalized": len(plan.prep_units),
            "files": [f for f in manifest["files"] if f not in (fasq_manifest.CONFIG_NAME, fasq_manifest.GENERATION_NAME)], "seconds": time.perf_counter() - t0, "unit_seconds": secs,
            "workers": workers, "max_memory": budget, "config": plan.config.to_dict(), **plan.size_report()}
