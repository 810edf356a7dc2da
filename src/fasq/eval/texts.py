"""Evaluation texts: a local file, the Lee news corpus (inside the gensim wheel), six Jane Austen novels
(Debian's r-cran-janeaustenr), and WikiText-2 through `datasets` for users with internet.

Each source returns plain text with hard-wrapped lines reflowed into paragraphs.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..data import cache_dir

log = logging.getLogger(__name__)

GENSIM_VERSION = "4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
AUSTEN_BOOKS = ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey",
                "Persuasion")
SOURCES = ("lee", "austen", "wikitext2")


def reflow(text: str) -> str:
    """Join hard-wrapped lines: paragraphs (blank-line separated) become single lines."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out = [" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paras]
    return "\n\n".join(p for p in out if p)


def lee() -> str:
    """The Lee background news corpus (300 short articles), read from the gensim wheel's test data."""
    target = cache_dir() / "lee_background.txt"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    dl = cache_dir() / "wheels"
    dl.mkdir(exist_ok=True)
    wheels = sorted(dl.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"gensim=={GENSIM_VERSION}",
                        "-d", str(dl)], check=True)
        wheels = sorted(dl.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"could not download the gensim {GENSIM_VERSION} wheel that carries the Lee corpus")
    with zipfile.ZipFile(wheels[0]) as z:
        raw = z.read(LEE_MEMBER).decode("utf-8", errors="replace")
    docs = [line.strip() for line in raw.splitlines() if line.strip()]
    text = "\n\n".join(docs)
    _atomic_write(target, text)
    return text


def austen(books: tuple[str, ...] = AUSTEN_BOOKS) -> str:
    """Six Jane Austen novels from Debian's r-cran-janeaustenr (installed with apt-get if missing)."""
    key = "_".join(re.sub(r"\W", "", b).lower()[:6] for b in books)
    target = cache_dir() / f"austen_{key}.txt"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    if not Path("/usr/lib/R/site-library/janeaustenr").exists() or shutil.which("Rscript") is None:
        _apt_install("r-cran-janeaustenr")
    script = ("suppressMessages(library(janeaustenr)); b <- austen_books(); "
              "for (n in commandArgs(TRUE)) { writeLines(as.character(b$text[b$book == n])); "
              "writeLines('\\n\\n') }")
    res = subprocess.run(["Rscript", "-e", script, *books], capture_output=True, text=True, check=True)
    text = reflow(res.stdout)
    if len(text) < 10000:
        raise RuntimeError(f"janeaustenr returned only {len(text)} characters for {books}")
    _atomic_write(target, text)
    return text


def wikitext2(split: str = "test") -> str:
    """WikiText-2 (raw) through `datasets` (needs internet the first time)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("WikiText-2 needs the `datasets` package: pip install 'fasq[data]'") from e
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return wikitext_join(ds["text"])


def wikitext_join(lines: list[str]) -> str:
    """Join WikiText rows the usual way (the rows already carry their newlines)."""
    return "".join(lines)


def load_text(source: str) -> str:
    """Text for a source name (lee, austen, wikitext2) or a path to a UTF-8 text file."""
    if source == "lee":
        return lee()
    if source == "austen":
        return austen()
    if source in ("wikitext2", "wikitext"):
        return wikitext2()
    p = Path(source)
    if p.is_file():
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {source}: not UTF-8 text (byte {e.start}: {e.reason}); give a UTF-8 "
                             "text file") from None
        if "\x00" in text:
            raise ValueError(f"text file {source}: holds NUL bytes, so it is binary, not text")
        if not text.strip():
            raise ValueError(f"text file {source}: empty")
        return text
    raise ValueError(f"text source {source!r}: not a file, and not one of {SOURCES}")


def _apt_install(pkg: str) -> None:
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{pkg} is needed (Debian package) and apt-get is not available")
    log.info("installing Debian package %s", pkg)
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", pkg], check=True,
                   capture_output=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
