"""fasq: calibration-free product quantization of LLM weights, with fast kernels."""
from .config import FASQConfig, PRESETS, preset
from .format import FORMAT_VERSION, LayerSpec
from .nn import PQLinear
from .version import __version__
from .integrations import install_transformers_hook as _install_transformers_hook

_install_transformers_hook()  # quant_method "fasq" for transformers' from_pretrained, registered lazily (docs/transformers.md)


def __getattr__(name):  # heavy parts (transformers) load on first use, not at `import fasq`
    if name in ("quantize", "model_size_report"):
        from . import model
        return getattr(model, name)
    if name in ("save", "load"):
        from . import io
        return getattr(io, name)
    raise AttributeError(f"module 'fasq' has no attribute {name!r}")


__all__ = ["FASQConfig", "PRESETS", "preset", "FORMAT_VERSION", "LayerSpec", "PQLinear", "quantize",
           "model_size_report", "save", "load"]
