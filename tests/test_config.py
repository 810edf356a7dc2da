import json

import pytest

from fasq import FASQConfig, preset
from fasq.config import PRESETS


def test_defaults_valid_and_round_trip():
    c = FASQConfig(subvector_dim=4, codebook_size=1000, skip_modules=("lm_head",))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["quant_method"] == "fasq" and d["version"] == 1
    assert FASQConfig.from_dict(d) == c


@pytest.mark.parametrize("field,value,fragment", [
    ("subvector_dim", 0, "subvector_dim=0"),
    ("subvector_dim", 2.5, "subvector_dim=2.5"),
    ("codebook_size", 1, "codebook_size=1"),
    ("codebook_size", 65537, "from 2 to 65536"),
    ("num_codebooks", 0, "num_codebooks=0"),
    ("group_size", 3, "multiple of subvector_dim"),
    ("group_size", -8, "group_size=-8"),
    ("scale_mode", "max", "scale_mode='max'"),
    ("rotation", "fft", "rotation='fft'"),
    ("rotation_block", 48, "power of two"),
    ("kmeans_init", "x", "kmeans_init"),
    ("kmeans_backend", "sklearn", "kmeans_backend"),
    ("refine_iters", -1, "refine_iters"),
    ("seed", -3, "seed=-3"),
    ("version", 99, "version=99"),
    ("skip_modules", ("",), "skip_modules"),
])
def test_invalid_values_name_field_value_and_allowed(field, value, fragment):
    with pytest.raises(ValueError) as e:
        FASQConfig(**{field: value})
    msg = str(e.value)
    assert fragment in msg and field in msg and "allowed" in msg or "must be an integer" in msg


def test_from_dict_rejects_unknown_and_foreign():
    with pytest.raises(ValueError, match="unknown fields"):
        FASQConfig.from_dict({"subvector_dim": 2, "bits": 4})
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        FASQConfig.from_dict({"quant_method": "gptq"})


def test_frozen():
    c = FASQConfig()
    with pytest.raises(Exception):
        c.subvector_dim = 3  # type: ignore[misc]


def test_presets_are_valid():
    for name in PRESETS:
        assert isinstance(preset(name), FASQConfig)
    with pytest.raises(ValueError, match="preset='9bit'"):
        preset("9bit")


def test_code_bits():
    assert [FASQConfig(codebook_size=k).code_bits for k in (2, 16, 17, 256, 1000, 4096, 65536)] == \
        [1, 4, 5, 8, 10, 12, 16]
