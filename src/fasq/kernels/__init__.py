"""Kernel registry: a table of (name, devices, supports(), priority) choosing how PQLinear computes.

Kernels register themselves lazily: nothing here imports Triton or compiles C++ at ``import fasq``.
A kernel module listed in ``_PROVIDERS`` is imported the first time a layer runs on one of its
devices; importing it calls :func:`register`.  The plain-PyTorch reference is the last resort; a
CUDA input that falls back to it logs one warning.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    name: str
    devices: tuple[str, ...]               # e.g. ("cuda",), ("cpu",)
    supports: Callable[..., bool]          # supports(layer, x) -> bool
    fn: Callable[..., torch.Tensor]        # fn(x, layer) -> y
    priority: int = 0                      # higher wins
    # install(layer, x): called whenever the registry runs this kernel for (layer, x); may set up a
    # faster path for the next such calls (the CPU kernels' per-layer Plan, tried by PQLinear.forward).
    install: Callable[..., None] | None = None
    # adds_outliers(layer, x): True when fn's output already includes the layer's sparse outlier
    # correction (the registry then adds nothing).
    adds_outliers: Callable[..., bool] | None = None


_KERNELS: dict[str, Kernel] = {}
# device type -> modules that register kernels for it (imported on first use).
_PROVIDERS: dict[str, list[str]] = {"cuda": ["fasq.kernels.triton_kernels", "fasq.kernels.cuda_decode"],
                                    "cpu": ["fasq.kernels.cpu"]}
_loaded: set[str] = set()
# device type -> fn(y, x, layer) adding a layer's sparse outlier correction to a kernel's output
# (registered by a provider; the reference's index_add serves other devices).
_OUTLIER_ADDERS: dict[str, Callable[..., torch.Tensor]] = {}
_warned: set[str] = set()


_generation = 0  # bumped by register(): invalidates the per-layer choices cached by pq_linear


def register(kernel: Kernel) -> None:
    global _generation
    _KERNELS[kernel.name] = kernel
    _generation += 1


def register_outlier_adder(device_type: str, fn: Callable[..., torch.Tensor]) -> None:
    _OUTLIER_ADDERS[device_type] = fn


def kernels() -> list[Kernel]:
    return sorted(_KERNELS.values(), key=lambda k: -k.priority)


def _load_providers(device_type: str) -> None:
    if device_type in _loaded:
        return
    _loaded.add(device_type)
    for mod in _PROVIDERS.get(device_type, []):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # provider not written/installed: the reference serves
            log.warning("fasq: kernels in %s unavailable (%s); using the reference", mod, e)
        except Exception as e:  # a broken optional kernel must not break inference
            log.warning("fasq: kernels in %s unavailable (%s); using the reference", mod, e)


def _disabled() -> set[str]:
    return {s for s in os.environ.get("FASQ_DISABLE_KERNELS", "").split(",") if s}


def select(layer, x: torch.Tensor) -> Kernel | None:
    """The highest-priority registered kernel that supports this layer and input, or None."""
    dev = x.device.type
    _load_providers(dev)
    off = _disabled()
    if "all" in off:
        return None
    for k in kernels():
        if dev in k.devices and k.name not in off and k.supports(layer, x):
            return k
    return None


def reference_linear(x: torch.Tensor, layer) -> torch.Tensor:
    return reference.pq_linear(x, layer.spec, layer.codes, layer.codebooks, layer.scales, layer.rot_signs,
                               layer.bias)


def _choice_key(layer, x: torch.Tensor) -> tuple:
    """Everything a kernel's supports() may look at (device, dtype, width, token count, grad, the
    layer's device) plus the registry's state and $FASQ_DISABLE_KERNELS."""
    n = x.shape[-1] if x.dim() else 0
    return (_generation, x.device, x.dtype, n, x.numel() // n if n else 0,
            x.requires_grad and torch.is_grad_enabled(), os.environ.get("FASQ_DISABLE_KERNELS", ""),
            layer._buffers["codes"].device)


def pq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    # select() costs ~5 us of Python per call, as much as a small layer's kernel on the CPU: the
    # choice is cached on the layer for the facts it depends on (_choice_key).
    # A few entries per layer, so that alternating inputs (fp32 / bf16, prefill / decode) do not
    # evict each other.
    key = _choice_key(layer, x)
    choices = layer.__dict__.get("_fasq_choices")
    if choices is None:
        choices = layer.__dict__["_fasq_choices"] = {}
    entry = choices.get(key)
    if entry is None:
        if len(choices) >= 8:
            choices.clear()
        kernel = select(layer, x)                       # (loads the device's providers first)
        off = _disabled()
        adder = _OUTLIER_ADDERS.get(x.device.type) if not off & {"all", "outliers"} else None
        entry = choices[key] = (kernel, adder)
    k, adder = entry
    if k is not None:
        y = k.fn(x, layer)
        if k.install is not None and not torch.compiler.is_compiling():
            k.install(layer, x)
    else:
        if x.device.type == "cuda" and "cuda" not in _warned:
            _warned.add("cuda")
            log.warning("fasq: no GPU kernel supports this layer/input (%s, %s tokens); falling back to the "
                        "slow plain-PyTorch reference", layer.spec, x.reshape(-1, x.shape[-1]).shape[0])
        y = reference_linear(x, layer)
    if layer.spec.n_outliers and not (k is not None and k.adds_outliers is not None and k.adds_outliers(layer, x)):
        # kernels compute the product-quantized part; the sparse correction is added here
        if adder is not None:   # one launch (the CUDA provider's), where the device has one
            y = adder(y, x, layer)
        else:
            y = reference.add_outliers_to_output(y, x, *_outlier_operands(layer))
    return y


_HADAMARD: dict[tuple, torch.Tensor] = {}


def hadamard_cached(block: int, device, dtype) -> torch.Tensor:
    """reference.hadamard_matrix, made once per (block, device, dtype): a CUDA graph cannot capture
    the host-to-device copy that making it takes."""
    key = (block, device, dtype)
    h = _HADAMARD.get(key)
    if h is None:
        h = _HADAMARD[key] = reference.hadamard_matrix(block, device, dtype)
    return h


def rotate_cached(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`fasq.reference.rotate` (sign flip, then the block Hadamard matmul) with the Hadamard
    matrix from :func:`hadamard_cached`."""
    n = x.shape[-1]
    return ((x * signs).reshape(*x.shape[:-1], n // block, block) @ hadamard_cached(block, x.device, x.dtype)
            ).reshape(x.shape)


def outlier_csr(idx: torch.Tensor, val: torch.Tensor, in_features: int, out_features: int) -> tuple:
    """The outliers sorted by row: (rowptr int32 [out + 1], cols int32 [n], vals [n]), the layout the
    GPU kernels read (row r's entries are ``rowptr[r]:rowptr[r + 1]``)."""
    rows, cols = reference.outlier_rows_cols(idx, in_features)
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=out_features)
    rowptr = torch.zeros(out_features + 1, dtype=torch.int32, device=idx.device)
    rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return rowptr, cols[order].to(torch.int32).contiguous(), val[order].contiguous()


def outlier_cache(layer, name: str, build: Callable[..., tuple]) -> tuple:
    """``build(idx, val)`` for the layer's outlier buffers, cached on the layer under ``name`` and
    rebuilt when a buffer is replaced or changed in place (identity, device and version counters;
    inference tensors have no version counter, and cannot change in place outside inference mode)."""
    idx, val = layer.outlier_idx, layer.outlier_val
    cached = layer.__dict__.get(name)
    if cached is not None and torch.compiler.is_compiling():
        return cached[1:]   # torch.compile cannot read version counters: it takes the eager call's tables
    key = (idx.data_ptr(), val.data_ptr(), idx.device, None if idx.is_inference() else idx._version,
           None if val.is_inference() else val._version)
    if cached is None or cached[0] != key:
        cached = layer.__dict__[name] = (key, *build(idx, val))
    return cached[1:]


def outlier_csr_cached(layer) -> tuple:
    """:func:`outlier_csr` of a layer, cached on it."""
    return outlier_cache(layer, "_fasq_outlier_csr",
                         lambda idx, val: outlier_csr(idx, val, layer.in_features, layer.out_features))


def _outlier_operands(layer) -> tuple:
    """(rows, cols, values) of the layer's sparse correction, cached on the layer (splitting the flat
    indices every call costs more Python than the correction itself on small layers)."""
    return outlier_cache(layer, "_fasq_outliers",
                         lambda idx, val: (*reference.outlier_rows_cols(idx, layer.in_features), val))
