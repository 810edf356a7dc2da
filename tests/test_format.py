import math

import pytest
import torch

from fasq.format import LayerSpec, code_bits, pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("k", [2, 3, 16, 256, 1000, 4096, 65536])
@pytest.mark.parametrize("n", [1, 7, 32, 100])
def test_pack_round_trip_exact(k, n):
    g = torch.Generator().manual_seed(k * 131 + n)
    bits = code_bits(k)
    codes = torch.randint(0, k, (2, 5, n), generator=g)
    codes[0, 0, 0] = k - 1  # the largest code is representable
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (2, 5, math.ceil(n * bits / 32))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packing_uses_exactly_b_bits():
    # K=16 -> 4 bits: 8 codes per word, not one byte per code; K=4096 -> 12 bits: 8 codes in 3 words.
    assert packed_words(8, code_bits(16)) == 1
    assert packed_words(8, code_bits(4096)) == 3
    assert packed_words(3, code_bits(1000)) == 1   # 30 bits
    assert packed_words(4, code_bits(1000)) == 2   # 40 bits


def test_bit_layout_lsb_first_and_straddling():
    codes = torch.tensor([[1, 2, 3, 1023]])  # 10-bit codes: 4th code straddles words 0 and 1
    p = pack_codes(codes, 10).to(torch.int64) & 0xFFFFFFFF
    stream = int(p[0, 0]) | (int(p[0, 1]) << 32)
    assert [(stream >> (10 * j)) & 1023 for j in range(4)] == [1, 2, 3, 1023]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)


def test_storage_accounting_by_hand():
    # 40 x 72 weight, d=4, K=1000 (10 bits), 2 codebooks, groups of 32, rotation, bias.
    s = LayerSpec(in_features=72, out_features=40, subvector_dim=4, num_centroids=1000, num_codebooks=2,
                  group_size=32, has_scales=True, rotation_block=8, has_bias=True)
    n_sub = 18                       # 72 / 4
    words = math.ceil(18 * 10 / 32)  # 6 words per row
    codes = 2 * 40 * words * 4
    books = 2 * 1000 * 4 * 2
    scales = 40 * 3 * 2              # ceil(72 / 32) = 3 groups, fp16
    signs = 72 * 1
    bias = 40 * 2
    assert s.n_sub == n_sub and s.words_per_row == words
    assert s.storage_bytes() == codes + books + scales + signs + bias
    assert s.weight_storage_bytes() == codes + books + scales + signs
    assert s.bits_per_weight() == pytest.approx(8 * (codes + books + scales + signs) / (40 * 72))


def test_storage_accounting_padding_and_no_scales():
    # in=10 with d=3 -> 4 sub-vectors (2 padding columns); K=16 -> 4 bits, 16 bits per row -> 1 word.
    s = LayerSpec(in_features=10, out_features=3, subvector_dim=3, num_centroids=16, has_scales=False)
    assert s.padded_in == 12 and s.words_per_row == 1 and s.n_groups == 0
    assert s.storage_bytes() == 3 * 1 * 4 + 16 * 3 * 2
