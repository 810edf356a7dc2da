"""Streaming quantization (fasq.stream): equal to the in-memory path bit for bit, bounded by its memory
budget, resumable after a kill, and refusing bad input without writing anything."""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fasq
from fasq import FASQConfig
from fasq.io import FormatError
from fasq.stream import CheckpointError, DiskFullError, add_cli, add_stream_args, parse_size, partial_dir
from fasq.stream import quantize_checkpoint, verify
from fasq.stream import run as stream_run
from fasq.stream.safetensors_io import FileWriter, read_header

from conftest import make_tokenizer, tiny_config

CFG = FASQConfig(codebook_size=16)
HERE = Path(__file__).parent


def make_checkpoint(path: Path, arch: str = "llama", dtype=torch.bfloat16, shard="20KB", seed: int = 0) -> Path:
    """A small random causal LM saved like a hub checkpoint: sharded safetensors, config, tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    make_tokenizer().save_pretrained(path)
    return path


def stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def in_memory(src: Path, dtype, config: FASQConfig, out: Path, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    fasq.quantize(model, config, progress=False, num_workers=2, **kw)
    fasq.save(model, out)
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("src") / "llama-bf16")


def nothing_written(out: Path) -> bool:
    return not out.exists() and not partial_dir(out).exists()


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,dtype,layer,equalize,outliers,feedback", [
    ("llama", torch.bfloat16, None, "balance", 0.0, False),                  # untied lm_head, bf16 kept as bf16
    ("qwen3", torch.float32, "model.layers.1.mlp.down_proj", "full", 0.003, False),  # tied lm_head stored once
    ("gemma3", torch.bfloat16, None, "power", 0.001, False),  # residual powers block by block, embedding in row blocks
    ("llama", torch.bfloat16, None, "sampled", 0.0, False),   # the model loaded once to sample text, then streamed
    ("gemma3", torch.bfloat16, "model.layers.0.mlp.up_proj", "sampled", 0.001, True),  # and covariances measured
])
def test_equals_in_memory_bit_for_bit(tmp_path, monkeypatch, arch, dtype, layer, equalize, outliers, feedback):
    """Equalized blocks (a pre-pass through scratch/), per-layer configs, outlier side tables and error feedback
    included."""
    monkeypatch.setattr("fasq.fit.equalize.EMBEDDING_ROWS", 100)   # "power": several row blocks of the table
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 24)
    cfg = CFG.replace(equalize=equalize, outlier_fraction=outliers, error_feedback=feedback, sample_sequences=3)
    src = make_checkpoint(tmp_path / "src", arch, dtype)
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert len(list(src.glob("*.safetensors"))) > 3
    layer_configs = {layer: cfg.replace(codebook_size=32, group_size=32)} if layer else None
    budget = model_bytes * 2 if equalize == "sampled" else model_bytes // 2   # "sampled" holds the model once
    budget += stream_run.covariance_bytes(stream_run.build_plan(stream_run.open_source(src), cfg)) if feedback else 0
    r = quantize_checkpoint(src, tmp_path / "out", cfg, layer_configs=layer_configs, workers=2,
                            max_memory=budget, max_shard_size="40KB", progress=False)
    assert r["blocks_equalized"] == 2 and r["config"]["equalize"] == equalize
    assert r["config"].get("error_feedback", False) == feedback
    ref = in_memory(src, dtype, cfg, tmp_path / "ref", layer_configs=layer_configs)
    out = tmp_path / "out"
    assert len(r["files"]) > 2 and (out / "model.safetensors.index.json").is_file()
    assert_same_tensors(stored_tensors(ref), stored_tensors(out))
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(out) == qc(ref)
    assert (out / "tokenizer.json").is_file() and not partial_dir(out).exists()
    assert r["bits_per_weight"] == pytest.approx(fasq.model_size_report(fasq.load(ref))["bits_per_weight"])
    assert verify(out)["tensors_with_checksums"] == len(stored_tensors(out))


def test_sampled_beyond_the_memory_budget_streams_with_power(tmp_path, llama_ckpt, caplog):
    """A model larger than the budget cannot be loaded to sample text: the run uses "power", as its config says."""
    model_bytes = sum(f.stat().st_size for f in llama_ckpt.glob("*.safetensors"))
    with caplog.at_level("WARNING"):
        r = quantize_checkpoint(llama_ckpt, tmp_path / "out", CFG.replace(equalize="sampled"),
                                max_memory=model_bytes // 2, progress=False)
    assert r["config"]["equalize"] == "power" and "equalize='power'" in caplog.text
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["equalize"] == "power"
    ref = in_memory(llama_ckpt, torch.bfloat16, CFG.replace(equalize="power"), tmp_path / "ref")
    assert_same_tensors(stored_tensors(ref), stored_tensors(tmp_path / "out"))


def test_feedback_beyond_the_memory_budget_streams_without_it(tmp_path, llama_ckpt, caplog, monkeypatch):
    """The model fits the budget but not with every layer's input covariance: no error feedback, as recorded."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 16)
    model_bytes = sum(f.stat().st_size for f in llama_ckpt.glob("*.safetensors"))
    cfg = CFG.replace(equalize="sampled", error_feedback=True, sample_sequences=2)
    plan = stream_run.build_plan(stream_run.open_source(llama_ckpt), cfg)
    sampling = stream_run.sampling_bytes(plan)
    assert stream_run.covariance_bytes(plan) > sampling + 1000
    with caplog.at_level("WARNING"):
        r = quantize_checkpoint(llama_ckpt, tmp_path / "out", cfg, max_memory=model_bytes + sampling + 1000,
                                progress=False)
    assert "error_feedback" not in r["config"] and r["config"]["equalize"] == "sampled"
    assert "codes without it" in caplog.text
    ref = in_memory(llama_ckpt, torch.bfloat16, cfg.replace(error_feedback=False), tmp_path / "ref")
    assert_same_tensors(stored_tensors(ref), stored_tensors(tmp_path / "out"))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sampling_bytes_covers_the_kv_cache_sampling_fills(tmp_path, monkeypatch, arch):
    """The memory check counts what drawing the samples holds besides the model: the KV cache of every sampled
    sequence in the checkpoint's dtype (measured here on the cache a forward fills), an allowance for its growth
    and some logits."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from fasq.fit.samples import _cache_kwarg

    monkeypatch.setattr("fasq.fit.samples.LENGTH", 24)
    src = make_checkpoint(tmp_path / "src", arch, torch.bfloat16)
    cfg = CFG.replace(equalize="sampled", sample_sequences=5)
    estimate = stream_run.sampling_bytes(stream_run.build_plan(stream_run.open_source(src), cfg))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():   # a whole sequence at once fills what sample_tokens' steps fill one token at a time
        out = model(input_ids=torch.randint(0, 320, (5, 24)), use_cache=True, **{_cache_kwarg(model): cache})
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    logits_step = out.logits[:, -1].float()
    assert held * 4 // 3 <= estimate <= held * 4 // 3 + 4 * logits_step.numel() * logits_step.element_size()
    assert stream_run.sampling_bytes(stream_run.build_plan(stream_run.open_source(src),
                                                           cfg.replace(sample_sequences=10))) == 2 * estimate


def test_the_budget_check_counts_the_sampling_besides_the_model(caplog):
    from fasq.stream.run import streamable

    cfg = FASQConfig(equalize="sampled")
    assert streamable(cfg, model_bytes=100, budget=150, sampling=50) == cfg
    with caplog.at_level("WARNING"):
        assert streamable(cfg, model_bytes=100, budget=150, sampling=51) == cfg.replace(equalize="power")
    assert "KV cache" in caplog.text
    fb = cfg.replace(error_feedback=True)
    # covariances and the sampling's cache are not held at once: the larger of the two counts
    assert streamable(fb, model_bytes=100, budget=150, covariances=50, sampling=40) == fb
    assert streamable(fb, model_bytes=100, budget=150, covariances=40, sampling=50) == fb
    assert streamable(fb, model_bytes=100, budget=150, covariances=51, sampling=10) == cfg
    assert streamable(fb, model_bytes=100, budget=150, covariances=10, sampling=51) == cfg.replace(equalize="power")


def test_size_target_equals_in_memory(tmp_path, llama_ckpt):
    """--target-size: per-layer settings chosen on the meta skeleton exactly as on the loaded model."""
    cfg = CFG.replace(equalize="norms")
    r = quantize_checkpoint(llama_ckpt, tmp_path / "out", cfg, target_fraction=0.5, progress=False)
    ref = in_memory(llama_ckpt, torch.bfloat16, cfg, tmp_path / "ref", target_fraction=0.5)
    assert_same_tensors(stored_tensors(ref), stored_tensors(tmp_path / "out"))
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "out") == qc(ref) and qc(ref)["allocation"]["target_fraction"] == 0.5
    # per-layer K: the planner's two menu points, and v_proj up to two steps further (the family's extra_steps)
    ks = {name: m["num_centroids"] for name, m in qc(ref)["modules"].items()}
    others = {k for name, k in ks.items() if not name.endswith("v_proj")}
    assert len(others) == 2 and all(k > min(others) for name, k in ks.items() if name.endswith("v_proj"))
    assert r["fraction_of_fp16"] <= 0.5


def test_output_loads_with_fasq_load(tmp_path, llama_ckpt):
    cfg = CFG.replace(equalize="none")  # purely tensor by tensor: no scratch pass
    r = quantize_checkpoint(llama_ckpt, tmp_path / "out", cfg, progress=False)  # one file under 5GB
    assert r["blocks_equalized"] == 0 and r["files"] == ["model.safetensors"]
    ref = fasq.load(in_memory(llama_ckpt, torch.bfloat16, cfg, tmp_path / "ref"))
    got = fasq.load(tmp_path / "out")
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


@pytest.mark.skipif(not hasattr(fasq.io, "INDEX_NAME"), reason="fasq.io.load does not read sharded output yet")
def test_sharded_output_loads_with_fasq_load(tmp_path, llama_ckpt):
    quantize_checkpoint(llama_ckpt, tmp_path / "out", CFG, max_shard_size="30KB", progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ref = fasq.load(in_memory(llama_ckpt, torch.bfloat16, CFG, tmp_path / "ref"))
    got = fasq.load(tmp_path / "out")
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_memory_budget_bounds_units_in_flight(tmp_path, llama_ckpt, monkeypatch):
    """With each unit's estimate set to its source size, the estimates in flight never exceed the budget
    (below the model's size), yet units do run in parallel."""
    monkeypatch.setattr(stream_run.Unit, "memory_estimate", lambda self, dev: self.source_bytes)
    budget = sum(f.stat().st_size for f in llama_ckpt.glob("*.safetensors")) // 3
    import threading
    lock, state = threading.Lock(), {"now": 0, "max": 0, "max_units": 0, "units": 0}
    orig = stream_run.Workspace.run_unit

    def tracked(self, u, dev):
        with lock:
            state["now"] += u.source_bytes
            state["units"] += 1
            state["max"] = max(state["max"], state["now"])
            state["max_units"] = max(state["max_units"], state["units"])
        try:
            return orig(self, u, dev)
        finally:
            with lock:
                state["now"] -= u.source_bytes
                state["units"] -= 1

    monkeypatch.setattr(stream_run.Workspace, "run_unit", tracked)
    quantize_checkpoint(llama_ckpt, tmp_path / "out", CFG.replace(equalize="none"), workers=2, max_memory=budget,
                        progress=False)
    assert state["max"] <= budget and state["max_units"] == 2


# ----------------------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fasq import FASQConfig
    from fasq.stream import quantize_checkpoint, run
    n_ok = int(sys.argv[3])
    orig = run.Workspace.commit
    def commit(self, rec):
        if len(self.done) == n_ok:      # the unit's data is on disk, its journal line is not
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, rec)
    run.Workspace.commit = commit
    quantize_checkpoint(sys.argv[1], sys.argv[2], FASQConfig(codebook_size=16), workers=2, progress=False)
""")


def test_killed_run_resumes_to_the_same_result(tmp_path, llama_ckpt):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(llama_ckpt), str(out), "7"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not out.exists() and partial_dir(out).is_dir()
    status = verify(partial_dir(out))
    assert not status["complete"] and status["units_done"] == 7
    r = quantize_checkpoint(llama_ckpt, out, CFG, workers=2, progress=False)
    assert r["units_resumed"] == 7 and r["units_run"] == r["units"] - 7
    whole = quantize_checkpoint(llama_ckpt, tmp_path / "whole", CFG, workers=2, progress=False)
    assert whole["units_resumed"] == 0
    assert_same_tensors(stored_tensors(tmp_path / "whole"), stored_tensors(out))
    assert verify(out)["complete"]


def interrupt_after(monkeypatch, n: int) -> None:
    orig = stream_run.Workspace.commit

    def commit(self, rec):
        orig(self, rec)
        if len(self.done) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream_run.Workspace, "commit", commit)


def test_feedback_run_resumes_to_the_same_result(tmp_path, llama_ckpt, monkeypatch):
    """A resumed run with error feedback, its equalize units done, samples and measures again (the same tokens)."""
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 16)
    cfg = CFG.replace(equalize="sampled", error_feedback=True, sample_sequences=2)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, 6)    # 2 equalize units, then 4 others
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(llama_ckpt, out, cfg, workers=1, max_memory="1GB", progress=False)
    r = quantize_checkpoint(llama_ckpt, out, cfg, workers=2, max_memory="1GB", progress=False)
    assert r["units_resumed"] == 6 and r["config"]["error_feedback"]
    ref = in_memory(llama_ckpt, torch.bfloat16, cfg, tmp_path / "ref")
    assert_same_tensors(stored_tensors(ref), stored_tensors(out))


def test_resume_redoes_a_damaged_unit_and_checks_settings(tmp_path, llama_ckpt, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(llama_ckpt, out, CFG, workers=1, progress=False)
    work = partial_dir(out)
    rec = next(r for r in map(json.loads, (work / "journal.jsonl").read_text().splitlines())
               if not r["unit"].startswith("equalize:"))
    e = read_header(work / "output" / rec["file"])[0][sorted(rec["outputs"])[0]]
    with open(work / "output" / rec["file"], "r+b") as f:  # flip bytes inside the first unit's data
        f.seek(e.begin)
        f.write(bytes(b ^ 0xFF for b in f.read(4)))
    with pytest.raises(ValueError, match="codebook_size: 16 -> 32"):
        quantize_checkpoint(llama_ckpt, out, CFG.replace(codebook_size=32), progress=False)
    r = quantize_checkpoint(llama_ckpt, out, CFG, workers=2, progress=False)
    assert r["units_resumed"] == 4
    ref = quantize_checkpoint(llama_ckpt, tmp_path / "ref", CFG, progress=False)
    assert ref["units_resumed"] == 0
    assert_same_tensors(stored_tensors(tmp_path / "ref"), stored_tensors(out))


def test_restart_discards_a_partial_run(tmp_path, llama_ckpt, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(llama_ckpt, out, CFG, workers=1, progress=False)
    r = quantize_checkpoint(llama_ckpt, out, CFG.replace(codebook_size=8), restart=True, progress=False)
    assert r["units_resumed"] == 0 and verify(out)["complete"]


# ----------------------------------------------------------------------------------------------
def _index(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def _bad_missing_shard(src):
    (src / sorted(set(_index(src)["weight_map"].values()))[1]).unlink()
    return "shard is missing"


def _bad_truncated_shard(src):
    f = src / sorted(set(_index(src)["weight_map"].values()))[2]
    os.truncate(f, f.stat().st_size - 100)
    return "truncated"


def _bad_index_names_absent(src):
    idx = _index(src)
    first = next(iter(idx["weight_map"].values()))
    idx["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = first
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "absent from their shard"


def _bad_index_lacks_tensor(src):
    idx = _index(src)
    del idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "no tensor 'model.layers.1.mlp.up_proj.weight'"


def _rewrite_one_tensor(src, name, fn):
    f = src / _index(src)["weight_map"][name]
    tensors = load_file(f)
    tensors[name] = fn(tensors[name])
    save_file(tensors, f, metadata={"format": "pt"})


def _bad_float8(src):
    _rewrite_one_tensor(src, "model.layers.1.self_attn.q_proj.weight", lambda t: t.to(torch.float8_e4m3fn))
    return "is F8_E4M3"


def _bad_unknown_dtype(src):
    f = src / _index(src)["weight_map"]["model.norm.weight"]
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].replace(b'"BF16"', b'"C64X"', 1)
    f.write_bytes(raw[:8] + head + raw[8 + n:])
    return "cannot read"


def _bad_not_causal_lm(src):
    (src / "config.json").write_text(json.dumps({"model_type": "resnet", "num_channels": 3}))
    return "not a causal language model"


def _bad_no_config(src):
    (src / "config.json").unlink()
    return "no config.json"


def _bad_no_safetensors(src):
    for f in list(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"x")
    return "streaming reads safetensors only"


def _bad_shape(src):
    _rewrite_one_tensor(src, "model.layers.0.mlp.down_proj.weight", lambda t: t[:, :-2].contiguous())
    return "the model config implies"


@pytest.mark.parametrize("damage", [_bad_missing_shard, _bad_truncated_shard, _bad_index_names_absent,
                                    _bad_index_lacks_tensor, _bad_float8, _bad_unknown_dtype, _bad_not_causal_lm,
                                    _bad_no_config, _bad_no_safetensors, _bad_shape], ids=lambda f: f.__name__[5:])
def test_bad_input_is_refused_and_nothing_written(tmp_path, llama_ckpt, damage):
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)
    message = damage(src)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        quantize_checkpoint(src, out, CFG, progress=False)
    assert nothing_written(out)


def test_nonfinite_weight_leaves_nothing(tmp_path, llama_ckpt):
    src = tmp_path / "src"
    shutil.copytree(llama_ckpt, src)

    def poison(t):
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    _rewrite_one_tensor(src, "model.layers.1.mlp.gate_proj.weight", poison)
    with pytest.raises(ValueError, match="NaN"):
        quantize_checkpoint(src, tmp_path / "out", CFG, progress=False)
    assert nothing_written(tmp_path / "out")


def test_disk_full_mid_run_cleans_up(tmp_path, llama_ckpt, monkeypatch):
    orig, calls = FileWriter.write, []

    def write(self, name, t):
        calls.append(name)
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, name, t)

    monkeypatch.setattr(FileWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="disk full"):
        quantize_checkpoint(llama_ckpt, out, CFG, progress=False)
    assert nothing_written(out)


def test_too_little_space_is_refused_before_writing(tmp_path, llama_ckpt, monkeypatch):
    monkeypatch.setattr(stream_run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="not enough disk space"):
        quantize_checkpoint(llama_ckpt, out, CFG, progress=False)
    assert nothing_written(out)


def test_existing_output_is_refused(tmp_path, llama_ckpt):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        quantize_checkpoint(llama_ckpt, tmp_path / "out", CFG, progress=False)


# ----------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    """The wiring fasq.cli gets: `verify`, and the streaming options on `quantize`."""
    from fasq.cli import add_quant_args
    from fasq.stream import cmd_quantize_stream

    ap = argparse.ArgumentParser(prog="fasq")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quantize")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    add_quant_args(p)
    add_stream_args(p)
    p.set_defaults(fn=cmd_quantize_stream)
    add_cli(sub)
    args = ap.parse_args(argv)
    return args.fn(args)


def test_cli_quantize_and_verify(tmp_path, llama_ckpt, capsys):
    out = tmp_path / "out"
    assert cli(["quantize", str(llama_ckpt), "-o", str(out), "-k", "16", "-q", "--max-memory", "1GiB",
                "--max-shard-size", "30KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # corrupt the last tensor of the shard
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(out)]) == 1
    assert "fail their checksum" in capsys.readouterr().err
    with pytest.raises(FormatError, match="fail their checksum"):
        verify(out)


def test_verify_reads_io_save_output(tmp_path, llama_ckpt):
    ref = in_memory(llama_ckpt, torch.bfloat16, CFG, tmp_path / "ref")
    r = verify(ref)
    assert r["complete"] and r["tensors_with_checksums"] == 0 and r["quantized_modules"] == 14


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("5GB") == 5 * 10**9 and parse_size(1234) == 1234
    assert parse_size("1.5 M") == 1_500_000
    for bad in ("lots", "-1GB", "3XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_quantizes_and_the_result_runs_on_the_gpu(tmp_path, llama_ckpt):
    """--device cuda: k-means on the GPU gives a model as faithful as the CPU run's (not bit-equal:
    another order of floating-point sums), and the result runs on the GPU through the registry's
    kernels with the same logits as the CPU reference forward."""
    from transformers import AutoModelForCausalLM

    cfg = CFG.replace(equalize="none")
    r = quantize_checkpoint(llama_ckpt, tmp_path / "gpu", cfg, device="cuda", progress=False)
    cpu = quantize_checkpoint(llama_ckpt, tmp_path / "cpu", cfg, progress=False)
    assert r["bits_per_weight"] == pytest.approx(cpu["bits_per_weight"])
    orig = AutoModelForCausalLM.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = orig(ids).logits
        err = {name: (fasq.load(tmp_path / name)(ids).logits - want).norm() / want.norm() for name in ("gpu", "cpu")}
        assert err["gpu"] <= 1.5 * err["cpu"] + 1e-3, err
        model = fasq.load(tmp_path / "gpu").float()
        on_cpu = model(ids).logits
        on_gpu = model.to("cuda")(ids.cuda()).logits.cpu()
    assert (on_gpu - on_cpu).norm() / on_cpu.norm() < 1e-3
