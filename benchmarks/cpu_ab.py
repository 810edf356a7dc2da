"""A/B timing of two versions of the CPU kernel source in one process (kernel work, not a benchmark).

    python benchmarks/cpu_ab.py OTHER [SHAPE ...]
    # OTHER: a kernels folder, e.g.  mkdir /tmp/b && git archive REV src/fasq/kernels | tar -x -C /tmp/b
    #        then /tmp/b/src/fasq/kernels (its pq_cpu.cpp and pq_cpu/*.h); or one .cpp (before the
    #        split into headers: git show f0d3204:src/fasq/kernels/pq_cpu.cpp > /tmp/b.cpp)

A = the working tree's ``src/fasq/kernels/pq_cpu.cpp`` and headers (loaded the usual way), B = OTHER,
built as a second extension (its op registrations dropped and its namespace renamed, so that both load).
Each case times ``Plan.run`` of the same layer with A's and with B's plan, alternating A and B
within every round, plus dense ``F.linear``; it prints min / median per call and the median over
rounds of the A/B time ratio, which is far steadier than comparing two runs on a shared host.
SHAPE names like ``192x576K256`` pick cases, any shape (out x in, K; d = 2, group 128, as benchmarks/cpu.py).
Both outputs are checked against each other first.  ROUNDS (env) sets the rounds (default 30);
TOKENS (default 1) sets the tokens per call;
STREAM=1 times calls that cycle through copies of each layer (codes and weights from beyond L2, as in
a decode step and benchmarks/cpu.py's "stream") instead of repeating one layer (hot).
"""
from __future__ import annotations

import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import random_layer  # noqa: E402  (benchmarks/cpu.py)

from fasq import kernels  # noqa: E402
from fasq.kernels import cpu  # noqa: E402

CASES = [(192, 576, 256), (192, 576, 512), (576, 576, 256), (576, 576, 512), (1536, 576, 256), (576, 1536, 256)]


def build_b(path: str):
    from torch.utils import cpp_extension

    top = Path(path) / "pq_cpu.cpp" if Path(path).is_dir() else Path(path)
    src = top.read_text()
    a, b = src.index("TORCH_LIBRARY_FRAGMENT(fasq,"), src.index("PYBIND11_MODULE(")
    src = (src[:a] + src[b:]).replace("fasq_cpu", "fasq_cpu_b")  # the Plan class only, own namespace
    headers = {h.name: h.read_text().replace("fasq_cpu", "fasq_cpu_b")
               for h in sorted((top.parent / "pq_cpu").glob("*.h"))} if Path(path).is_dir() else {}
    key = hashlib.sha1("\0".join([src, *headers, *headers.values()]).encode()).hexdigest()[:10]
    d = Path(tempfile.gettempdir()) / f"fasq_ab_{key}"
    (d / "pq_cpu").mkdir(parents=True, exist_ok=True)
    (d / "b.cpp").write_text(src)
    for name, text in headers.items():
        (d / "pq_cpu" / name).write_text(text)
    return cpp_extension.load(name=f"fasq_ab_{key}", sources=[str(d / "b.cpp")], build_directory=str(d),
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              is_python_module=True, verbose=False)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    warm = random_layer(64, 64, dict(subvector_dim=2, num_centroids=256))
    warm(torch.randn(1, 64))  # loads A (the working tree's library) first
    lib_a = cpu._lib
    if lib_a is None:
        raise SystemExit("the fasq CPU kernel did not build")
    lib_b = build_b(argv[0])
    cases = CASES
    if argv[1:]:  # named cases: OUTxINK (any shape, not only CASES)
        try:
            cases = [tuple(int(v) for v in a.replace("K", "x").split("x")) for a in argv[1:]]
        except ValueError:
            raise SystemExit(f"cases are named like 192x576K256, got {argv[1:]}")
    stream = os.environ.get("STREAM", "0") not in ("", "0")
    tokens = int(os.environ.get("TOKENS", 1))
    fns = {}
    for out, inp, k in cases:
        # STREAM=1: each call cycles through copies of the layer (48 MB of fp32 weights, as
        # benchmarks/cpu.py's "stream"), so that codes and weights come from beyond L2 as in a decode step
        n = min(32, -(-(48 << 20) // (out * inp * 4))) if stream else 1
        runs = ([], [], [])
        for i in range(n):
            layer = random_layer(out, inp, dict(subvector_dim=2, num_centroids=k), seed=i)
            x, w = torch.randn(tokens, inp), torch.randn(out, inp)
            ya = layer(x)
            layer(x)
            mode = cpu._MODE[kernels.select(layer, x).name.replace("cpu_", "")]
            pa = layer.__dict__["_fasq_plan"]
            cpu._lib = lib_b
            try:
                pb = cpu._make_plan(layer, kernels._generation)
            finally:
                cpu._lib = lib_a
            pb.set_method(0, tokens, mode)
            g, b = kernels._generation, layer._buffers
            yb = pb.run(x, b, g)
            if yb is None or not torch.allclose(ya, yb, rtol=2e-3, atol=2e-3 * ya.abs().max().item()):
                raise SystemExit(f"{out}x{inp}K{k}: A and B disagree")
            runs[0].append(lambda p=pa, x=x, b=b, g=g: p.run(x, b, g))
            runs[1].append(lambda p=pb, x=x, b=b, g=g: p.run(x, b, g))
            runs[2].append(lambda x=x, w=w: F.linear(x, w))

        def cycle(fs):
            def run():
                for f in fs:
                    f()
            return run
        fns[f"{out}x{inp}K{k}"] = (out * inp * n, n, [cycle(r) for r in runs])
    res = {n: ([], [], []) for n in fns}
    for r in range(int(os.environ.get("ROUNDS", 30))):
        for n, (size, copies, fs) in fns.items():
            reps = max(20, int(1500 * 192 * 576 / size))
            for i in ((0, 1, 2) if r % 2 == 0 else (1, 0, 2)):
                t = time.perf_counter()
                for _ in range(reps):
                    fs[i]()
                res[n][i].append((time.perf_counter() - t) / (reps * copies) * 1e6)
    for n, (a, b, c) in res.items():
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"{n:14s} A min {min(a):7.2f} med {statistics.median(a):7.2f} | B min {min(b):7.2f} "
              f"med {statistics.median(b):7.2f} | dense min {min(c):7.2f} | A/B {ratio:.3f} | dense/A min "
              f"{min(c) / min(a):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
