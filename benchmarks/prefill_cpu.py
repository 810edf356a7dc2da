"""CPU prefill (many tokens) against dense fp32, side by side in one process.

    python benchmarks/prefill_cpu.py [--tokens 512] [--rounds 15] [--threads 1]

1. SmolLM2's layer shapes (1536x576, 576x1536, 576x576) at 4 bits (d=2, K=256, as benchmarks/cpu.py):
   the registry's many-token method (``cpu_tiled``: dequantize tiles of W_r, then GEMM) against
   ``F.linear``, in fp32 and in bf16 (input and dense weight), timed alternately; the median over
   rounds of the time ratio.
2. A whole prompt of ``--tokens`` random tokens through SmolLM2 (one forward, no cache): the fp32
   model against ``--preset 4bit`` (quantized once into ~/.cache/fasq/bench, as benchmarks/cpu.py
   does), alternating; the median of the time ratios.

Prints the figures (a ratio above 1 means fasq takes longer); nothing is written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import CONFIGS, quantized_smollm2, random_layer  # noqa: E402  (benchmarks/cpu.py)


def ratio(f_a, f_b, rounds: int) -> tuple[float, float, float]:
    """Median over rounds of time(f_a) / time(f_b), and the median times (ms), run alternately."""
    for _ in range(2):
        f_a(), f_b()
    r, ta, tb = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f_a()
        t1 = time.perf_counter()
        f_b()
        t2 = time.perf_counter()
        r.append((t1 - t0) / (t2 - t1))
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(r), 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fasq.kernels import cpu

    if not cpu.available():
        print("the CPU kernel did not build", file=sys.stderr)
        return 2
    print(f"{args.tokens} tokens, {args.threads} thread(s), torch {torch.__version__}")
    for out_f, in_f in ((1536, 576), (576, 1536), (576, 576)):
        layer = random_layer(out_f, in_f, CONFIGS["4bit d2 K256"])
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(args.tokens, in_f).to(dt), torch.randn(out_f, in_f).to(dt)
            r, ta, tb = ratio(lambda: cpu.cpu_linear(x, layer, "tiled"), lambda: F.linear(x, w), args.rounds)
            name = str(dt).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")
            print(f"layer {out_f}x{in_f} {name}: tiled {ta:.2f} ms, dense {name} {tb:.2f} ms, ratio {r:.2f}")

    import fasq
    from fasq.cli import load_any
    from fasq.data import smollm2_checkpoint

    q = fasq.load(quantized_smollm2("4bit"), dense_16bit=True)
    base, _ = load_any(str(smollm2_checkpoint()))
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def fwd(m):
        with torch.inference_mode():
            m(input_ids=ids, use_cache=False)
    r, ta, tb = ratio(lambda: fwd(q), lambda: fwd(base), max(3, args.rounds // 3))
    print(f"SmolLM2 prefill: fasq 4-bit {ta:.0f} ms, fp32 {tb:.0f} ms, ratio {r:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
