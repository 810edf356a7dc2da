"""Thin adapters that let other libraries load fasq models.

transformers (see docs/transformers.md): after ``import fasq``,
``AutoModelForCausalLM.from_pretrained(dir)`` loads a directory written by :func:`fasq.save`.

Registering with transformers means importing ``transformers.quantizers.auto``, which imports every
quantizer transformers ships (torchao among them): many seconds, far more than ``import fasq`` itself.
So ``import fasq`` only calls :func:`install_transformers_hook`, which costs microseconds: it
registers fasq right away when transformers has already loaded its quantizer table, and otherwise
leaves a finder on ``sys.meta_path`` that registers fasq the moment transformers loads that table
(which it does before any ``from_pretrained`` can run).
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

# The module that holds transformers' quant_method -> config / quantizer tables.
_HF_QUANTIZER_TABLES = "transformers.quantizers.auto"


def register_transformers() -> None:
    """Register fasq's quantization config and quantizer with transformers now (idempotent).

    Imports transformers' quantizer tables (slow the first time); tests and scripts that want the
    registration without relying on the import hook call this.
    """
    from .transformers import register

    register()


def install_transformers_hook() -> None:
    """Arrange for :func:`register_transformers` to run when transformers loads its quantizer tables.

    Never imports transformers.  Safe to call more than once.
    """
    if _HF_QUANTIZER_TABLES in sys.modules:
        _register_or_warn()
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        # Kept after it fires: if the tables module is ever imported afresh (a test that clears
        # sys.modules), the new tables get fasq too.
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_or_warn() -> None:
    # Runs inside transformers' own import: an error here must not break `import transformers`.
    try:
        register_transformers()
    except Exception as e:  # noqa: BLE001 - any failure only disables the integration
        log.warning("fasq could not register with transformers (%s: %s); "
                    "AutoModelForCausalLM.from_pretrained will not load fasq models, fasq.load still does",
                    type(e).__name__, e)


class _RegisterOnImport:
    """``sys.meta_path`` finder: finds ``transformers.quantizers.auto`` with the other finders and wraps
    its loader so that fasq registers right after the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HF_QUANTIZER_TABLES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


class _RegisterAfterExec:
    """Loader wrapper: runs the real loader, puts it back on the module, then registers fasq."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader          # the module looks as if we were never there
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name):                  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)
