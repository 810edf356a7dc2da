"""Two CPU methods side by side on the same layers: the registry's token cut-offs (kernel work).

    python benchmarks/cpu_methods.py perm tiled --tokens 5,8,16 --caches hot,stream,cold
    python benchmarks/cpu_methods.py lut perm --tokens 2,3 --caches hot,stream

For each SmolLM2 layer shape and 4096x4096 (4-bit d2 K256, as benchmarks/cpu.py), each token count and
cache state, times ``cpu.cpu_linear(x, layer, A)`` and ``(..., B)`` (the op alone, fp32 x, 1 thread
unless --threads) in interleaved rounds and prints the time ratio A / B of the medians (below 1: A is
faster).  "hot" repeats one layer, "stream" cycles through copies of it (>= 48 MB of fp32 weights, as
a decode step), "cold" evicts the caches before each call.  Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import CONFIGS, STREAM_MB, _Evictor, _stream, random_layer, time_interleaved  # noqa: E402

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096))


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tokens", default="5,8,16")
    ap.add_argument("--caches", default="hot,stream")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fasq.kernels import cpu

    tokens = [int(t) for t in args.tokens.split(",")]
    caches = args.caches.split(",")
    evict = _Evictor(512) if "cold" in caches else None
    print(f"time {args.a} / {args.b}, op alone, fp32 x, {args.threads} thread(s), torch {torch.__version__}")
    print("| out x in | cache | " + " | ".join(f"{t} tokens" for t in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    for out, inp in SHAPES:
        n_copies = min(32, -(-(STREAM_MB << 20) // (out * inp * 4)))
        layers = [random_layer(out, inp, CONFIGS["4bit d2 K256"], seed=s) for s in range(n_copies)]
        for cache in caches:
            n = n_copies if cache == "stream" else 1
            if cache == "stream" and n == 1:
                continue  # one layer is already far larger than L2
            cells = []
            for t in tokens:
                x = torch.randn(t, inp)
                fns = {m: _stream([lambda q=q, m=m: cpu.cpu_linear(x, q, m) for q in layers[:n]])
                       for m in (args.a, args.b)}
                cold = cache == "cold"
                r = time_interleaved(fns, max(5, args.rounds // 2) if cold else args.rounds,
                                     evict=evict if cold else None)
                cells.append(f"{r[args.a]['median_s'] / r[args.b]['median_s']:.2f}")
            print(f"| {out}x{inp} | {cache} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
