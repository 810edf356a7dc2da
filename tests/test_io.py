import json

import pytest
import torch

import fasq
from fasq import FASQConfig
from fasq.io import FormatError

from conftest import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import make_tokenizer

    model = fasq.quantize(tiny_model("qwen3"), FASQConfig(codebook_size=64, subvector_dim=2, outlier_fraction=0.005),
                          progress=False)  # outliers: their side table is saved and loaded too
    out = tmp_path_factory.mktemp("io") / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    return model, out


def test_save_load_identical_logits(saved):
    model, out = saved
    loaded, tok = fasq.load(out, with_tokenizer=True)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok("a truth")["input_ids"]
    assert loaded.config.quantization_config["quant_method"] == "fasq"


def test_tied_embeddings_stored_once(saved):
    from safetensors import safe_open

    _, out = saved
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_refuses_to_overwrite(saved, tmp_path):
    model, out = saved
    with pytest.raises(FileExistsError, match="overwrite"):
        fasq.save(model, out)
    fasq.save(model, out, overwrite=True)
    fasq.load(out)


def test_save_of_unquantized_model_refused(tmp_path):
    with pytest.raises(ValueError, match="not fasq-quantized"):
        fasq.save(tiny_model("llama"), tmp_path / "x")


def copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_file(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        fasq.load(d)
    with pytest.raises(FormatError, match="cannot be read|missing|shape"):
        fasq.load(d, verify=False)


def test_corrupted_file(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        fasq.load(d)


def edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_wrong_format_version(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "v")
    edit_config(d, lambda c: c["quantization_config"].__setitem__("format_version", 999))
    with pytest.raises(FormatError, match="format_version=999"):
        fasq.load(d)


def test_shapes_disagree_with_config(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "s")
    name = "model.layers.0.self_attn.q_proj"
    edit_config(d, lambda c: c["quantization_config"]["modules"][name].__setitem__("num_centroids", 256))
    with pytest.raises(FormatError, match="config.json"):  # config.json is covered by the manifest
        fasq.load(d)
    with pytest.raises(FormatError, match=name):           # and without the checksums, by the shape check
        fasq.load(d, verify=False)


def test_missing_manifest_and_not_fasq(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "m")
    (d / "fasq.json").unlink()
    with pytest.raises(FormatError, match="manifest"):
        fasq.load(d)
    edit_config(d, lambda c: c.pop("quantization_config"))
    with pytest.raises(FormatError, match="not a fasq-quantized"):
        fasq.load(d)
    with pytest.raises(FormatError, match="no config.json"):
        fasq.load(tmp_path)


def test_no_partial_output_on_failure(tmp_path, monkeypatch):
    model = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False)
    import fasq.manifest as manifest

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(manifest, "sha256_file", boom)
    with pytest.raises(OSError):
        fasq.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
