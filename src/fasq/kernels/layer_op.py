"""``torch.ops.fasq.pq_layer``: a whole PQLinear call as one opaque op, for ``torch.compile``.

The registry path (:func:`fasq.kernels.pq_linear`) prepares per-layer tables on first use and checks
buffer version counters: data-dependent Python that dynamo cannot trace (a cold
``torch.compile(model, fullgraph=True)`` failed on ``tensor.is_inference()`` and on ``Eq(u0, 0)``).
While compiling, ``PQLinear.forward`` calls this op instead.  Its implementation is the eager call on the
layer (``PQLinear.eager_forward``: the per-layer C++ plan, else the registry), found by a handle every PQLinear gets at construction (and on unpickling or
copying); its fake implementation gives the output's shape.  So the compiled graph holds one call per
layer, runs exactly the kernels and caches eager runs, and needs no eager call first.  CUDA graphs
capture it as they capture the kernels' own ops.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def register(layer: torch.nn.Module) -> int:
    """Give ``layer`` a handle the op can find it by (stored as ``layer.fasq_handle``)."""
    handle = next(_handles)
    _LAYERS[handle] = layer
    layer.__dict__["fasq_handle"] = handle
    return handle


@torch.library.custom_op("fasq::pq_layer", mutates_args=())
def pq_layer(x: torch.Tensor, handle: int) -> torch.Tensor:
    """y = layer(x) through the kernel registry, for the PQLinear registered under ``handle``."""
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"fasq::pq_layer: no live PQLinear has handle {handle} (the compiled graph outlived "
                           "its model?)")
    y = layer.eager_forward(x)      # the per-layer C++ plan when it serves x, as an eager call
    return y.clone() if y.data_ptr() == x.data_ptr() else y   # a custom op's output may not alias its input


@pq_layer.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    layer = _LAYERS[handle]
    return x.new_empty((*x.shape[:-1], layer.out_features))
