"""Evaluation: perplexity / bits-per-byte over fixed windows, and the text sources."""
from .perplexity import perplexity
from .texts import load_text

__all__ = ["perplexity", "load_text"]
