"""Registers fasq with transformers when transformers loads its quantizer tables; imports only ``sys``.

Installing fasq puts ``fasq-hook.pth`` in site-packages (``setup.py``), whose one line runs
:func:`install` at every interpreter start: so ``AutoModelForCausalLM.from_pretrained(fasq_dir)`` loads
a fasq model without ``import fasq`` (without the registration, transformers warns "Unknown
quantization type", skips the quantization and loads random weights into plain ``nn.Linear`` layers).
``import fasq`` calls :func:`install` too (``fasq.integrations.install_transformers_hook``), for
interpreters that skip .pth files (``python -S``, a source tree on ``PYTHONPATH``).

This is a top-level module, not part of the ``fasq`` package, because importing ``fasq`` imports torch
(seconds): every Python process of the environment runs the .pth line, and :func:`install` must cost
microseconds.  Registering imports ``transformers.quantizers.auto``, which imports every quantizer
transformers ships (many seconds), so it waits until transformers imports that module itself (which
``transformers.modeling_utils`` does before any ``from_pretrained`` can run).
"""
import sys

# The module that holds transformers' quant_method -> config / quantizer tables.
HF_QUANTIZER_TABLES = "transformers.quantizers.auto"
# fasq's adapter (imports transformers; registers fasq's config and quantizer in those tables).
ADAPTER = "fasq.integrations.transformers"


def install() -> None:
    """Register fasq now if transformers' quantizer tables are loaded; in any case leave a finder on
    ``sys.meta_path`` that registers fasq whenever they are (re)imported.  Idempotent; never raises."""
    if HF_QUANTIZER_TABLES in sys.modules:
        register_or_warn()
    if not any(type(f).__name__ == RegisterOnImport.__name__ and type(f).__module__ == __name__
               for f in sys.meta_path):
        # Kept after it fires: if the tables module is ever imported afresh (a test that clears
        # sys.modules), the new tables get fasq too.
        sys.meta_path.insert(0, RegisterOnImport())


def register_or_warn() -> None:
    # Runs inside transformers' own import: an error here must not break `import transformers`.
    adapter = sys.modules.get(ADAPTER)
    if adapter is not None and not hasattr(adapter, "register"):
        return  # the adapter's own import loaded the tables (some versions import them from quantizers.base):
        #         it registers when it has finished (the end of fasq/integrations/transformers.py)
    try:
        from fasq.integrations.transformers import register
        register()
    except Exception as e:  # noqa: BLE001 - any failure only disables the integration
        import logging
        logging.getLogger("fasq.integrations").warning(
            "fasq could not register with transformers (%s: %s); AutoModelForCausalLM.from_pretrained "
            "will not load fasq models, fasq.load still does", type(e).__name__, e)


class RegisterOnImport:
    """``sys.meta_path`` finder: finds ``transformers.quantizers.auto`` with the other finders and wraps
    its loader so that fasq registers right after the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != HF_QUANTIZER_TABLES:
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
            spec.loader = RegisterAfterExec(spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


class RegisterAfterExec:
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
        register_or_warn()

    def __getattr__(self, name):                  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)
