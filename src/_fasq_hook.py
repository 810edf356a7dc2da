"""Registers fasq with transformers (and PEFT) when they load the tables fasq joins; imports only ``sys``.

Installing fasq puts ``fasq-hook.pth`` in site-packages (``setup.py``), whose one line runs
:func:`install` at every interpreter start: so ``AutoModelForCausalLM.from_pretrained(fasq_dir)`` loads
a fasq model without ``import fasq`` (without the registration, transformers warns "Unknown
quantization type", skips the quantization and loads random weights into plain ``nn.Linear`` layers).
``import fasq`` calls :func:`install` too (``fasq.integrations.install_transformers_hook``), for
interpreters that skip .pth files (``python -S``, a source tree on ``PYTHONPATH``).

This is a top-level module, not part of the ``fasq`` package, because importing ``fasq`` imports torch
(seconds): every Python process of the environment runs the .pth line, and :func:`install` must cost
well under a millisecond.  Registering imports ``transformers.quantizers.auto``, which imports every
quantizer transformers ships (many seconds), so it waits until transformers imports that module itself
(which ``transformers.modeling_utils`` does before any ``from_pretrained`` can run).  PEFT's LoRA dispatch
(``fasq.integrations.peft``) is hooked the same way, when PEFT imports ``peft.tuners.lora.model``.
"""
import sys

# module another library imports -> fasq's adapter for it, whose register() adds fasq to that module's
# tables: transformers' quant_method -> config / quantizer tables, PEFT's LoRA layer dispatch.
HOOKS = {"transformers.quantizers.auto": "fasq.integrations.transformers",
         "peft.tuners.lora.model": "fasq.integrations.peft"}


def install() -> None:
    """Register fasq now with each hooked module that is loaded; in any case leave a finder on
    ``sys.meta_path`` that registers fasq whenever one is (re)imported.  Idempotent; never raises."""
    for target, adapter in HOOKS.items():
        if target in sys.modules:
            register_or_warn(adapter)
    if not any(type(f).__name__ == RegisterOnImport.__name__ and type(f).__module__ == __name__
               for f in sys.meta_path):
        # Kept after it fires: if a hooked module is ever imported afresh (a test that clears
        # sys.modules), the new tables get fasq too.
        sys.meta_path.insert(0, RegisterOnImport())


def register_or_warn(adapter: str) -> None:
    # Runs inside the other library's own import: an error here must not break that import.
    module = sys.modules.get(adapter)
    if module is not None and not hasattr(module, "register"):
        return  # the adapter's own imports loaded the hooked module (transformers 5.0 loads its tables
        #         from quantizers.base): the adapter registers when it has finished (its last lines)
    try:
        __import__(adapter)
        sys.modules[adapter].register()
    except Exception as e:  # noqa: BLE001 - any failure only disables the integration
        import logging
        logging.getLogger("fasq.integrations").warning(
            "fasq could not register with %s (%s: %s); fasq models will not load or train through it "
            "(fasq.load still loads them)", adapter.rsplit(".", 1)[-1], type(e).__name__, e)


class RegisterOnImport:
    """``sys.meta_path`` finder: finds a module of :data:`HOOKS` with the other finders and wraps its
    loader so that fasq registers right after the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        adapter = HOOKS.get(fullname)
        if adapter is None:
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
            spec.loader = RegisterAfterExec(spec.loader, adapter)
        return spec

    def invalidate_caches(self) -> None:
        pass


class RegisterAfterExec:
    """Loader wrapper: runs the real loader, puts it back on the module, then registers fasq."""

    def __init__(self, loader, adapter: str):
        self._loader = loader
        self._adapter = adapter

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader          # the module looks as if we were never there
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        register_or_warn(self._adapter)

    def __getattr__(self, name):                  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)
