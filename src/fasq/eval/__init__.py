"""Evaluation: perplexity / bits-per-byte over fixed windows, and the text sources."""
from .perplexity import perplexity, perplexity_of
from .texts import load_text

__all__ = ["perplexity", "perplexity_of", "load_text"]
