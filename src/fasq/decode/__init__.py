"""fasq's own decode path (``--engine lean``): a static-KV-cache forward of Llama and Gemma 3 decoders
for one sequence on the CPU, calling every linear layer (PQLinear, the head, the embedding) as a module.
See docs/decode.md."""
from .arch import ARCHS, unsupported_reason
from .engine import ENGINES, LeanDecoder, lean_decoder

__all__ = ["ARCHS", "ENGINES", "LeanDecoder", "lean_decoder", "unsupported_reason"]
