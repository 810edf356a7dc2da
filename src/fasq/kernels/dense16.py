"""Unquantized matrices kept in their stored 16-bit form, computed against fp32 activations.

fasq stores every unquantized tensor in fp16 (``fasq.io``); loading a model in fp32 would widen the
largest of them, the token embedding (tied to the output head in most small models), to twice its
stored size.  :class:`Embedding16` and :class:`Linear16` keep the stored 16-bit matrix instead and
return outputs in the model's dtype:

* ``Embedding16`` looks rows up in the 16-bit matrix and widens them (exact: fp16 -> fp32 is lossless).
* ``Linear16`` computes ``y = x W^T + b`` with fp32 sums over exactly the stored values: on the CPU,
  for few tokens, by ``torch.ops.fasq.cpu_dense16_linear`` (reads half the bytes of an fp32
  ``F.linear``); otherwise by ``F.linear`` on row chunks widened to x's dtype (no full fp32 copy).
  The result equals ``F.linear(x, W.float())`` up to the order of the fp32 sums.

The matrices are buffers, not parameters: they are frozen inference weights, and a 16-bit parameter
would make ``PreTrainedModel.dtype`` (its first floating parameter) report fp16 for an fp32 model.
:func:`fasq.load` builds them with ``dense_16bit=True``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FEW_MAX_TOKENS = 8        # up to here the C++ op; above, chunked F.linear (compute- not memory-bound)
CHUNK_ROWS = 4096         # rows widened at a time by the F.linear path
DTYPES = (torch.float16, torch.bfloat16)


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dtype not in DTYPES:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if x.numel() // max(1, x.shape[-1]) > FEW_MAX_TOKENS:
        return False
    from . import cpu
    return cpu.available()


def dense16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   method: str | None = None, isa: str | None = None) -> torch.Tensor:
    """y = x W^T + b for a 16-bit ``weight`` [out, in]; y has x's dtype.

    ``method``: None (choose), "kernel" (the C++ op: fp32 sums, any token count but meant for
    few) or "chunked" (F.linear in x's dtype on row chunks widened to it).  ``isa`` caps the
    kernel's instruction set (tests).
    """
    if method is None:
        method = "kernel" if _kernel_ok(x, weight) else "chunked"
    if method == "kernel":
        from . import cpu
        return torch.ops.fasq.cpu_dense16_linear(x, weight.contiguous(), bias, cpu.ISAS[isa or cpu.default_isa()],
                                                 cpu.POISON)
    if method != "chunked":
        raise ValueError(f"method={method!r}: allowed are None, 'kernel', 'chunked'")
    if weight.shape[0] <= CHUNK_ROWS:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    parts = [F.linear(x, weight[r0:r0 + CHUNK_ROWS].to(x.dtype)) for r0 in range(0, weight.shape[0], CHUNK_ROWS)]
    y = torch.cat(parts, -1)
    return y if bias is None else y + bias.to(x.dtype)


class Embedding16(nn.Module):
    """nn.Embedding over a 16-bit ``weight`` buffer [num_embeddings, embedding_dim]; outputs ``out_dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 weight_dtype: torch.dtype = torch.float16, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if weight_dtype not in DTYPES:
            raise ValueError(f"Embedding16: weight_dtype={weight_dtype}; allowed are {DTYPES}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = out_dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=weight_dtype, device=device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx).to(self.out_dtype)

    def _apply(self, fn, recurse=True):  # .to(dtype) moves the module but keeps the 16-bit storage
        return _keep_dtype(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight.dtype}, out={self.out_dtype}"


class Linear16(nn.Module):
    """nn.Linear over a 16-bit ``weight`` buffer [out_features, in_features] (see :func:`dense16_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 weight_dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if weight_dtype not in DTYPES:
            raise ValueError(f"Linear16: weight_dtype={weight_dtype}; allowed are {DTYPES}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=weight_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=weight_dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense16_linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        return _keep_dtype(self, fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight.dtype}")


def _keep_dtype(module: nn.Module, fn, recurse: bool) -> nn.Module:
    """``Module._apply`` for these modules: follow ``fn``'s device (``.to(device)``, ``.cuda()``) but never
    its dtype, so a model-wide ``.float()`` neither widens the 16-bit matrix nor makes a temporary
    copy; moved in place (``.data``) so that a tied embedding and head stay one tensor."""
    for name, b in module._buffers.items():
        if b is None:
            continue
        if b.is_meta:  # e.g. to_empty(): fn makes the real tensor
            new = fn(b)
            module._buffers[name] = new if new.dtype == b.dtype else new.to(b.dtype)
            continue
        target = fn(torch.empty(0, dtype=b.dtype, device=b.device)).device  # where fn sends this dtype
        if target != b.device:
            b.data = b.to(target)
    return module
