"""AutoModelForCausalLM.from_pretrained on directories written by fasq.save (src/fasq/integrations)."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fasq
from fasq import FASQConfig
from fasq.integrations import install_transformers_hook, register_transformers
from fasq.io import FormatError
from fasq.nn import PQLinear

from conftest import make_tokenizer, tiny_model

TABLES = "transformers.quantizers.auto"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_transformers()


@pytest.fixture(scope="module", params=["llama", "qwen3"])  # qwen3: tied embeddings, outlier side tables
def saved(request, tmp_path_factory):
    cfg = FASQConfig(codebook_size=16, outlier_fraction=0.002 if request.param == "qwen3" else 0.0)
    model = fasq.quantize(tiny_model(request.param), cfg, progress=False)
    out = tmp_path_factory.mktemp(request.param) / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def test_from_pretrained_equals_fasq_load(saved, ids):
    ref = fasq.load(saved)
    hf = from_pretrained(saved, dtype=torch.float32)
    assert torch.equal(logits(hf, ids), logits(ref, ids))
    pq = {n for n, m in hf.named_modules() if isinstance(m, PQLinear)}
    assert pq == set(ref.config.quantization_config["modules"])
    for name in pq:
        a, b = hf.get_submodule(name), ref.get_submodule(name)
        assert a.spec == b.spec and a.codes.dtype == torch.int32 and a.codebooks.dtype == torch.float16
    assert hf.config.quantization_config.to_dict() == ref.config.quantization_config
    assert hf.fasq_config == ref.fasq_config
    if hf.config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    # Default dtype "auto" takes config.json's dtype: float32 for these models.
    assert torch.equal(logits(from_pretrained(saved), ids), logits(ref, ids))


def test_linears_with_bias(tmp_path, ids):
    model = fasq.quantize(tiny_model("qwen2"), FASQConfig(codebook_size=16), progress=False)  # q/k/v biases
    fasq.save(model, tmp_path / "q")
    hf = from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(logits(hf, ids), logits(fasq.load(tmp_path / "q"), ids))


def test_half_precision_keeps_the_stored_format(saved, ids):
    hf = from_pretrained(saved, dtype=torch.float16)
    q = hf.model.layers[0].mlp.up_proj
    assert hf.model.embed_tokens.weight.dtype == torch.float16
    assert (q.codes.dtype, q.codebooks.dtype, q.rot_signs.dtype) == (torch.int32, torch.float16, torch.int8)
    ref = logits(fasq.load(saved), ids)
    assert (logits(hf, ids).float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_base_model_without_head(saved, ids):
    from transformers import AutoModel

    # fp16: transformers 5.17 keeps a renamed pre-quantized tensor in its stored dtype whatever dtype= says
    base = AutoModel.from_pretrained(str(saved), dtype=torch.float16)
    ref = fasq.load(saved, dtype=torch.float16).model
    assert isinstance(base.layers[0].self_attn.q_proj, PQLinear)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_save_pretrained_writes_what_fasq_load_reads(saved, ids, tmp_path):
    from safetensors import safe_open

    hf = from_pretrained(saved)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "fasq.json").is_file()
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f, \
         safe_open(str(saved / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())          # tied lm_head stored once, as fasq.save does
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k   # same dtypes and values
    ref = logits(fasq.load(saved), ids)
    assert torch.equal(logits(fasq.load(tmp_path / "hf"), ids), ref)
    assert torch.equal(logits(from_pretrained(tmp_path / "hf"), ids), ref)


def test_fasq_save_of_a_from_pretrained_model(saved, ids, tmp_path):
    hf = from_pretrained(saved, dtype=torch.float32)
    fasq.save(hf, tmp_path / "again")
    assert torch.equal(logits(fasq.load(tmp_path / "again"), ids), logits(hf, ids))
    with pytest.raises(ValueError, match="is the input model"):   # never over the directory it came from
        fasq.save(hf, saved, overwrite=True)


def test_dequantize_gives_plain_linears(saved, ids):
    hf = from_pretrained(saved)
    ref = logits(hf, ids)
    plain = hf.dequantize()
    assert not any(isinstance(m, PQLinear) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    assert torch.allclose(logits(plain, ids), ref, atol=1e-4, rtol=1e-4)


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_format_version(saved, tmp_path):
    d = shutil.copytree(saved, tmp_path / "v")
    edit_config(d, lambda qc: qc.__setitem__("format_version", 999))
    with pytest.raises(FormatError, match=r"format_version=999.*reads format versions \[1, 2\]"):
        from_pretrained(d)


def test_config_that_does_not_fit_the_model(saved, tmp_path):
    d = shutil.copytree(saved, tmp_path / "s")
    edit_config(d, lambda qc: qc["modules"].__setitem__("model.layers.0.mlp.nope", qc["modules"].popitem()[1]))
    with pytest.raises(FormatError, match="model.layers.0.mlp.nope"):
        from_pretrained(d)


def test_no_quantization_inside_from_pretrained():
    from fasq.integrations.transformers import FasqHfConfig, FasqHfQuantizer

    qc = FasqHfConfig(format_version=1, modules={"x": {"in_features": 4, "out_features": 4, "subvector_dim": 2,
                                                       "num_centroids": 4}})
    with pytest.raises(ValueError, match="fasq.quantize"):
        FasqHfQuantizer(qc, pre_quantized=False)


def test_hook_registers_when_transformers_loads_its_tables(monkeypatch):
    from fasq.integrations.transformers import FasqHfQuantizer

    old = sys.modules[TABLES]
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, TABLES)
    monkeypatch.setattr(sys.modules["transformers.quantizers"], "auto", old)  # restored afterwards
    install_transformers_hook()
    fresh = importlib.import_module(TABLES)               # runs auto.py again: fresh, fasq-less tables
    assert fresh is not old
    assert fresh.AUTO_QUANTIZER_MAPPING["fasq"] is FasqHfQuantizer
    assert type(fresh.__spec__.loader).__name__ != "RegisterAfterExec"   # our wrapper does not linger


def test_hook_registers_at_once_when_tables_already_loaded(monkeypatch):
    auto = sys.modules[TABLES]
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "fasq")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "fasq")
    install_transformers_hook()
    assert "fasq" in auto.AUTO_QUANTIZER_MAPPING and "fasq" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    register_transformers()                                # idempotent


def test_hook_does_not_import_transformers():
    code = ("import sys, fasq.integrations as i; i.install_transformers_hook(); i.install_transformers_hook();"
            "assert not [m for m in sys.modules if m.startswith('transformers')];"
            "assert sum(type(f).__name__ == 'RegisterOnImport' for f in sys.meta_path) == 1")
    env = {**os.environ, "PYTHONPATH": str(SRC)}   # this checkout's fasq, not whichever is installed
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_whole_model_pickles(saved, ids, tmp_path, how):
    """pickle / torch.save of the whole model (issue 23.5), and the copy still saves fasq's manifest."""
    import io
    import pickle

    hf = from_pretrained(saved, dtype=torch.float32)
    ref = logits(hf, ids)
    if how == "pickle":
        copy = pickle.loads(pickle.dumps(hf))
    else:
        buf = io.BytesIO()
        torch.save(hf, buf)
        buf.seek(0)
        copy = torch.load(buf, weights_only=False)
    assert torch.equal(logits(copy, ids), ref)
    copy.save_pretrained(tmp_path / "c")
    assert torch.equal(logits(fasq.load(tmp_path / "c"), ids), ref)   # fasq.load checks fasq.json


@pytest.mark.parametrize("offload_buffers", [True, False])
def test_disk_offload(saved, ids, tmp_path, caplog, offload_buffers):
    """device_map with a disk-offloaded layer (issue 23.6): its PQ buffers are offloaded whatever
    offload_buffers says (meta until a forward loads them, and meta again after it, kernel caches
    included), and the logits equal fasq.load's."""
    from fasq.integrations.transformers import _FIRST_GOOD_BUFFER_OFFLOAD, _transformers_version

    layers = {f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(2)}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **layers}
    kw = dict(dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path),
              offload_buffers=offload_buffers)
    old = _transformers_version() < _FIRST_GOOD_BUFFER_OFFLOAD   # it loads offloaded buffers wrongly
    if old and offload_buffers:
        with pytest.raises(RuntimeError, match="upgrade to transformers >= 5.13"):
            from_pretrained(saved, **kw)
        return
    with caplog.at_level("WARNING", logger="fasq.integrations.transformers"):
        hf = from_pretrained(saved, **kw)
    offloaded = hf.model.layers[1].mlp.up_proj
    assert isinstance(offloaded, PQLinear) and hf.model.layers[0].mlp.up_proj.codes.device.type == "cpu"
    assert {b.device.type for b in offloaded.buffers()} == ({"cpu"} if old else {"meta"})
    assert ("stay in memory" in caplog.text) == old
    assert torch.equal(logits(hf, ids), logits(fasq.load(saved), ids))
    if not old:
        assert {b.device.type for b in offloaded.buffers()} == {"meta"}
        assert not [k for k in offloaded.__dict__ if k.startswith("_fasq_")]


def test_generate_and_pipeline(saved, ids):
    from transformers import AutoTokenizer, pipeline

    hf = from_pretrained(saved, dtype=torch.float32)
    ref = fasq.load(saved)
    out = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 18) and torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))
    pipe = pipeline("text-generation", model=hf, tokenizer=AutoTokenizer.from_pretrained(str(saved)))
    text = pipe("It is a truth", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("It is a truth") and len(text) > len("It is a truth")
