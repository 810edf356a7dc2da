"""The v2 CUDA decode kernel's GPU layout (fasq.kernels.cuda_layout) and its lane-by-lane emulator
(fasq.kernels.cuda_emulate), checked bit for bit against fasq.reference on the CPU.

Bit for bit needs the same rounding as the reference, so the product tests use dyadic values (small
multiples of 1/8, power-of-two scales): every product and every fp32 sum of them is exact, in any
order, so any wrong address, lane, step, scale or split changes the result.  W_r is compared exactly
with random fp16 codebooks and scales too (one fp32 product per weight, as the reference)."""
from __future__ import annotations

import pytest
import torch

from fasq import reference as R
from fasq.format import LayerSpec, pack_codes
from fasq.kernels import cuda_emulate as E
from fasq.kernels import cuda_layout as L

# (K, in, out, group): both code widths, awkward widths (in % 128 != 0, out % 16 != 0), per-group and
# per-row scales, no scales.
LAYERS = [(256, 1000, 40, 256), (64, 1024, 33, 256), (256, 136, 17, 0), (64, 200, 17, 128),
          (200, 264, 48, 0), (40, 512, 16, 512), (256, 384, 31, -1)]


def _dyadic(shape, gen, lo=-8, hi=8, den=8) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen).float() / den


def _layer(k, inp, out, group, gen, dyadic=False):
    spec = LayerSpec(in_features=inp, out_features=out, subvector_dim=2, num_centroids=k,
                     group_size=max(group, 0), has_scales=group >= 0)
    codes = pack_codes(torch.randint(0, k, (1, out, spec.n_sub), generator=gen), spec.bits)
    if dyadic:
        cb = _dyadic((1, k, 2), gen).half()
        sc = (2.0 ** torch.randint(-2, 2, (out, spec.n_groups), generator=gen).float()).half()
    else:
        cb = torch.randn(1, k, 2, generator=gen).half()
        sc = (torch.rand(out, spec.n_groups, generator=gen) + 0.5).half()
    return spec, codes, cb, sc


@pytest.mark.parametrize("k,inp,out,group", LAYERS)
def test_weight_bit_exact(k, inp, out, group):
    gen = torch.Generator().manual_seed(k * 7 + inp + out)
    spec, codes, cb, sc = _layer(k, inp, out, group, gen)
    lay = L.repack(spec, codes, sc)
    assert lay.version == L.LAYOUT_VERSION and lay.bits == L.layout_bits(k)
    assert lay.codes.shape == (-(-out // 16), -(-spec.n_sub // 64), L.CHUNK_WORDS[lay.bits])
    w = E.emulate_weight(lay, [cb[0]])[0]
    assert torch.equal(w, R.dequantize_rotated(spec, codes, cb, sc, torch.float32))


@pytest.mark.parametrize("k,inp,out,group", LAYERS[:4])
@pytest.mark.parametrize("tokens,rowt,slices", [(1, 2, 1), (3, 1, 2), (8, 2, 4), (9, 1, 1), (16, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_bit_exact(k, inp, out, group, tokens, rowt, slices, dtype):
    gen = torch.Generator().manual_seed(k + inp + tokens)
    spec, codes, cb, sc = _layer(k, inp, out, group, gen, dyadic=True)
    lay = L.repack(spec, codes, sc)
    slices = slices if lay.n_spans % slices == 0 else 1
    x = _dyadic((tokens, inp), gen, den=4).to(dtype)
    bias = _dyadic((out,), gen).half()
    y = E.emulate_linear(lay, [cb[0]], x, rowt, slices, bias)
    assert y.dtype == dtype
    assert torch.equal(y, R.pq_linear(x, spec, codes, cb, sc, None, bias))


def test_linear_random_values_close():
    """Random fp16 values: the kernel's order (unscaled fp32 sums, scaled per group) is not the
    reference's (W_r rounded to fp16 first), so only close."""
    gen = torch.Generator().manual_seed(3)
    spec, codes, cb, sc = _layer(256, 1024, 48, 256, gen)
    lay = L.repack(spec, codes, sc)
    x = torch.randn(5, 1024, generator=gen).half()
    y = E.emulate_linear(lay, [cb[0]], x, 2, 4).float()
    ref = R.pq_linear(x.float(), spec, codes, cb, sc, None)
    assert (y - ref).abs().max() <= 2e-3 * ref.abs().max()


@pytest.mark.parametrize("k", [256, 64])
def test_fused_projections(k):
    """q/k/v in one launch: three codebooks in two table regions, tiles one after another, each output
    at its row offset; the same bits as three separate layers."""
    gen = torch.Generator().manual_seed(k)
    layers = [_layer(k, 512, out, 256, gen, dyadic=True) for out in (64, 17, 40)]
    fused = L.fuse([L.repack(s, c, sc) for s, c, _, sc in layers])
    assert fused.outs == (64, 17, 40) and fused.tile_ends == (4, 6, 9)
    assert L.tile_projection(fused).tolist() == [0] * 4 + [1] * 2 + [2] * 3
    cbs = [cb[0] for _, _, cb, _ in layers]
    ws = E.emulate_weight(fused, cbs)
    x = _dyadic((6, 512), gen, den=4).half()
    y = E.emulate_linear(fused, cbs, x, 2, 2)
    for (spec, codes, cb, sc), w, off in zip(layers, ws, fused.row_offsets):
        assert torch.equal(w, R.dequantize_rotated(spec, codes, cb, sc, torch.float32))
        assert torch.equal(y[:, off: off + spec.out_features], R.pq_linear(x, spec, codes, cb, sc, None))


def test_fuse_rejects_mismatched_layers():
    gen = torch.Generator().manual_seed(0)
    a = L.repack(*[v for i, v in enumerate(_layer(256, 512, 16, 256, gen)) if i != 2])
    b = L.repack(*[v for i, v in enumerate(_layer(64, 512, 16, 256, gen)) if i != 2])
    with pytest.raises(ValueError, match="layer 1"):
        L.fuse([a, b])


def test_table_is_bank_conflict_free_and_prmt_forms_the_address():
    """Any 32 codes a warp looks up hit 32 different banks; the address is the permute's output."""
    gen = torch.Generator().manual_seed(1)
    for p in range(L.MAX_PROJECTIONS):
        codes = torch.randint(0, 256, (32,), generator=gen)
        lanes = torch.arange(32)
        lw = torch.tensor([L.lane_word(int(lane), p) for lane in lanes])
        word = codes << 16   # code in byte 2 of its word
        addr = L.prmt(word, lw, L.code_selector(2))
        assert torch.equal(addr, (p // 2) * L.REGION_BYTES + codes * 256 + (p % 2) * 128 + lanes * 4)
        assert len(set(((addr // 4) % 32).tolist())) == 32


def test_six_bit_codes_are_byte_aligned_in_three_words():
    """16 six-bit codes of a lane's row fill exactly 3 words, and each is one byte's low 6 bits after
    at most the two shifts-and-selects the kernel does for codes 12-15."""
    gen = torch.Generator().manual_seed(2)
    c = torch.randint(0, 64, (100, 16), generator=gen)
    words = L._pack_lane_codes(c, 6)
    assert words.shape == (100, 3) and int(words.max()) < 2**32
    src = L.lane_code_bytes(words, 6)
    got = torch.stack([(src[:, i // 4] >> (8 * (i % 4))) & 63 for i in range(16)], dim=1)
    assert torch.equal(got, c)


def test_schedule_covers_every_unit_once_and_stripes_over_blocks():
    n_tg, n_units = E.units(L.GpuLayout(1, 8, 40, 1024, 3, 8, 1024, torch.zeros(0), torch.zeros(1, 1)), 2, 4)
    assert (n_tg, n_units) == (2, 8)
    sched = E.schedule(1000, nblocks=132, nwarps=8)
    flat = sorted(u for w in sched for u in w)
    assert flat == list(range(1000))
    # consecutive units land on different blocks (worker w = warp * nblocks + block)
    assert [u % 132 for u in range(132)] == list(range(132))


def test_repack_rejects_what_the_layout_cannot_hold():
    gen = torch.Generator().manual_seed(0)
    spec, codes, _, sc = _layer(16, 512, 16, 256, gen)
    with pytest.raises(ValueError, match="num_centroids=16"):
        L.repack(spec, codes, sc)
    spec = LayerSpec(in_features=512, out_features=16, subvector_dim=2, num_centroids=256, group_size=64)
    assert "group_size=64" in L.supports(spec)
    assert "subvector_dim=4" in L.supports(LayerSpec(in_features=512, out_features=16, subvector_dim=4,
                                                     num_centroids=256))
