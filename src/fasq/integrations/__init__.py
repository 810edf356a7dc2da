"""Thin adapters that let other libraries load fasq models.

transformers (see docs/transformers.md): with fasq installed, ``AutoModelForCausalLM.from_pretrained(dir)``
loads a directory written by :func:`fasq.save`, with or without ``import fasq``.

Registering with transformers means importing ``transformers.quantizers.auto``, which imports every
quantizer transformers ships (torchao among them): many seconds, far more than ``import fasq`` itself.
So neither the installed ``fasq-hook.pth`` nor ``import fasq`` registers right away: both call
:func:`install_transformers_hook` (the top-level module ``_fasq_hook``, which imports only ``sys``), which
registers at once when transformers has already loaded its quantizer table, and otherwise leaves a
finder on ``sys.meta_path`` that registers fasq the moment transformers loads that table (which it
does before any ``from_pretrained`` can run).
"""
from __future__ import annotations

from _fasq_hook import install as install_transformers_hook


def register_transformers() -> None:
    """Register fasq's quantization config and quantizer with transformers now (idempotent).

    Imports transformers' quantizer tables (slow the first time); tests and scripts that want the
    registration without relying on the import hook call this.
    """
    from .transformers import register

    register()


__all__ = ["install_transformers_hook", "register_transformers"]
