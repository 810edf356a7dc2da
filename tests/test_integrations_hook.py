"""fasq-hook.pth: an installed fasq loads with plain ``from_pretrained``, no ``import fasq`` (issue 23.1).

Each check runs a fresh interpreter: the point is what happens when nothing imported fasq first.
"""
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fasq
from fasq import FASQConfig

from conftest import make_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]   # the checkout under test
SRC = ROOT / "src"

# Loads the directory in argv[1] with plain transformers and saves its logits to argv[2].
LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "fasq" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
import fasq
assert fasq.__file__.startswith(sys.argv[3]), (fasq.__file__, sys.argv[3])
assert type(model.model.layers[0].mlp.up_proj).__name__ == "PQLinear"
with torch.no_grad():
    torch.save(model(torch.arange(12).reshape(1, 12)).logits, sys.argv[2])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False)
    out = tmp_path_factory.mktemp("hook") / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    with torch.no_grad():
        ref = fasq.load(out)(torch.arange(12).reshape(1, 12)).logits
    return out, ref


def run(python, code, *args, env=None, **kw):
    proc = subprocess.run([str(python), "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def env_without_pythonpath(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_hook_module_registers_in_a_fresh_interpreter(saved, tmp_path):
    """What fasq-hook.pth runs, run by hand (PYTHONPATH does not process .pth files)."""
    out, ref = saved
    code = "import _fasq_hook; _fasq_hook.install()\n" + LOAD
    run(sys.executable, code, out, tmp_path / "y.pt", SRC, env=env_without_pythonpath(PYTHONPATH=str(SRC)))
    assert torch.equal(torch.load(tmp_path / "y.pt"), ref)


def test_hook_costs_no_heavy_imports():
    code = ("import sys, _fasq_hook; _fasq_hook.install(); _fasq_hook.install();"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('fasq', 'torch', 'transformers')];"
            "assert sum(type(f).__name__ == 'RegisterOnImport' for f in sys.meta_path) == 1")
    run(sys.executable, code, env=env_without_pythonpath(PYTHONPATH=str(SRC)))


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _can_build_without_isolation() -> bool:
    """pip, setuptools >= 64 (editable wheels) and bdist_wheel (setuptools >= 70, or the wheel package).
    Read from the installed metadata: importing setuptools here would replace an imported distutils, and
    even find_spec("pip") makes setuptools' distutils shim step aside (then torch's C++ builds fail)."""
    setuptools = _installed("setuptools")
    if setuptools is None or _installed("pip") is None:
        return False
    major = int(setuptools.split(".")[0])
    return major >= 70 or (major >= 64 and _installed("wheel") is not None)


needs_setuptools = pytest.mark.skipif(not _can_build_without_isolation(),
                                      reason="installing without build isolation needs pip, setuptools >= 64 "
                                             "and bdist_wheel")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d),
                    str(ROOT)], check=True, timeout=600, env=env_without_pythonpath())
    return next(d.glob("fasq-*.whl"))


@needs_setuptools
def test_wheel_installs_the_hook(wheel):
    with zipfile.ZipFile(wheel) as z:
        assert z.read("fasq-hook.pth").decode() == "import _fasq_hook; _fasq_hook.install()\n"
        assert "_fasq_hook.py" in z.namelist()
        assert "fasq-hook.pth" in z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()


@needs_setuptools
@pytest.mark.parametrize("how", ["editable", "wheel"])
def test_installed_fasq_loads_with_plain_from_pretrained(saved, tmp_path, how, request):
    """``pip install -e .`` / ``pip install fasq.whl`` into a venv (on top of this environment's torch and
    transformers), then a fresh interpreter of that venv with no PYTHONPATH loads the real weights."""
    out, ref = saved
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=300)
    python = venv / "bin" / "python"
    target = ["-e", str(ROOT)] if how == "editable" else [str(request.getfixturevalue("wheel"))]
    env = env_without_pythonpath()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *target],
                   check=True, timeout=600, env=env)
    installed = SRC if how == "editable" else venv
    run(python, LOAD, out, tmp_path / "y.pt", installed, env=env)
    assert torch.equal(torch.load(tmp_path / "y.pt"), ref)
