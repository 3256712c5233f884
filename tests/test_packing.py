import torch
from hypothesis import given, settings, strategies as st

from deltacome_ao.packing import pack_rows, packed_nbytes, unpack_rows, band_offsets


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), rows=st.integers(0, 6), length=st.integers(1, 300), seed=st.integers(0, 9))
def test_pack_unpack_exact(bits, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, length), generator=g).to(torch.uint8)
    buf = pack_rows(codes, bits)
    assert buf.dtype == torch.uint8 and buf.ndim == 1
    assert buf.numel() == packed_nbytes(bits, rows, length)
    assert torch.equal(unpack_rows(buf, bits, rows, length), codes)


def test_three_bit_codes_take_three_bits():
    codes = torch.randint(0, 8, (4, 128), dtype=torch.uint8)
    assert pack_rows(codes, 3).numel() == 4 * 128 * 3 // 8


def test_fp16_rows_round_trip_bit_exact():
    x = torch.randn(3, 37).half()
    assert torch.equal(unpack_rows(pack_rows(x, 16), 16, 3, 37), x)


def test_code_too_wide_is_rejected():
    codes = torch.full((1, 8), 4, dtype=torch.uint8)
    try:
        pack_rows(codes, 2)
    except ValueError as e:
        assert "2 bits" in str(e)
    else:
        raise AssertionError("a 3-bit code was packed into 2 bits")


def test_band_offsets_tile_the_buffer():
    bits, counts, length = [8, 3, 2], [2, 5, 7], 100
    offsets = band_offsets(bits, counts, length)
    assert offsets[0][0] == 0
    for (a0, a1), (b0, _) in zip(offsets, offsets[1:]):
        assert a1 == b0
    assert offsets[-1][1] == sum(packed_nbytes(b, c, length) for b, c in zip(bits, counts))
