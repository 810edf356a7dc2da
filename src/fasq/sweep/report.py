"""Where fasq stands, read off the measured rows, and the BENCHMARKS.md section that shows it.

Each model's section lives between its own markers (``<!-- accuracy:begin -->`` / ``<!-- accuracy:end -->``
for the embedded default, SmolLM2; ``<!-- accuracy-MODEL:begin -->`` ... for any other); other sections of
the file are left alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .points import METHOD_ORDER
from .table import METHOD_NAMES, label, render

BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def markers(model: str = "smollm2", name: str | None = None) -> tuple[str, str]:
    """The section markers of one model's accuracy section, or with ``name`` of a sweep written to a
    directory of its own (e.g. ``smollm2-llamacpp``), so that it never overwrites the model's section."""
    if name is None and model == "smollm2":
        return BEGIN, END
    name = name or Path(model).name
    return f"<!-- accuracy-{name}:begin -->", f"<!-- accuracy-{name}:end -->"
# Budgets of issue 4, with the baselines each is compared against (bits of the baseline's codes).
BUDGETS = ((4.25, 4), (3.25, 3))


def _bits(r: dict):
    if r["method"] == "llamacpp":   # Q4_K_M, IQ4_XS -> 4; Q3_K_S, IQ3_XXS -> 3
        m = re.match(r"I?Q(\d)", str(r.get("settings", {}).get("type", "")).upper())
        return int(m.group(1)) if m else None
    return 4 if r["method"] == "nf4" else r.get("settings", {}).get("bits")


def _name(r: dict) -> str:
    return f"{METHOD_NAMES.get(r['method'], r['method'])} {label(r)}"


def standing(doc: dict) -> list[str]:
    """One line per budget: fasq's best row within it against each baseline row of that many bits."""
    ok = [r for r in doc["rows"] if r.get("status") == "ok"]
    lines = []
    for budget, bits in BUDGETS:
        fasq = [r for r in ok if r["method"] == "fasq" and r["bits_per_weight"] <= budget + 1e-9]
        base = [r for r in ok if r["method"] not in ("fasq", "original") and _bits(r) == bits]
        if not fasq:
            lines.append(f"- <= {budget} bits/weight: no fasq row within the budget.")
            continue
        best = min(fasq, key=lambda r: r["perplexity"])
        parts = []
        for b in sorted(base, key=lambda r: r["perplexity"]):
            d = 100 * (best["perplexity"] / b["perplexity"] - 1)
            verdict = "fasq better" if d < 0 else "fasq worse"
            parts.append(f"{_name(b)} ({b['bits_per_weight']:.2f} b/w) {b['perplexity']:.2f}: {verdict} by "
                         f"{abs(d):.1f}%")
        beaten = sum(1 for b in base if best["perplexity"] < b["perplexity"])
        lines.append(f"- <= {budget} bits/weight: best fasq is {label(best)} ({best['bits_per_weight']:.3f} b/w), "
                     f"perplexity {best['perplexity']:.2f}; it beats {beaten} of {len(base)} {bits}-bit baselines. "
                     + "; ".join(parts) + ".")
    return lines


def _against(docs: dict[str, dict]) -> str:
    """'fasq's grid against GPTQ, HQQ and RTN': the baselines that have rows (run or not) in the docs."""
    present = {r.get("method") for doc in docs.values() for r in doc["rows"]} - {"fasq", "original"}
    names = [METHOD_NAMES.get(m, m) for m in METHOD_ORDER if m in present]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    return "fasq's grid" + (f" against {listed}, each through its own library," if listed else "")


def section(docs: dict[str, dict], commands: list[str], base: str = "benchmarks/results/accuracy",
            model: str = "smollm2", name: str | None = None) -> str:
    """The BENCHMARKS.md section (between the model's markers, or ``name``'s: see :func:`markers`) for the
    docs of one or more texts."""
    any_doc = next(iter(docs.values()))
    m = any_doc.get("machine", {})
    begin, end = markers(model, name)
    title = MODEL_TITLES.get(model, Path(model).name)
    own_title = model != "smollm2" or name is not None   # headings stay unique within BENCHMARKS.md
    heading = "## Compression vs accuracy (fasq sweep)"
    if own_title:
        heading += f": {title}" + (f", `{base}`" if name else "")
    out = [begin, heading, "",
           f"{title}; {_against(docs)} "
           f"sized and scored the same way (docs/accuracy.md). Machine: {m.get('cpu', '?')}, "
           f"{m.get('cores', '?')} cores shared with other work; torch {m.get('torch', '?')}, transformers "
           f"{m.get('transformers', '?')}. Date: {any_doc['date'][:10]}.", "", "Commands:", "", "```bash",
           *commands, "```", ""]
    for text, doc in docs.items():
        stem = Path(text).stem
        out += [f"### {stem}" + (f" ({title})" if own_title else ""), "", "Where fasq stands:", "",
                *standing(doc), "", render(doc).rstrip(), "",
                f"![perplexity vs bits/weight on {stem}]({base}/{stem}/plot.png)", ""]
    out.append(end)
    return "\n".join(out) + "\n"


def update_markdown(path: str | os.PathLike, text: str, title: str = "# Benchmarks",
                    model: str = "smollm2", name: str | None = None) -> Path:
    """Replace the section between the markers of ``model`` (or ``name``) in ``path`` (append it, or create
    the file, if missing)."""
    path = Path(path)
    begin, end = markers(model, name)
    old = path.read_text() if path.is_file() else f"{title}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + text.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
    return path
