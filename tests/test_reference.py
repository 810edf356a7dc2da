import pytest
import torch

from fasq.format import LayerSpec, pack_codes
from fasq.nn import PQLinear
from fasq.reference import dequantize, hadamard_matrix, rotate, unrotate


def random_layer(spec: LayerSpec, seed=0) -> PQLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, spec.num_centroids, (spec.num_codebooks, spec.out_features, spec.n_sub), generator=g)
    t = {
        "codes": pack_codes(codes, spec.bits),
        "codebooks": torch.randn(spec.num_codebooks, spec.num_centroids, spec.subvector_dim, generator=g).half(),
        "scales": (torch.rand(spec.out_features, spec.n_groups, generator=g) + 0.5).half(),
        "rot_signs": (torch.randint(0, 2, (spec.in_features if spec.rotation_block else 0,), generator=g) * 2 - 1
                      ).to(torch.int8),
    }
    if spec.has_bias:
        t["bias"] = torch.randn(spec.out_features, generator=g).half()
    return PQLinear.from_tensors(spec, **t), codes


def loop_oracle(spec, codes, layer):
    """Element-by-element dequantization straight from the format description."""
    cb = layer.codebooks.float()
    sc = layer.scales.float()
    w = torch.zeros(spec.out_features, spec.padded_in)
    for o in range(spec.out_features):
        for j in range(spec.n_sub):
            for c in range(spec.subvector_dim):
                col = j * spec.subvector_dim + c
                v = sum(float(cb[m, codes[m, o, j], c]) for m in range(spec.num_codebooks))
                if spec.has_scales:
                    v *= float(sc[o, col // spec.effective_group])
                w[o, col] = v
    w = w[:, : spec.in_features]
    if spec.rotation_block:
        h = hadamard_matrix(spec.rotation_block)
        r = torch.block_diag(*[h] * (spec.in_features // spec.rotation_block)) @ torch.diag(layer.rot_signs.float())
        w = w @ r
    return w


SPECS = [
    LayerSpec(10, 7, 3, 16, 1, 6, True, 0, False),
    LayerSpec(16, 5, 2, 1000, 2, 4, True, 8, True),
    LayerSpec(24, 4, 4, 2, 1, 0, True, 8, False),
    LayerSpec(12, 3, 1, 65536, 1, 0, False, 4, False),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantize_matches_loop_oracle(spec):
    layer, codes = random_layer(spec)
    got = dequantize(spec, layer.codes, layer.codebooks, layer.scales, layer.rot_signs)
    torch.testing.assert_close(got, loop_oracle(spec, codes, layer), rtol=1e-5, atol=1e-5)


def test_rotation_is_orthogonal_and_inverted():
    x = torch.randn(3, 48)
    signs = (torch.randint(0, 2, (48,)) * 2 - 1).to(torch.int8)
    y = rotate(x, signs, 16)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(unrotate(y, signs, 16), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS[:2], ids=str)
def test_linear_matches_dense_in_each_dtype(spec, dtype):
    layer, _ = random_layer(spec, seed=3)
    x = torch.randn(2, 3, spec.in_features)
    w = layer.dequantize()
    ref = x @ w.T + (layer.bias.float() if spec.has_bias else 0)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, spec.out_features)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))


def test_module_to_and_state_dict_round_trip():
    spec = SPECS[1]
    layer, _ = random_layer(spec, seed=5)
    layer.to(torch.bfloat16)  # casting the model must not touch the stored format
    assert layer.codebooks.dtype == torch.float16 and layer.codes.dtype == torch.int32
    fresh = PQLinear(spec)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, spec.in_features)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"codes", "codebooks", "scales", "rot_signs", "bias"}
