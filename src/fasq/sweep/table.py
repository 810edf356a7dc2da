"""The Markdown table of a sweep (results.json -> table.md)."""
from __future__ import annotations

import os
from pathlib import Path

METHOD_NAMES = {"original": "original", "fasq": "fasq", "gptq": "GPTQ", "awq": "AWQ", "hqq": "HQQ",
                "nf4": "NF4", "llamacpp": "llama.cpp", "rtn": "RTN"}

CAVEATS = {"gemma3-270m": (
    "Gemma-3-270M's weights were dequantized from a Q4_K_M GGUF (Q5_0 / Q4_K / Q6_K / Q8_0 blocks of 32 and 256), "
    "and 'original' is that dequantized model. Group-wise methods whose groups are multiples of 32 (g128, g64, "
    "NF4's blocks of 64) contain whole blocks of that grid and may look better here than on a natively 16-bit "
    "model; the smaller the group, the larger this advantage.")}
CAVEAT = ("SmolLM2's weights were dequantized from a Q4_1 GGUF (4-bit blocks of 32), and 'original' is that "
          "dequantized model. Group-wise methods whose groups are multiples of 32 (g128, g64, NF4's blocks of "
          "64) contain whole Q4_1 blocks and may look better here than they would on a natively 16-bit model; "
          "the smaller the group, the larger this advantage. g128 is the standard group size and is used where "
          "the library allows it.")


def _fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _calib(row: dict) -> str:
    c = row.get("calibration")
    return c["description"] if isinstance(c, dict) else "none"


def label(row: dict) -> str:
    """The row's settings in words (from the current code, so old cached rows read the same)."""
    from .points import Point
    try:
        return Point(row["method"], row.get("settings", {})).label
    except (KeyError, ValueError):
        return str(row.get("label", ""))


def relative(ppl: float, ref: float) -> str:
    ratio = ppl / ref
    return f"x{ratio:.0f}" if ratio >= 10 else f"{100 * (ratio - 1):+.1f}%"


def render(doc: dict) -> str:
    rows = doc["rows"]
    orig = next((r for r in rows if r.get("method") == "original" and r.get("status") == "ok"), None)
    ev = doc["eval"]
    ok = [r for r in rows if r.get("status") == "ok"]
    scored = ok[0]["tokens_scored"] if ok else None
    windows = ok[0]["windows"] if ok else None
    lines = [
        f"Model `{doc['model']}`, text `{doc['text']}`: perplexity over the first {windows} windows of "
        f"{ev['context_length']} tokens ({scored} tokens scored, the same windows for every row, a BOS first "
        f"only where the tokenizer adds one). "
        f"bits/weight counts every stored byte of the quantized linear layers; % of FP16 is the whole model "
        f"with everything else at 16 bits (tied embedding once). Calibration for GPTQ/AWQ: "
        f"{doc['calibration']['description']} (disjoint from the evaluated text).",
        "",
        "| method | settings | library | bits/weight | % of FP16 | perplexity | vs original | bits/byte "
        "| quantize s | peak RSS MiB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in ok:
        delta = relative(r["perplexity"], orig["perplexity"]) if orig and r is not orig else ""
        cached = " (cached)" if r.get("from_cache") else ""
        stale = " (older fasq code)" if any("other fasq code" in n for n in r.get("notes") or []) else ""
        lines.append(
            f"| {METHOD_NAMES.get(r['method'], r['method'])} | {label(r) if r['method'] != 'original' else 'fp16'}{stale} "
            f"| {r.get('library', '')} {r.get('version', '')} | {r['bits_per_weight']:.3f} "
            f"| {100 * r['fraction_of_fp16']:.1f} | {r['perplexity']:.3f} | {delta} | {r['bits_per_byte']:.4f} "
            f"| {_fmt(r.get('quantize_seconds'), '.1f')}{cached} | {_fmt(r.get('peak_rss_mb'), '.0f')} |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "Failed or not run:", ""]
        for r in failed:
            err = " ".join(str(r.get("error", "")).split())
            lines.append(f"- {METHOD_NAMES.get(r['method'], r['method'])} {label(r)}: {err[:600]}")
    lines += llamacpp_lines(ok)
    lines += ["", f"Caveat: {CAVEATS.get(doc.get('model'), CAVEAT)}", ""]
    m = doc.get("machine", {})
    lines.append(f"Run {doc['date'][:10]} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch "
                 f"{m.get('torch', '?')}, transformers {m.get('transformers', '?')}, fasq {m.get('fasq', '?')}"
                 + (f"; command: `{doc['command']}`" if doc.get("command") else "") + ".")
    return "\n".join(lines) + "\n"


def llamacpp_lines(ok: list[dict]) -> list[str]:
    """What the llama.cpp rows are made of, and where their blocks line up with the original's GGUF grid."""
    rows = [r for r in ok if r["method"] == "llamacpp"]
    if not rows:
        return []
    mix = []
    for r in rows:
        by_type = r.get("size", {}).get("stored_tensors", {})
        total = sum(by_type.values()) or 1
        mix.append(f"{label(r)}: " + ", ".join(f"{t} {100 * b / total:.0f}%" for t, b in
                                                 sorted(by_type.items(), key=lambda kv: -kv[1])))
    return ["", "llama.cpp rows (llama-cpp-python, no importance matrix; perplexity from llama.cpp's own logits "
            "on the same token ids): their % of FP16 is the GGUF as stored, with the token embedding quantized "
            "by llama.cpp (every other row keeps it at 16 bits). Bytes of the quantized layers by GGUF type: "
            + "; ".join(mix) + ". " + (rows[0].get("notes") or [""])[0]]


def write_table(doc: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(render(doc))
    os.replace(tmp, path)
    return path
