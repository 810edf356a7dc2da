"""torch.compile(model, fullgraph=True) of a fasq model on the CPU (issue 23.4), warm and cold."""
import pytest
import torch

import fasq
from fasq import FASQConfig

from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    cfg = FASQConfig(codebook_size=16, outlier_fraction=0.002)   # outliers: the registry's cached side tables
    return fasq.quantize(tiny_model("qwen3"), cfg, progress=False)


def test_fullgraph_compile_matches_eager(model):
    """One eager call first: the CPU kernels build and prepare their per-layer tables there (a compiled
    graph cannot run that preparation; docs/transformers.md)."""
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        want = {n: model(ids[:, :n]).logits for n in (12, 1, 3)}
        compiled = torch.compile(model, fullgraph=True)
        for n, ref in want.items():
            torch.testing.assert_close(compiled(ids[:, :n]).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1]).logits, want[1], rtol=0, atol=0)  # eager caches intact


def test_cold_fullgraph_compile_without_an_eager_call():
    """A fresh model compiled before any eager call: each layer is one opaque op (fasq::pq_layer) whose
    implementation prepares the kernels' tables eagerly."""
    fresh = fasq.quantize(tiny_model("llama", seed=3), FASQConfig(codebook_size=16, outlier_fraction=0.002),
                          progress=False)
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fresh, fullgraph=True)(ids).logits
        torch.testing.assert_close(got, fresh(ids).logits, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_get_handles_of_their_own(model):
    import copy
    import pickle

    from fasq.kernels import layer_op

    layer = model.model.layers[0].self_attn.q_proj
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.fasq_handle != layer.fasq_handle and layer_op._LAYERS[twin.fasq_handle] is twin
        x = torch.randn(2, layer.in_features)
        out = torch.ops.fasq.pq_layer(x, twin.fasq_handle)
        assert torch.equal(out, layer(x))
