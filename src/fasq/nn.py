"""PQLinear: a drop-in nn.Linear replacement that holds a product-quantized weight as buffers."""
from __future__ import annotations

import torch
from torch import nn

from .format import LayerSpec
from . import kernels, reference
from .kernels import layer_op


# Attributes under this prefix are per-layer kernel caches (registry choices, prepared tensors, the
# C++ plan): rebuilt on demand, dropped when buffers move and left out of copies and pickles.
_CACHE_PREFIX = "_fasq_"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``model`` (the swap every quantizer and loader does)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
# torch.compile traces a call of this as True (one Python frame eagerly; torch.compiler.is_compiling
# costs a few more, which count when a decode step's interpreter state is out of the caches).
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


class PQLinear(nn.Module):
    """Linear layer with a product-quantized weight.

    Buffers (see docs/format.md): ``codes`` int32 [M, out, words], ``codebooks`` fp16 [M, K, d],
    ``scales`` fp16 [out, G], ``rot_signs`` int8 [in] (empty without rotation), optional ``bias``,
    and with outliers ``outlier_idx`` int32 [n] / ``outlier_val`` fp16 [n] (a sparse correction).
    ``forward`` dispatches through the kernel registry (``fasq.kernels``), whose last resort is the
    plain-PyTorch reference.
    """

    def __init__(self, spec: LayerSpec, device=None):
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for name, shape in spec.buffer_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=spec.buffer_dtypes()[name], device=device))
        if not spec.has_bias:
            self.bias = None
        layer_op.register(self)   # the handle torch.compile's graphs call the layer by (kernels/layer_op.py)

    @classmethod
    def from_tensors(cls, spec: LayerSpec, codes, codebooks, scales, rot_signs, bias=None,
                     outlier_idx=None, outlier_val=None) -> "PQLinear":
        m = cls(spec, device=codes.device)
        tensors = {"codes": codes, "codebooks": codebooks, "scales": scales, "rot_signs": rot_signs}
        if spec.has_bias:
            tensors["bias"] = bias
        if spec.n_outliers:
            if outlier_idx is None or outlier_val is None:
                raise ValueError(f"PQLinear: spec has {spec.n_outliers} outliers but no outlier tensors were given")
            tensors.update(outlier_idx=outlier_idx, outlier_val=outlier_val)
        for name, t in tensors.items():
            buf = getattr(m, name)
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"PQLinear.{name}: shape {tuple(t.shape)} does not match spec {tuple(buf.shape)}")
            buf.copy_(t.to(buf.dtype))
        return m

    # Keep fp16 buffers in fp16 (and int buffers as ints) when the model is cast with .to(dtype):
    # the stored format is fixed; kernels upcast as they compute.
    def _apply(self, fn, recurse=True):
        for cache in [k for k in self.__dict__ if k.startswith(_CACHE_PREFIX)]:  # kernel caches of the old buffers
            del self.__dict__[cache]
        saved = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, dt in saved.items():
            b = self._buffers[n]
            if b is not None and b.dtype != dt:
                self._buffers[n] = b.to(dt)
        return self

    def __getstate__(self):
        # Per-layer kernel caches (``_fasq_*``: the registry's choices, prepared tensors, the C++ plan)
        # are rebuilt on the next call; they hold functions and C++ objects that neither pickle
        # nor deepcopy, so copies and pickles leave them out.
        return {k: v for k, v in super().__getstate__().items()
                if not k.startswith(_CACHE_PREFIX) and k != "fasq_handle"}

    def __setstate__(self, state):
        super().__setstate__(state)
        layer_op.register(self)   # a copy or an unpickled layer is a layer of its own

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.float16

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        w = reference.dequantize(self.spec, self.codes, self.codebooks, self.scales, self.rot_signs, dtype)
        return reference.add_outliers_to_weight(w, self.outliers())

    def outliers(self):
        """(flat indices, values) of the sparse correction, or None (see docs/format.md)."""
        return (self.outlier_idx, self.outlier_val) if self.spec.n_outliers else None

    def __call__(self, *args, **kwargs):
        # The per-layer plan (below) also stands in for nn.Module.__call__ when no hook or
        # module.compile() applies (Plan.call checks, in C++): cold, that Python costs as much as a
        # small layer's kernel.  Under torch.compile this is traced as the plain module call.
        d = self.__dict__
        plan = d.get("_fasq_plan")
        if plan is not None and len(args) == 1 and not kwargs and not _is_dynamo_compiling():
            y = plan.call(d, args[0], kernels._generation)
            if y is not None:
                return y
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():   # training adapters upstream (LoRA): see _GradToInput
            return _GradToInput.apply(x, self)
        # A kernel may leave a per-layer plan that serves calls like the last ones in one C++ call
        # (fasq.kernels.cpu.install_plan); it returns None for anything it cannot serve, and
        # torch.compile traces the registry path (custom ops with fake implementations) instead.
        if torch.compiler.is_compiling():   # one opaque op per layer, which runs eager_forward inside
            return torch.ops.fasq.pq_layer(x, self.fasq_handle)
        return self.eager_forward(x)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inference call outside graph tracing: the per-layer plan when it serves x, else the registry."""
        plan = self.__dict__.get("_fasq_plan")
        if plan is not None:
            y = plan.run(x, self._buffers, kernels._generation)
            if y is not None:
                return y
        return kernels.pq_linear(x, self)

    def storage_bytes(self) -> int:
        return self.spec.storage_bytes()

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, d={s.subvector_dim}, "
                f"K={s.num_centroids}, M={s.num_codebooks}, group={s.group_size}, "
                f"rotation_block={s.rotation_block}, bits/weight={s.bits_per_weight():.3f}")


class _GradToInput(torch.autograd.Function):
    """y = PQLinear(x) with a gradient for x (the weight is frozen: buffers, never trained).

    The forward runs the layer as at inference (the registry's kernel: the CPU and GPU kernels have no
    backward of their own); the backward dequantizes the weight with the reference, per call and per
    layer (W [out, in], outliers included; freed after the call), and returns dy @ W.
    """

    @staticmethod
    def forward(x: torch.Tensor, layer: "PQLinear") -> torch.Tensor:
        return kernels.pq_linear(x, layer)       # grad mode is off in here: the kernels take it

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # dy: [..., out] -> dx: [..., in]
        w = ctx.layer.dequantize(torch.float32 if dy.dtype == torch.float16 and dy.device.type == "cpu"
                                 else dy.dtype)
        return (dy.to(w.dtype) @ w).to(dy.dtype), None
