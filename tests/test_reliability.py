"""Issue 20: nothing lost, nothing silently wrong.  One test (or a few) per defect found by trying fasq
as a new user would; each failed on f0d3204's code.  docs/reliability.md lists them by kind."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fasq
from fasq import FASQConfig
from fasq.cli import main
from fasq.errors import StorageRangeError
from fasq.fit.pq import NonFiniteWeightError
from fasq.io import FormatError
from fasq.outputs import UnsafeOutputError
from fasq.stream import quantize_checkpoint
from fasq.stream.check import verify
from fasq.stream.run import partial_dir

from conftest import make_tokenizer, tiny_model
from test_stream import assert_same_tensors, make_checkpoint, stored_tensors

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
CFG = FASQConfig(codebook_size=16)
IDS = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))


def env_for_subprocess() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rel") / "llama-bf16")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small in-memory-saved fasq model and its logits."""
    model = fasq.quantize(tiny_model("qwen3"), FASQConfig(codebook_size=32, outlier_fraction=0.005), progress=False)
    out = tmp_path_factory.mktemp("rel") / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    return out, logits(fasq.load(out))


# ---------------------------------------------------------------------------------------------- 1
def test_sharded_streaming_output_loads_everywhere(tmp_path, bf16_ckpt, capsys):
    out = tmp_path / "sharded"
    r = quantize_checkpoint(bf16_ckpt, out, CFG, max_shard_size="30KB", progress=False)
    assert len([f for f in r["files"] if f.endswith(".safetensors")]) > 2
    one = tmp_path / "one"
    quantize_checkpoint(bf16_ckpt, one, CFG, progress=False)
    ref = logits(fasq.load(one))
    assert torch.equal(logits(fasq.load(out)), ref)
    from transformers import AutoModelForCausalLM
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), ref)
    assert main(["info", str(out)]) == 0 and "% of FP16" in capsys.readouterr().out
    text = tmp_path / "t.txt"
    text.write_text("a truth universally acknowledged " * 40)
    assert main(["eval", str(out), "--text", str(text), "--context-length", "32", "-q"]) == 0
    assert main(["generate", str(out), "It is a truth", "--max-new-tokens", "3", "-q"]) == 0


def test_a_shard_that_disagrees_with_the_index_is_refused(tmp_path, bf16_ckpt):
    out = tmp_path / "sharded"
    quantize_checkpoint(bf16_ckpt, out, CFG, max_shard_size="30KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="index"):
        fasq.load(out)           # the index is covered by the manifest
    with pytest.raises(FormatError, match=name):
        fasq.load(out, verify=False)


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("equalize", ["balance", "full"])
def test_relative_output_with_equalize(tmp_path, bf16_ckpt, monkeypatch, equalize):
    src = shutil.copytree(bf16_ckpt, tmp_path / "models" / "src")
    monkeypatch.chdir(tmp_path)
    r = quantize_checkpoint(Path("models/src"), Path("out/q4"), CFG.replace(equalize=equalize), progress=False)
    assert r["blocks_equalized"] == 2 and r["output"] == "out/q4"
    assert (tmp_path / "out" / "q4" / "fasq.json").is_file() and not (tmp_path / "out" / "q4.partial").exists()
    assert not (src / "out").exists()
    assert main(["quantize", "models/src", "-o", "out/cli", "-k", "16", "--equalize", equalize, "-q"]) == 0
    assert_same_tensors(stored_tensors(tmp_path / "out" / "q4"), stored_tensors(tmp_path / "out" / "cli"))


# ---------------------------------------------------------------------------------------------- 3
def test_kernel_build_is_published_once_ready(monkeypatch):
    """Two threads asking for the k-means kernel while it builds both get it (one fell back to faiss)."""
    from fasq.fit import native

    real = native.build_first_that_works

    def slow_build(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(native, "build_first_that_works", slow_build)
    monkeypatch.setattr(native, "_state", {})
    got = []
    threads = [threading.Thread(target=lambda: got.append(native.module())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is not None and got[1] is got[0]


def test_lloyd_statistics_do_not_depend_on_the_thread_count():
    from fasq.fit import native

    if native.module() is None:
        pytest.skip("no C++ compiler: the k-means kernel did not build")
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(50_000, 2, generator=g), torch.randn(256, 2, generator=g)
    prev = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native.lloyd_stats(x, c))
    finally:
        torch.set_num_threads(prev)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


STREAM_SCRIPT = """
import os, signal, sys
from fasq import FASQConfig
from fasq.stream import quantize_checkpoint, run
kill_after = int(sys.argv[4])
if kill_after:
    orig = run.Workspace.commit
    def commit(self, rec):
        orig(self, rec)
        if len(self.done) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    run.Workspace.commit = commit
quantize_checkpoint(sys.argv[1], sys.argv[2], FASQConfig(codebook_size=16, equalize="balance"),
                    workers=int(sys.argv[3]), progress=False)
"""


def stream_in_fresh_process(src, out, workers: int, kill_after: int = 0) -> int:
    p = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(src), str(out), str(workers), str(kill_after)],
                       env=env_for_subprocess(), capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-3000:]
    return p.returncode


def test_same_output_for_any_worker_count_and_after_a_kill(tmp_path, bf16_ckpt):
    """Fresh processes (the k-means kernel is loaded while the first units already run)."""
    stream_in_fresh_process(bf16_ckpt, tmp_path / "w1", 1)
    stream_in_fresh_process(bf16_ckpt, tmp_path / "w2", 2)
    assert stream_in_fresh_process(bf16_ckpt, tmp_path / "killed", 2, kill_after=5) == -signal.SIGKILL
    assert partial_dir(tmp_path / "killed").is_dir()
    stream_in_fresh_process(bf16_ckpt, tmp_path / "killed", 2)     # resumes
    one = stored_tensors(tmp_path / "w1")
    assert_same_tensors(one, stored_tensors(tmp_path / "w2"))
    assert_same_tensors(one, stored_tensors(tmp_path / "killed"))


# ---------------------------------------------------------------------------------------------- 4
def test_weight_beyond_fp16_is_refused_not_stored_as_inf(tmp_path):
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.data[3, 5] = 1e5      # taken out as an outlier: value 1e5
    with pytest.raises(StorageRangeError, match="up_proj.*outlier"):
        fasq.quantize(model, CFG.replace(outlier_fraction=0.001, equalize="none"), progress=False)
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.data[3, 5] = 1e5      # no outlier table, no rotation: the scale
    with pytest.raises(StorageRangeError, match="up_proj.*scales"):
        fasq.quantize(model, CFG.replace(outlier_fraction=0.0, rotation="none", equalize="none"), progress=False)
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.data[3, 5] = 1e5      # rotated, it spreads and fits: stored finite
    fasq.quantize(model, CFG.replace(outlier_fraction=0.0, equalize="none"), progress=False)
    assert all(b.isfinite().all() for n, b in model.named_buffers() if b.is_floating_point())
    assert logits(model).isfinite().all()


def test_norm_beyond_fp16_is_refused_in_memory_and_streaming(tmp_path):
    model = tiny_model("llama")
    model.model.layers[1].input_layernorm.weight.data[0] = 1e5
    with pytest.raises(StorageRangeError, match="layers.1.input_layernorm"):
        fasq.quantize(model, CFG.replace(equalize="none"), progress=False)
    src = make_checkpoint(tmp_path / "src", dtype=torch.float32)
    f = next(p for p in src.glob("*.safetensors") if "model.layers.1.input_layernorm.weight" in load_file(p))
    tensors = load_file(f)
    tensors["model.layers.1.input_layernorm.weight"][0] = 1e5
    from safetensors.torch import save_file
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(StorageRangeError, match="layers.1.input_layernorm"):
        quantize_checkpoint(src, tmp_path / "out", CFG.replace(equalize="none"), progress=False)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 5
def test_manifest_covers_config_and_every_data_file(saved, tmp_path):
    out, _ = saved
    d = shutil.copytree(out, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    mods = cfg["quantization_config"]["modules"]
    name = next(n for n, m in mods.items() if m["rotation_block"] > 2)
    mods[name]["rotation_block"] //= 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="config.json"):
        fasq.load(d)
    with pytest.raises(FormatError, match="config.json"):
        verify(d)
    for files in ({}, [], {"config.json": json.loads((out / "fasq.json").read_text())["files"]["config.json"]}):
        e = shutil.copytree(out, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        man = json.loads((e / "fasq.json").read_text())
        man["files"] = files
        (e / "fasq.json").write_text(json.dumps(man))
        with pytest.raises(FormatError, match="files|not covered"):
            fasq.load(e)
        with pytest.raises(FormatError):
            verify(e)


# ---------------------------------------------------------------------------------------------- 6
def test_output_may_not_be_or_hold_the_input(tmp_path, bf16_ckpt):
    src = shutil.copytree(bf16_ckpt, tmp_path / "src")
    before = stored_tensors(src)
    for out in (src, src / "inside", tmp_path):
        for extra in ([], ["--in-memory"]):
            assert main(["quantize", str(src), "-o", str(out), "-k", "16", "--overwrite", "-q", *extra]) == 2
        with pytest.raises(UnsafeOutputError):
            quantize_checkpoint(src, out, CFG, overwrite=True, force=True, progress=False)
    assert_same_tensors(before, stored_tensors(src))
    model, tok = fasq.io.load_any(str(src))
    fasq.quantize(model, CFG, progress=False)
    with pytest.raises(UnsafeOutputError):
        fasq.save(model, src, overwrite=True, force=True)
    assert_same_tensors(before, stored_tensors(src))


def test_overwrite_replaces_only_what_fasq_wrote(tmp_path, bf16_ckpt, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(["quantize", str(bf16_ckpt), "-o", str(precious), "-k", "16", "--overwrite", "-q"]) == 2
    assert "--force" in capsys.readouterr().err and (precious / "thesis.tex").is_file()
    with pytest.raises(UnsafeOutputError):
        quantize_checkpoint(bf16_ckpt, precious, CFG, overwrite=True, progress=False)
    assert (precious / "thesis.tex").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(bf16_ckpt), "-o", str(empty), "-k", "16", "--overwrite", "-q"]) == 0
    assert main(["quantize", str(bf16_ckpt), "-o", str(empty), "-k", "16", "--overwrite", "-q", "--in-memory"]) == 0
    assert main(["quantize", str(bf16_ckpt), "-o", str(precious), "-k", "16", "--overwrite", "--force", "-q"]) == 0
    assert not (precious / "thesis.tex").exists() and (precious / "fasq.json").is_file()


# ---------------------------------------------------------------------------------------------- 7
def test_two_saves_racing_for_one_output_do_not_both_succeed(tmp_path, monkeypatch):
    import fasq.manifest as manifest

    a = fasq.quantize(tiny_model("llama", seed=1), CFG, progress=False)
    b = fasq.quantize(tiny_model("llama", seed=2), CFG, progress=False)
    out = tmp_path / "out"
    real_write = manifest.write
    state = {"done": False}

    def write_then_let_b_finish(path, m):  # run A; B completes while A is still writing
        real_write(path, m)
        if not state["done"]:
            state["done"] = True
            fasq.save(b, out)

    monkeypatch.setattr(manifest, "write", write_then_let_b_finish)
    with pytest.raises(FileExistsError, match="appeared"):
        fasq.save(a, out)
    assert torch.equal(logits(fasq.load(out)), logits(b))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------- 8
def _mutations(value):
    """Wrong type, negative, zero, huge, and 'missing' (None here) for any JSON value."""
    wrong = "2" if not isinstance(value, str) else 2
    return [wrong, -5, 0, 10**12, [value], {"x": value}, True, None]


def _fields(obj, prefix=()):
    """Every path to a leaf or container of a JSON object (containers are mutated as a whole too)."""
    for k, v in obj.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _fields(v, prefix + (k,))


def _mutated(doc, path, value):
    doc = json.loads(json.dumps(doc))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _fuzz_fields(out: Path, name: str) -> list[tuple]:
    doc = json.loads((out / name).read_text())
    if name == "config.json":  # one module stands for all: the table's entries share the same fields
        first = next(iter(doc["quantization_config"]["modules"]))
        keep = lambda p: not (len(p) > 2 and p[1] == "modules" and p[2] != first)  # noqa: E731
    else:
        keep = lambda p: not (len(p) > 1 and p[0] in ("files", "tensors", "units", "stream")  # noqa: E731
                              and p[1] not in ("config.json", "model.safetensors", "model.embed_tokens.weight"))
    return [p for p in _fields(doc) if keep(p)]


@pytest.mark.parametrize("name", ["config.json", "fasq.json"])
def test_loader_fuzz_every_field(saved, tmp_path, name):
    """Each mutation of each field: load succeeds with the right logits, or raises FormatError; nothing
    else.  With verify=False (no checksums) and for `fasq verify`, FormatError or success only."""
    out, ref = saved
    doc = json.loads((out / name).read_text())
    d = shutil.copytree(out, tmp_path / "f")
    cases = 0
    for path in _fuzz_fields(out, name):
        for value in _mutations(_get(doc, path)):
            (d / name).write_text(json.dumps(_mutated(doc, path, value)))
            cases += 1
            try:
                got = logits(fasq.load(d))
            except FormatError:
                pass
            else:
                assert torch.equal(got, ref), (path, value)
            for fn in (lambda: fasq.load(d, verify=False), lambda: verify(d)):
                try:
                    fn()
                except FormatError:
                    pass
    shutil.copyfile(out / name, d / name)
    assert torch.equal(logits(fasq.load(d)), ref)
    assert cases > (150 if name == "config.json" else 60)


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


# ---------------------------------------------------------------------------------------------- 9
def _cli_error(capsys, argv, code=None) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code), (argv, rc, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_bad_inputs_get_one_clear_line(tmp_path, saved, capsys):
    out, _ = saved
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    assert "no such directory" in _cli_error(capsys, ["eval", str(tmp_path / "nope"), "--text", str(text)])
    assert "no such directory" in _cli_error(capsys, ["quantize", "./missing/model", "-o", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "config.json" in _cli_error(capsys, ["eval", str(tmp_path / "empty"), "--text", str(text)])
    (tmp_path / "listcfg").mkdir()
    (tmp_path / "listcfg" / "config.json").write_text("[1, 2]")   # not an object: not a fasq dir, no crash
    _cli_error(capsys, ["eval", str(tmp_path / "listcfg"), "--text", str(text)])
    assert "prompt is empty" in _cli_error(capsys, ["generate", str(out), "  "])
    assert "positions" in _cli_error(capsys, ["generate", str(out), "Hi", "--max-new-tokens", "1000000000"])
    assert "positions" in _cli_error(capsys, ["eval", str(out), "--text", str(text), "--context-length", "100000"])
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert "UTF-8" in _cli_error(capsys, ["eval", str(out), "--text", str(binary)])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save({"x": os.system}, pickled / "pytorch_model.bin")
    assert "UnpicklingError" in _cli_error(capsys, ["eval", str(pickled), "--text", str(text)], code=1)


@pytest.mark.parametrize("argv", [["eval", "m", "--batch-size", "0"], ["eval", "m", "--max-tokens", "-5"],
                                  ["generate", "m", "x", "--max-new-tokens", "0"],
                                  ["eval", "m", "--context-length", "1"], ["bench", "m", "--repeats", "0"]])
def test_cli_out_of_range_numbers_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 10
KILL_WHILE_SAVING = """
import os, signal, sys
import fasq, fasq.manifest as manifest
from conftest import tiny_model
model = fasq.quantize(tiny_model("llama"), fasq.FASQConfig(codebook_size=16), progress=False)
manifest.write = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
fasq.save(model, sys.argv[1])
"""


def test_killed_save_leaves_nothing_a_rerun_keeps(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(out)], env=env_for_subprocess(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")
    fasq.save(fasq.quantize(tiny_model("llama"), CFG, progress=False), out)
    assert [q.name for q in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, bf16_ckpt, umask):
    old = os.umask(umask)
    try:
        fasq.save(fasq.quantize(tiny_model("llama"), CFG, progress=False), tmp_path / "mem")
        quantize_checkpoint(bf16_ckpt, tmp_path / "stream", CFG.replace(equalize="none"), progress=False)
    finally:
        os.umask(old)
    for d in (tmp_path / "mem", tmp_path / "stream"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


# ---------------------------------------------------------------------------------------------- 11
def test_nan_is_counted_in_the_input(tmp_path, bf16_ckpt):
    model = tiny_model("llama")
    model.model.layers[0].self_attn.v_proj.weight.data[2, 3] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"v_proj.weight'?: 1 NaN"):
        fasq.quantize(model, CFG.replace(equalize="balance"), progress=False)
    src = shutil.copytree(bf16_ckpt, tmp_path / "src")
    f = next(p for p in src.glob("*.safetensors") if "model.layers.0.self_attn.v_proj.weight" in load_file(p))
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.v_proj.weight"][2, 3] = float("nan")
    from safetensors.torch import save_file
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match=r"v_proj.weight'?: 1 NaN"):
        quantize_checkpoint(src, tmp_path / "out", CFG.replace(equalize="balance"), progress=False)
    norm = tiny_model("llama")                      # an unquantized tensor too, in memory and streaming
    norm.model.norm.weight.data[1] = float("inf")
    with pytest.raises(NonFiniteWeightError, match="model.norm.weight"):
        fasq.quantize(norm, CFG.replace(equalize="none"), progress=False)
    src = make_checkpoint(tmp_path / "src2", dtype=torch.float32)
    f = next(p for p in src.glob("*.safetensors") if "model.norm.weight" in load_file(p))
    tensors = load_file(f)
    tensors["model.norm.weight"][1] = float("inf")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match="model.norm.weight"):
        quantize_checkpoint(src, tmp_path / "out2", CFG.replace(equalize="none"), progress=False)
    assert not partial_dir(tmp_path / "out2").exists()


def test_a_model_larger_than_fp16_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="fasq.model"):
        fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=65536, equalize="none"), progress=False)
    assert any("more than the 16 of FP16" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fasq.model"):
        fasq.quantize(tiny_model("llama"), CFG, progress=False)
    assert not any("FP16" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------- 12
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cli_streaming_and_in_memory_give_identical_files(tmp_path, dtype):
    src = make_checkpoint(tmp_path / "src", dtype=dtype)
    common = ["-k", "16", "--equalize", "full", "-q"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "s"), *common]) == 0
    assert main(["quantize", str(src), "-o", str(tmp_path / "m"), "--in-memory", *common]) == 0
    assert_same_tensors(stored_tensors(tmp_path / "s"), stored_tensors(tmp_path / "m"))
