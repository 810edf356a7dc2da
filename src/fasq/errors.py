"""Exceptions a user can cause with what they hand fasq (kept at the bottom of the import staircase)."""
from __future__ import annotations


class FormatError(ValueError):
    """A saved fasq directory is incomplete, corrupted, or of an unsupported version."""


class StorageRangeError(ValueError):
    """A value is too large for the 16-bit dtype the format stores it in (it would become inf)."""


FP16_MAX = 65504.0


def check_fp16_range(t, what: str) -> None:
    """Raise :class:`StorageRangeError` naming ``what`` when a value of ``t`` overflows fp16 (NaN is not
    checked here: inputs with NaN/Inf are refused before fitting)."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    big = t.detach().abs() > FP16_MAX   # inf counts too (a value already rounded to fp16 on the way)
    if bool(big.any()):
        n, peak = int(big.sum()), float(t.detach().abs()[big].max())
        raise StorageRangeError(f"{what}: {n} value(s) up to {peak:.4g} exceed the fp16 range (+-{FP16_MAX:g}) that "
                                "fasq stores them in; they would become inf. Nothing was written. Rescale the "
                                "model, or keep this tensor unquantized in a bf16 checkpoint")
