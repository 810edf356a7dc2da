"""The Pareto plot of a sweep: perplexity (log scale) against bits/weight, one line per method."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from .table import METHOD_NAMES

STYLES = {"fasq": ("tab:red", "o"), "gptq": ("tab:blue", "s"), "awq": ("tab:green", "^"),
          "hqq": ("tab:purple", "D"), "nf4": ("tab:orange", "P"), "llamacpp": ("tab:brown", "X"),
          "rtn": ("tab:gray", "v")}


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped into plot lines: fasq is one line; baselines get one line per group size."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "ok" or r["method"] == "original":
            continue
        name = METHOD_NAMES.get(r["method"], r["method"])
        s = r.get("settings", {})
        if r["method"] in ("gptq", "awq", "hqq", "rtn") and "group_size" in s:
            name += f" g{s['group_size']}"
        out[name].append(r)
    return {k: sorted(v, key=lambda r: r["bits_per_weight"]) for k, v in out.items()}


def write_plot(doc: dict, path: str | os.PathLike) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for i, (name, pts) in enumerate(sorted(series(rows).items())):
        method = pts[0]["method"]
        color, marker = STYLES.get(method, (None, "o"))
        dashed = method != "fasq" and any(p.get("settings", {}).get("group_size") not in (None, 128) for p in pts)
        ax.plot([p["bits_per_weight"] for p in pts], [p["perplexity"] for p in pts], marker=marker, color=color,
                linestyle="--" if dashed else "-", linewidth=2.2 if method == "fasq" else 1.4, markersize=5,
                label=name)
    orig = next((r for r in rows if r.get("method") == "original" and r.get("status") == "ok"), None)
    if orig:
        ax.axhline(orig["perplexity"], color="black", linestyle=":", linewidth=1.2,
                   label=f"original ({orig['perplexity']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers, every stored byte)")
    ax.set_ylabel("perplexity (log scale)")
    ok = [r for r in rows if r.get("status") == "ok"]
    windows = ok[0]["windows"] if ok else "?"
    ax.set_title(f"{doc['model']} on {doc['text']}: {windows} x {doc['eval']['context_length']} tokens, "
                 f"{doc['date'][:10]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
