"""What the CUDA decode kernels (``cuda_decode``, ``cuda_decode_v2``) share: the NVRTC build and the
input rotation.  Its own module so that neither kernel module imports the other."""
from __future__ import annotations

import functools

import torch

from . import rotate_cached


def compile_kernel(src: str, name: str):
    """``src`` built with NVRTC (``torch.cuda._compile_kernel``, which CUDA builds of PyTorch ship)."""
    compile_fn = getattr(torch.cuda, "_compile_kernel", None)
    if compile_fn is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)")
    return compile_fn(src, name)


@functools.lru_cache(maxsize=None)
def _rotation():
    """The Triton kernels' rotation where Triton imports, else the same maths in two torch ops."""
    try:
        from .triton_kernels import rotate as triton_rotate
    except Exception:
        return rotate_cached
    return triton_rotate


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`fasq.reference.rotate` with the Hadamard matrix cached on x's device (no host-to-device
    copy inside a CUDA graph)."""
    return _rotation()(x, signs, block)
