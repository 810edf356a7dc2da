"""How unquantized tensors are stored: fp32 as fp16 (16-bit tensors as they are), checked against fp16's
range.  ``fasq.save`` stores by this rule and ``fasq.quantize`` rounds the in-memory model by it, so the
model in memory computes exactly what a save/load round trip gives."""
from __future__ import annotations

import torch

from .errors import check_fp16_range
from .nn import PQLinear


def to_stored(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` in its stored dtype: fp32 -> fp16 (a value beyond fp16's range raises
    :class:`fasq.errors.StorageRangeError` naming ``name``); other dtypes unchanged."""
    if t.dtype == torch.float32:
        check_fp16_range(t, f"tensor {name}")
        return t.half()
    return t


def round_unquantized_to_16bit(model: torch.nn.Module) -> None:
    """Round the fp32 tensors outside quantized layers to what :func:`to_stored` keeps, in place."""
    pq_ptrs = {b.data_ptr() for m in model.modules() if isinstance(m, PQLinear) for b in m.buffers()}
    with torch.no_grad():
        # state_dict: only what is stored (non-persistent buffers such as rotary tables are rebuilt at load)
        for name, t in model.state_dict(keep_vars=True).items():
            if t.dtype == torch.float32 and t.data_ptr() not in pq_ptrs:
                t.data.copy_(to_stored(name, t.data).float())
