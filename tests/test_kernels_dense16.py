"""16-bit unquantized matrices (fasq.kernels.dense16) and fasq.load(..., dense_16bit=True).

The C++ op ``fasq::cpu_dense16_linear`` is checked against an fp64 product of the same 16-bit
values on fresh random inputs, with its output NaN-poisoned first, over every ISA path this machine
can run, awkward shapes (row counts not a multiple of 4, widths not a multiple of 16) and token
counts 1..9.
"""
from __future__ import annotations

import pytest
import torch

import fasq
from fasq import FASQConfig
from fasq.kernels import cpu
from fasq.kernels.dense16 import Embedding16, Linear16, dense16_linear

from conftest import tiny_model

ISAS = ("avx512", "avx2", "scalar")


from cpu_kernel_support import kernel_built, poison  # noqa: E402,F401  (autouse fixtures)
from cpu_kernel_support import isas_here as _isas_here  # noqa: E402


def isas_here() -> list[str]:
    return _isas_here(ISAS)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert bool(torch.isfinite(y).all()), "non-finite output (an element was never written?)"
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("out,inp", [(1, 1), (3, 15), (4, 16), (5, 17), (67, 33), (130, 576), (9, 1000)])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_op_against_fp64(out, inp, wdtype):
    g = torch.Generator().manual_seed(out * 1000 + inp)
    w = (torch.randn(out, inp, generator=g) * 0.1).to(wdtype)
    bias = torch.randn(out, generator=g).to(wdtype)
    for isa in isas_here():
        for t in (1, 2, 3, 4, 5, 9):
            x = torch.randn(t, inp, generator=g)
            for b in (None, bias):
                ref = x.double() @ w.double().t() + (0 if b is None else b.double())
                y = dense16_linear(x, w, b, method="kernel", isa=isa)
                assert y.dtype == x.dtype and y.shape == ref.shape
                assert rel_err(y, ref) < 1e-5, (isa, t, b is None)


@pytest.mark.parametrize("xdtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_input_dtypes_and_batch_shape(xdtype, tol):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(70, 48, generator=g) * 0.1).half()
    x = torch.randn(2, 3, 48, generator=g).to(xdtype)            # [B, S, in]: 6 tokens
    ref = x.double() @ w.double().t()
    for method in ("kernel", "chunked"):
        y = dense16_linear(x, w, method=method)
        assert y.dtype == xdtype and y.shape == (2, 3, 70)
        assert rel_err(y, ref) < tol, method


def test_many_tokens_use_chunked_rows(monkeypatch):
    import fasq.kernels.dense16 as d16
    monkeypatch.setattr(d16, "CHUNK_ROWS", 32)                   # several chunks on a small matrix
    g = torch.Generator().manual_seed(2)
    w, b = (torch.randn(100, 40, generator=g) * 0.1).half(), torch.randn(100, generator=g).half()
    x = torch.randn(d16.FEW_MAX_TOKENS + 3, 40, generator=g)
    ref = x.double() @ w.double().t() + b.double()
    assert rel_err(dense16_linear(x, w, b), ref) < 1e-5
    with pytest.raises(ValueError, match="method"):
        dense16_linear(x, w, method="nope")


def test_op_has_a_fake_implementation():
    w, x = torch.randn(20, 32).half(), torch.randn(2, 32)
    torch.library.opcheck(torch.ops.fasq.cpu_dense16_linear.default, (x, w, None, cpu.ISAS[cpu.default_isa()], False),
                          test_utils=("test_schema", "test_faketensor"))


def test_modules_keep_16bit_storage():
    emb, head = Embedding16(50, 24), Linear16(24, 50)
    emb.weight.copy_(torch.randn(50, 24).half())
    head.weight = emb.weight                                     # tied, as transformers ties them
    ids = torch.tensor([[1, 7, 49]])
    h = emb(ids)
    assert h.dtype == torch.float32 and torch.equal(h, emb.weight[ids].float())
    emb.to(torch.float32), head.to(torch.float32)                # a model-wide cast keeps the storage
    assert emb.weight.dtype == head.weight.dtype == torch.float16 and head.weight is emb.weight
    ref = h.double() @ emb.weight.double().t()
    assert rel_err(head(h), ref) < 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import make_tokenizer

    model = fasq.quantize(tiny_model("qwen3"), FASQConfig(codebook_size=64, subvector_dim=2), progress=False)
    out = tmp_path_factory.mktemp("d16") / "q"
    fasq.save(model, out, tokenizer=make_tokenizer())
    return out


def test_load_dense_16bit_matches_fp32_load(saved, tmp_path):
    ref, m16 = fasq.load(saved), fasq.load(saved, dense_16bit=True)
    emb, head = m16.get_input_embeddings(), m16.get_output_embeddings()
    assert isinstance(emb, Embedding16) and isinstance(head, Linear16)
    assert emb.weight.dtype == torch.float16 and head.weight is emb.weight     # tied, stored once
    assert m16.dtype == torch.float32                                          # norms etc. stay fp32
    assert set(m16.state_dict()) == set(ref.state_dict())
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        for x in (ids, ids[:, :1]):                            # many tokens (chunked) and one (kernel)
            a, b = ref(x).logits, m16(x).logits
            assert b.dtype == torch.float32
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    # Saving it writes the same tensors (the embedding was never widened).
    fasq.save(m16, tmp_path / "again")
    from safetensors import safe_open
    with safe_open(str(saved / "model.safetensors"), "pt") as f, \
         safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def test_load_dense_16bit_untied_head(tmp_path):
    model = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False)
    assert not model.config.tie_word_embeddings
    fasq.save(model, tmp_path / "q")
    ref, m16 = fasq.load(tmp_path / "q"), fasq.load(tmp_path / "q", dense_16bit=True)
    head = m16.get_output_embeddings()
    assert isinstance(head, Linear16) and head.weight is not m16.get_input_embeddings().weight
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        a, b = ref(ids).logits, m16(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    # Other dtypes ignore the option: a bf16 load is already 16-bit.
    assert type(fasq.load(tmp_path / "q", dtype=torch.bfloat16, dense_16bit=True).lm_head) is torch.nn.Linear
