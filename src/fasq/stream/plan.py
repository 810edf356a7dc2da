"""What a streaming run will do, decided before any tensor is read: the source checkpoint (checked whole),
the work units (one per quantized linear, one per other tensor), and where every output tensor goes.

The architecture comes from a skeleton model built on the meta device (no weights are allocated), planned by
:func:`fasq.planning.plan_quantization` -- the plan :func:`fasq.quantize` carries out in memory: the same
quantized layers, per-layer configs and specs, and decoder blocks to equalize.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import FASQConfig
from ..fit.pq import fit_block_rows
from ..format import FORMAT_VERSION, LayerSpec
from ..embedding import embed_scale_of, replace_embedding
from ..model import replace_with_pq
from ..planning import NoLayersError, plan_quantization, quantization_record
from .safetensors_io import (COPY_CHUNK_BYTES, DTYPE_NAMES, ITEMSIZE, CheckpointError, FileLayout, TensorEntry,
                             plan_file, read_header)

log = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")      # what a quantized weight may be stored as
STORED_DTYPE = {"F32": "F16", "F16": "F16", "BF16": "BF16"}  # unquantized tensors, as io.save stores them
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")        # copied unchanged
# Files besides the weights that a quantized directory keeps (tokenizer, generation settings).
COMPANION_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.tiktoken", "chat_template.*", "generation_config.json")
# Working memory of fasq.fit.pq.quantize_weight on CPU, in bytes per weight: about a dozen fp32 and int64
# copies of the matrix live at its peak (rotated, padded, normalized, residuals, codes, faiss results).
# Measured 28-51 B/weight at d=2 and 25-39 at d=4 on 4M-17M-weight matrices; see docs/streaming.md.
CPU_BYTES_PER_WEIGHT = 32.0
CPU_CODE_BYTES = 36.0  # ... plus this much per weight, per codebook, divided by subvector_dim
EQUALIZE_BYTES_PER_WEIGHT = 16  # balance_mlp: fp32 copies of gate and up, then of both times the gain


# ----------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A checked Hugging Face checkpoint directory: its config and where each tensor lives."""

    path: Path
    hf_config: object
    entries: dict[str, TensorEntry]
    files: list[str]

    def fingerprint(self) -> dict:
        """What identifies the input of a run: config.json and each shard's size, mtime and header."""
        files = {}
        for name in self.files:
            p = self.path / name
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                head = f.read(n)
            st = p.stat()
            files[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "header_sha256": hashlib.sha256(head).hexdigest()}
        cfg = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        return {"config_sha256": cfg, "files": files}


def open_source(path) -> Source:
    """Check a checkpoint directory whole (config, index, every shard's header and size) and return it.

    Raises :class:`CheckpointError` naming the problem: not a directory, no config.json, no safetensors
    weights, a missing or truncated shard, an index naming tensors its shard lacks, an unknown dtype.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (streaming reads a Hugging Face checkpoint directory)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face model directory")
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises ValueError, KeyError, OSError for unknown model types
        raise CheckpointError(f"{path / 'config.json'}: not a model config transformers knows ({e})") from None
    index = path / INDEX_NAME
    entries: dict[str, TensorEntry] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a {tensor: file} object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        headers = {}
        for f in files:
            if "/" in f or f.startswith("."):
                raise CheckpointError(f"{index}: shard name {f!r} is not a file in the directory")
            headers[f] = read_header(path / f)[0]
        absent = [(n, f) for n, f in weight_map.items() if n not in headers[f]]
        if absent:
            n, f = absent[0]
            raise CheckpointError(f"{index}: names {len(absent)} tensor(s) absent from their shard, e.g. {n!r} "
                                  f"in {f} (incomplete download or mismatched index)")
        entries = {n: headers[f][n] for n, f in weight_map.items()}
    elif (path / SINGLE_NAME).is_file():
        files = [SINGLE_NAME]
        entries = read_header(path / SINGLE_NAME)[0]
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".safetensors"))
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}"
                              + (f" (found {others[:3]}: streaming reads safetensors only)" if others else ""))
    return Source(path, hf_config, entries, files)


def build_skeleton(source: Source):
    """The causal-LM architecture of ``source`` with every weight on the meta device, tied like at load."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(source.hf_config)
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise CheckpointError(f"{source.path}: already quantized (quantization_config quant_method={method!r}); "
                              "fasq quantizes full-precision checkpoints")
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        mt = getattr(cfg, "model_type", "?")
        raise CheckpointError(f"{source.path}: not a causal language model (model_type={mt!r}; "
                              f"transformers: {str(e).splitlines()[0]})") from None
    model.tie_weights()
    return model


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Unit:
    """One piece of work, committed as a whole: a quantized linear (reads its weight and bias, writes the
    PQ buffers), one unquantized tensor (copied in chunks, fp32 stored as fp16), or -- before those, when
    the config equalizes -- one decoder block run through :func:`fasq.fit.equalize.equalize`, whose changed
    tensors go to a scratch file that the other units then read instead of the checkpoint."""

    name: str
    kind: str                        # "quantize" | "copy" | "equalize"
    sources: tuple[TensorEntry, ...]  # quantize: (weight,) or (weight, bias); copy: (tensor,); equalize: the block's
    outputs: tuple[Output, ...]
    spec: LayerSpec | None = None
    config: FASQConfig | None = None
    module: object = None            # equalize: the block's module on the meta device
    table: bool = False              # quantize: an embedding table (or the head as one), fit in blocks of rows

    @property
    def numel(self) -> int:
        return self.sources[0].numel

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def output_bytes(self) -> int:
        return sum(ITEMSIZE[o.dtype] * _prod(o.shape) for o in self.outputs)

    def memory_estimate(self, device_type: str) -> int:
        """Bytes of host memory this unit holds at its peak (used to admit units under --max-memory)."""
        if self.kind == "equalize":  # the block, plus a few fp32 copies of its largest matrix while balancing
            return self.source_bytes + EQUALIZE_BYTES_PER_WEIGHT * max(s.numel for s in self.sources) + (16 << 20)
        if self.kind == "copy":
            return 3 * min(self.source_bytes, COPY_CHUNK_BYTES)
        if device_type != "cpu":  # k-means runs on the accelerator; the host holds the weight and results
            return self.source_bytes + 4 * self.numel + self.output_bytes
        per = CPU_BYTES_PER_WEIGHT + CPU_CODE_BYTES * self.spec.num_codebooks / self.spec.subvector_dim
        rows = fit_block_rows(self.spec.out_features, self.spec.in_features, self.table)
        if rows:   # a blocked fit: one block's working memory, plus its outputs held whole
            return self.source_bytes + self.output_bytes + int(per * rows * self.spec.in_features) + (16 << 20)
        return self.source_bytes + int(per * self.numel) + (16 << 20)

    def describe(self, base: FASQConfig) -> dict:
        d = {"kind": self.kind, "sources": [s.name for s in self.sources],
             "source_dtype": self.sources[0].dtype, "shape": list(self.sources[0].shape)}
        if self.kind == "quantize":
            over = {k: v for k, v in self.config.to_dict().items() if base.to_dict().get(k) != v}
            d.update(spec=self.spec.to_dict(), config_overrides=over)
        elif self.kind == "copy":
            d["stored_dtype"] = self.outputs[0].dtype
        return d


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Plan:
    source: Source
    config: FASQConfig
    layer_configs: dict[str, FASQConfig]
    units: list[Unit]
    files: list[FileLayout]
    fingerprint: dict = field(default_factory=dict)
    allocation: dict | None = None   # target_bits / target_fraction, as fasq.model.attach_config records it
    prep_units: list[Unit] = field(default_factory=list)  # equalize units, run before ``units``
    embeddings: dict[str, dict] | None = None  # quantization_config["embeddings"] (quantized embedding tables)
    head_name: str | None = None     # the output head, quantized with the embedding's settings when embeddings is set
    # equalize="power": the input embedding table and its scale, the start of fasq.fit.equalize.ResidualPower
    power_embedding: TensorEntry | None = None
    power_embed_scale: float = 1.0

    @property
    def format_version(self) -> int:
        """What the output declares: 2 only with quantized embeddings (as fasq.planning.quantization_record)."""
        return 2 if self.embeddings else 1

    @property
    def scratch_bytes_max(self) -> int:
        """Disk the equalized tensors may need at most (only the tensors equalize changes are written)."""
        return sum(u.source_bytes for u in self.prep_units)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: f.file for f in self.files for name in f.entries}

    def file_of(self, unit: Unit) -> FileLayout:
        name = unit.outputs[0].name
        return next(f for f in self.files if name in f.entries)

    def quantization_config(self) -> dict:
        modules = {u.name: u.spec.to_dict() for u in self.units
                   if u.kind == "quantize" and u.name not in (self.embeddings or {})}
        return quantization_record(self.config, modules, self.allocation, self.embeddings)

    def identity(self) -> dict:
        """What a resumed run must share with the run that started the partial output."""
        return {"fasq_version": __version__, "format_version": self.format_version, "config": self.config.to_dict(),
                "layer_configs": {k: v.to_dict() for k, v in sorted(self.layer_configs.items())},
                "allocation": self.allocation,
                "source": self.fingerprint,
                "files": {f.file: {"bytes": f.size, "header_sha256": hashlib.sha256(f.header).hexdigest()}
                          for f in self.files}}

    def size_report(self) -> dict:
        """Stored sizes, counted like :func:`fasq.model.model_size_report`."""
        q_bytes = q_weights = e_bytes = e_weights = other = fp16 = 0
        tables = {*(self.embeddings or {}), self.head_name} if self.embeddings else set()
        for u in self.units:
            if u.kind == "quantize" and u.name in tables:
                e_bytes += u.spec.weight_storage_bytes()
                e_weights += u.numel
                fp16 += 2 * u.numel
            elif u.kind == "quantize":
                q_bytes += u.spec.weight_storage_bytes()
                q_weights += u.numel
                fp16 += 2 * u.numel + (2 * u.spec.out_features if u.spec.has_bias else 0)
                other += 2 * u.spec.out_features if u.spec.has_bias else 0
            elif u.outputs[0].dtype in STORED_DTYPE.values():
                other += u.output_bytes
                fp16 += 2 * u.numel
        return {"quantized_layers": sum(u.kind == "quantize" for u in self.units), "quantized_weights": q_weights,
                "quantized_bytes": q_bytes, "bits_per_weight": 8.0 * q_bytes / q_weights if q_weights else float("nan"),
                "embedding_weights": e_weights, "embedding_bytes": e_bytes,
                "embedding_bits_per_weight": 8.0 * e_bytes / e_weights if e_weights else None,
                "other_bytes": other, "total_bytes": q_bytes + e_bytes + other, "fp16_bytes": fp16,
                "fraction_of_fp16": (q_bytes + e_bytes + other) / fp16 if fp16 else float("nan"),
                "model_bits_per_weight": 16.0 * (q_bytes + e_bytes + other) / fp16 if fp16 else float("nan")}


def build_plan(source: Source, config: FASQConfig, layer_configs: dict[str, FASQConfig] | None = None,
               max_shard_bytes: int = 5 << 30, target_bits: float | None = None,
               target_fraction: float | None = None) -> Plan:
    """Units in the model's state_dict order, and output files of at most ``max_shard_bytes`` each.
    ``target_bits`` / ``target_fraction`` choose per-layer settings as :func:`fasq.quantize` does."""
    model = build_skeleton(source)
    arch = type(model).__name__
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    tied = {n: tuple(g) for g in groups.values() if len(g) > 1 for n in g}
    entries = source.entries

    def entry_for(key: str, role: str) -> TensorEntry:
        for k in (key, *tied.get(key, ())):
            if k in entries:
                return entries[k]
        raise CheckpointError(f"{source.path}: the checkpoint has no tensor {key!r}, which {arch} needs ({role}); "
                              "streaming reads tensors by the model's module names, and transformers renames or "
                              "merges some on loading (e.g. a mixture-of-experts checkpoint's experts): quantize "
                              "it with --in-memory (fasq.quantize), which loads it through transformers")

    try:
        qplan = plan_quantization(model, config, layer_configs, target_bits, target_fraction)
    except NoLayersError as e:
        raise CheckpointError(f"{source.path}: {arch} has {e}") from None
    units: list[Unit] = []
    for layer in qplan.layers:
        name, lin, spec = layer.name, layer.linear, layer.spec
        srcs = [entry_for(f"{name}.weight", "a quantized linear's weight")]
        if lin.bias is not None:
            srcs.append(entry_for(f"{name}.bias", "a quantized linear's bias"))
        for s, shape in zip(srcs, [(lin.out_features, lin.in_features), (lin.out_features,)]):
            _check_source(source, s, shape, FLOAT_DTYPES)
        dts = spec.buffer_dtypes()
        outs = tuple(Output(f"{name}.{b}", DTYPE_NAMES[dts[b]], shape) for b, shape in spec.buffer_shapes().items())
        units.append(Unit(name, "quantize", tuple(srcs), outs, spec, layer.config, table=layer.table))
    emb = qplan.embedding
    if emb is not None and emb.tied_head is None:   # an untied table is fit on its own, like a linear
        src = entry_for(f"{emb.name}.weight", "the token embedding")
        _check_source(source, src, (emb.spec.out_features, emb.spec.in_features), FLOAT_DTYPES)
        dts = emb.spec.buffer_dtypes()
        outs = tuple(Output(f"{emb.name}.{b}", DTYPE_NAMES[dts[b]], shape) for b, shape in emb.spec.buffer_shapes().items())
        units.append(Unit(emb.name, "quantize", (src,), outs, emb.spec, emb.config, table=True))
    by_module = {u.name: u for u in units}
    prep = _equalize_units(qplan, entry_for)  # before the swap: equalize works on nn.Linear
    power_emb, power_scale = _power_embedding(model, config, entry_for) if prep else (None, 1.0)
    replace_with_pq(model, {lp.name: lp.spec for lp in qplan.layers}, device="meta")
    if emb is not None:   # its weight leaves the state_dict: tied, the head's buffers are the table
        replace_embedding(model, emb.name, emb.spec, emb.tied_head, device="meta")
    ordered: list[Unit] = []
    stored_groups: set[tuple] = set()
    for key, t in model.state_dict().items():
        mod = key.rpartition(".")[0]
        if mod in by_module:
            if not ordered or ordered[-1] is not by_module[mod]:  # a module's buffers are consecutive
                ordered.append(by_module[mod])
            continue
        if key in tied:
            if tied[key] in stored_groups:
                continue  # a tied tensor (lm_head.weight = embed_tokens.weight) is stored once
            stored_groups.add(tied[key])
        ent = entry_for(key, "an unquantized tensor")
        _check_source(source, ent, tuple(t.shape), FLOAT_DTYPES + INT_DTYPES)
        ordered.append(Unit(key, "copy", (ent,), (Output(key, STORED_DTYPE.get(ent.dtype, ent.dtype), ent.shape),)))
    used = {s.name for u in ordered + prep for s in u.sources}
    unused = sorted(set(entries) - used)
    if unused:
        log.warning("%s: ignoring %d checkpoint tensor(s) that %s does not use, e.g. %s",
                    source.path, len(unused), arch, unused[:3])
    embeddings = {emb.name: emb.record()} if emb is not None else None
    return Plan(source, config, qplan.layer_configs, ordered, _layout(ordered, max_shard_bytes, 2 if emb else 1),
                source.fingerprint(), qplan.allocation, prep, embeddings,
                _head_name(model) if emb is not None else None, power_emb, power_scale)


def _power_embedding(model, config: FASQConfig, entry_for) -> tuple[TensorEntry | None, float]:
    """equalize="power" starts its residual-power model from the input embedding table: its tensor and scale."""
    if config.equalize != "power":
        return None, 1.0
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    return entry_for(f"{name}.weight", "the token embedding (equalize='power' reads it)"), embed_scale_of(emb)


def _head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _equalize_units(qplan, entry_for) -> list[Unit]:
    """One unit per decoder block the plan equalizes, holding a copy of the block (on the meta device)."""
    return [Unit(f"equalize:{prefix}", "equalize",
                 tuple(entry_for(f"{prefix}.{k}", "a tensor of a decoder block") for k in blk.state_dict()),
                 (), module=copy.deepcopy(blk))
            for prefix, blk in qplan.blocks]


def _check_source(source: Source, ent: TensorEntry, shape: tuple, dtypes: tuple[str, ...]) -> None:
    if ent.dtype not in dtypes:
        raise CheckpointError(f"{source.path / ent.file}: tensor {ent.name!r} is {ent.dtype}; fasq streams "
                              f"{'/'.join(dtypes)} tensors here (F8/F64 checkpoints are not supported)")
    if tuple(ent.shape) != tuple(shape):
        raise CheckpointError(f"{source.path / ent.file}: tensor {ent.name!r} has shape {list(ent.shape)}, the "
                              f"model config implies {list(shape)}")


def _layout(units: list[Unit], max_shard_bytes: int, format_version: int = FORMAT_VERSION) -> list[FileLayout]:
    groups: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if groups[-1] and size + u.output_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.output_bytes
    n = len(groups)
    meta = {"format": "pt", "fasq": str(format_version)}
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [plan_file(name, [(o.name, o.dtype, o.shape) for u in g for o in u.outputs], meta)
            for name, g in zip(names, groups)]
