"""The evaluation prefix of a text (the same windows for every model) and the calibration slices
for GPTQ / AWQ, checked to be disjoint from what is evaluated."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..eval import load_text
from ..eval.perplexity import tokenize

# Named calibration slices: (text source, marker where the slice starts, what to call it in the output).
CALIBRATION_SOURCES: dict[str, tuple[str, str, str]] = {
    "persuasion": ("austen", "Sir Walter Elliot, of Kellynch",
                   "Austen, Persuasion (the last novel of the Austen text), from its first sentence"),
    "lee-tail": ("lee", "", "the second half of the Lee corpus"),
}


def eval_prefix(tokenizer, source: str, max_tokens: int | None) -> str:
    """The shortest paragraph-aligned prefix of ``source`` whose tokens start with the text's first
    ``max_tokens`` tokens.

    Tokenizing a 4M-character text for every model is slow; a prefix cut at a paragraph break
    tokenizes to exactly the same first tokens (checked here), so every model sees the same windows.
    """
    text = load_text(source)
    if max_tokens is None:
        return text
    n = 8 * max_tokens
    while True:
        cut = text.find("\n\n", n)
        prefix = text if cut < 0 else text[:cut]
        ids = tokenize(tokenizer, prefix)
        if ids.numel() >= max_tokens + 64 or cut < 0:
            break
        n *= 2
    if cut >= 0:  # the cut must not change the first max_tokens tokens
        nxt = text.find("\n\n", cut + 2)
        longer = text[:nxt] if nxt >= 0 else text
        if not torch.equal(tokenize(tokenizer, longer)[:max_tokens], ids[:max_tokens]):
            raise RuntimeError(f"{source}: the tokens of a prefix differ from those of the whole text")
    return prefix


def token_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """``n_samples`` windows of ``seq_len`` consecutive tokens from a named slice."""

    name: str = "persuasion"
    n_samples: int = 64
    seq_len: int = 512

    def describe(self) -> str:
        src = CALIBRATION_SOURCES[self.name][2]
        return f"{src}: {self.n_samples} x {self.seq_len} consecutive tokens"

    def to_dict(self) -> dict:
        return {"name": self.name, "n_samples": self.n_samples, "seq_len": self.seq_len,
                "description": self.describe()}

    def char_range(self) -> tuple[str, int]:
        """(text source, first character of the slice)."""
        if self.name not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration={self.name!r} is unknown: allowed are {sorted(CALIBRATION_SOURCES)}")
        source, marker, _ = CALIBRATION_SOURCES[self.name]
        text = load_text(source)
        start = text.find(marker) if marker else len(text) // 2
        if start < 0:
            raise RuntimeError(f"calibration {self.name!r}: marker {marker!r} not found in {source!r}")
        return source, start

    def samples(self, tokenizer) -> list[list[int]]:
        source, start = self.char_range()
        ids = tokenize(tokenizer, load_text(source)[start:])
        need = self.n_samples * self.seq_len
        if ids.numel() < need:
            raise ValueError(f"calibration {self.name!r} has {ids.numel()} tokens, fewer than "
                             f"{self.n_samples} x {self.seq_len}")
        return ids[:need].view(self.n_samples, self.seq_len).tolist()

    def check_disjoint(self, eval_source: str, eval_prefix_chars: int) -> None:
        """Raise when the calibration slice overlaps the evaluated prefix of the same text."""
        source, start = self.char_range()
        if source == eval_source and start < eval_prefix_chars:
            raise ValueError(f"calibration {self.name!r} starts at character {start} of {source!r}, inside the "
                             f"evaluated prefix ({eval_prefix_chars} characters): choose another --calibration")
