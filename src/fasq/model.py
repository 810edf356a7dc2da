"""Quantize a whole model: walk its linear layers, fit each one, swap in PQLinear, and report sizes."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FASQConfig
from .fit.equalize import equalize
from .fit.feedback import fitted_in_order
from .fit.samples import draw, sampled_powers
from .fit.pq import NonFiniteWeightError, quantize_weight
from .format import LayerSpec
from .nn import PQLinear, set_module
from .planning import is_skipped, quantizable_linears  # noqa: F401  (their home is fasq.planning)
from .embedding import PQEmbedding, replace_embedding
from .planning import EmbeddingPlan, plan_quantization, quantization_record
from .storage import round_unquantized_to_16bit

log = logging.getLogger(__name__)


@contextlib.contextmanager
def single_threaded(active: bool = True):
    """Run torch (and faiss, when installed) single-threaded inside the block, restoring after."""
    if not active:
        yield
        return
    prev = torch.get_num_threads()
    faiss = None
    try:
        import faiss  # noqa: F811
        prev_f = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
    except Exception:
        faiss = None
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        if faiss is not None:
            faiss.omp_set_num_threads(prev_f)


def replace_with_pq(model: nn.Module, specs: dict[str, LayerSpec], device=None) -> None:
    """Swap the named linears for empty PQLinear modules of the given specs (used by loading)."""
    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized module {name!r} does not exist in this model architecture") from None
        if not isinstance(old, (nn.Linear, PQLinear)):
            raise ValueError(f"quantized module {name!r} is a {type(old).__name__}, not a linear layer")
        if (old.in_features, old.out_features) != (spec.in_features, spec.out_features):
            raise ValueError(f"module {name!r}: the model has a {old.out_features}x{old.in_features} linear, "
                             f"the quantization config says {spec.out_features}x{spec.in_features}")
        set_module(model, name, PQLinear(spec, device=device))


@torch.no_grad()
def quantize(model: nn.Module, config: FASQConfig | None = None, *, progress: bool = True,
             device=None, layer_configs: dict[str, FASQConfig] | None = None, num_workers: int | None = None,
             target_bits: float | None = None, target_fraction: float | None = None,
             callback: Callable[[str, LayerSpec, float], None] | None = None) -> nn.Module:
    """Product-quantize every linear layer of ``model`` in place (calibration-free) and return it.

    ``layer_configs`` optionally overrides the config for named layers (per-layer allocation).
    ``target_bits`` (bits/weight of the quantized layers) or ``target_fraction`` (whole model, of FP16)
    choose per-layer settings that land on that size (see :mod:`fasq.fit.allocate`).
    k-means runs on ``device`` (default: each weight's own device; faiss on CPU, torch on CUDA).
    Records ``model.config.quantization_config`` so the model can be saved with :func:`fasq.save`.
    What is quantized, and how, is :func:`fasq.planning.plan_quantization`'s plan (as in streaming).
    """
    config = config or FASQConfig()
    check_finite(model)  # before equalize, which would spread one NaN over whole rows and columns
    plan = plan_quantization(model, config, layer_configs, target_bits, target_fraction)
    ids = draw(model, sequences=config.sample_sequences) if config.equalize == "sampled" or config.error_feedback \
        else None
    if config.equalize != "none":
        equalize(model, config.equalize, powers=sampled_powers(model, ids) if config.equalize == "sampled" else None)
    targets = plan.layers
    modules: dict[str, dict] = {}
    workers = num_workers or (os.cpu_count() or 1)
    bar = tqdm(total=len(targets), desc="quantize", unit="layer", disable=not progress)
    t_all = time.perf_counter()

    by_name = {layer.name: layer for layer in targets}

    def fit(name: str, hessian: torch.Tensor | None = None):
        t0 = time.perf_counter()
        layer = by_name[name]
        lin = layer.linear
        spec, tensors = quantize_weight(lin.weight, layer.config, name, bias=lin.bias, device=device,
                                        table=layer.table, hessian=hessian)
        return name, lin, spec, tensors, time.perf_counter() - t0

    def place(name: str, lin: nn.Linear, spec: LayerSpec, tensors: dict, dt: float) -> None:
        dev = lin.weight.device
        set_module(model, name, PQLinear.from_tensors(spec, **{k: v.to(dev) for k, v in tensors.items()}))
        modules[name] = spec.to_dict()
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)
        log.debug("%s: %s in %.2fs", name, spec, dt)
        if callback:
            callback(name, spec, dt)

    # Error feedback: each step's covariances measured with the layers of the steps before it already quantized
    # (GPTQ's order, fasq.fit.feedback.fitted_in_order); the layers without feedback come after.
    fed = [layer.name for layer in targets if not layer.table] if config.error_feedback else []

    # Layers are independent given their covariances: fit them on a thread pool (faiss and torch release the GIL),
    # each single-threaded, which beats one layer on all cores (k-means on one layer scales poorly and OpenMP
    # spin-waits badly when the machine is busy).  Results are the same for any worker count.
    emb = plan.embedding
    with single_threaded(workers > 1), ThreadPoolExecutor(max_workers=workers) as pool:
        # An untied embedding table is fit like one more layer (a tied one is the head's, fit above).
        emb_job = pool.submit(_fit_table, emb, device) if emb is not None and emb.tied_head is None else None
        for result in fitted_in_order(model, ids, fed, fit, pool) if fed else ():
            place(*result)
        fed_names = set(fed)
        for result in pool.map(fit, [name for name in by_name if name not in fed_names]):
            place(*result)
        emb_tensors = emb_job.result() if emb_job is not None else None
    bar.close()
    embeddings = None
    if emb is not None:
        replace_embedding(model, emb.name, emb.spec, emb.tied_head, emb_tensors)
        embeddings = {emb.name: emb.record()}
    log.info("quantized %d layers in %.1fs", len(targets), time.perf_counter() - t_all)
    round_unquantized_to_16bit(model)  # the in-memory model is exactly what fasq.save stores
    attach_config(model, config, modules, plan.allocation, embeddings)
    warn_if_larger(model_size_report(model))
    return model


def _fit_table(emb: EmbeddingPlan, device) -> dict[str, torch.Tensor]:
    """The buffers of an untied embedding table (a PQ weight [vocab, hidden]), on the table's device."""
    _, tensors = quantize_weight(emb.module.weight, emb.config, emb.name, device=device, table=True)
    return {k: v.to(emb.module.weight.device) for k, v in tensors.items()}


def check_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteWeightError` naming the first floating tensor with NaN/Inf values and their
    count as the model holds them."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not t.is_meta and not bool(t.isfinite().all()):
            raise NonFiniteWeightError(f"tensor {name!r}: {int((~t.isfinite()).sum())} NaN/Inf values in the input "
                                       "model; fasq cannot quantize it")


def warn_if_larger(report: dict) -> None:
    """Log a warning when the quantized layers take more than 16 bits per weight (a larger model than the
    original at 16 bits: e.g. a codebook as large as the layer)."""
    bpw = report.get("bits_per_weight")
    if bpw is not None and bpw > 16.0:
        log.warning("the quantized layers take %.1f bits/weight, more than the 16 of FP16: this model is %.0f%% of "
                    "the original's FP16 size. Use a smaller codebook_size or a larger subvector_dim", bpw,
                    100 * report.get("fraction_of_fp16", float("nan")))


def attach_config(model: nn.Module, config: FASQConfig, modules: dict[str, dict],
                  allocation: dict | None = None, embeddings: dict[str, dict] | None = None) -> None:
    qc = quantization_record(config, modules, allocation, embeddings)
    model.fasq_config = config
    if hasattr(model, "config"):
        model.config.quantization_config = qc


def pq_layers(model: nn.Module) -> list[tuple[str, PQLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PQLinear)]


def model_size_report(model: nn.Module) -> dict:
    """Exact stored size: quantized layers (codes, codebooks, scales, signs, bias) plus every other
    parameter and buffer at 16 bits (their stored dtype if smaller), against the model at FP16.

    Tied parameters are counted once.  ``bits_per_weight`` is over the quantized linears of the body;
    a quantized embedding table (a PQEmbedding, and the head that shares it or is quantized like it)
    is reported apart (``embedding_*``); ``model_bits_per_weight`` is the whole model's (16 x the fraction).
    """
    seen: set[int] = set()
    q_bytes = q_weights = 0
    e_bytes = e_weights = 0
    other_bytes = 0
    fp16_bytes = 0
    layers = []
    tables = _embedding_tables(model)
    for name, m in pq_layers(model) + [(n, e) for n, e in model.named_modules() if isinstance(e, PQEmbedding)]:
        s = m.spec
        n_w = s.in_features * s.out_features
        if isinstance(m, PQEmbedding) and m.tied_head is not None:
            layers.append({"name": name, **s.to_dict(), "bits_per_weight": s.bits_per_weight(), "bytes": 0,
                           "tied_head": True})
            continue   # its table is the head's, counted there
        if name in tables:
            e_bytes += s.weight_storage_bytes()
            e_weights += n_w
        else:
            q_bytes += s.weight_storage_bytes()
            q_weights += n_w
        fp16_bytes += 2 * n_w
        if s.has_bias:
            other_bytes += 2 * s.out_features
            fp16_bytes += 2 * s.out_features
        for b in m.buffers():
            seen.add(b.data_ptr())
        layers.append({"name": name, **s.to_dict(), "bits_per_weight": s.bits_per_weight(),
                       "bytes": s.storage_bytes()})
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.numel() == 0:
            continue
        seen.add(t.data_ptr())
        if not t.is_floating_point():
            continue  # e.g. rotary inv_freq is floating; integer bookkeeping buffers are not weights
        stored = min(t.element_size(), 2)
        other_bytes += t.numel() * stored
        fp16_bytes += t.numel() * 2
    # Non-persistent buffers (rotary tables) are recomputed at load and not stored; keep them out.
    nonpersist = 0
    for mod in model.modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(bname)
            if b is not None and b.is_floating_point():
                nonpersist += b.numel() * 2
    other_bytes -= nonpersist
    fp16_bytes -= nonpersist
    total = q_bytes + e_bytes + other_bytes
    return {
        "quantized_layers": len(layers),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight": 8.0 * q_bytes / q_weights if q_weights else float("nan"),
        "embedding_weights": e_weights,
        "embedding_bytes": e_bytes,
        "embedding_bits_per_weight": 8.0 * e_bytes / e_weights if e_weights else None,
        "other_bytes": other_bytes,
        "total_bytes": total,
        "fp16_bytes": fp16_bytes,
        "fraction_of_fp16": total / fp16_bytes if fp16_bytes else float("nan"),
        "model_bits_per_weight": 16.0 * total / fp16_bytes if fp16_bytes else float("nan"),
        "layers": layers,
    }


def _embedding_tables(model: nn.Module) -> set[str]:
    """Names of the modules holding a quantized embedding table: each PQEmbedding with its own buffers and
    the head that shares it or was quantized with it (only when the model has a PQEmbedding)."""
    embs = [(n, e) for n, e in model.named_modules() if isinstance(e, PQEmbedding)]
    if not embs:
        return set()
    names = {n for n, e in embs if e.tied_head is None}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names |= {n for n, m in model.named_modules() if m is head and isinstance(m, PQLinear)}
    return names
