"""Triton building blocks shared by the kernels: unpacking and dequantising band codes in registers.

Imported only by the kernel modules (which need triton); see `layout.py` for the byte layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dequant_band"]


@triton.jit
def _shard(buf_ptr, shard_base, j, n, mask, W: tl.constexpr, P8: tl.constexpr):
    """Bits of code `n` of band row `j` held by a `W`-bit shard, as int32 (`0 <= value < 2^W`).

    A shard row is `P8·W` bytes; code `n` sits in byte `n % (P8·W)` at bit `(n // (P8·W))·W`.
    """
    row_bytes: tl.constexpr = P8 * W
    byte = tl.load(buf_ptr + shard_base + j * row_bytes + n % row_bytes, mask=mask, other=0).to(tl.int32)
    return (byte >> ((n // row_bytes) * W)) & ((1 << W) - 1)


@triton.jit
def dequant_band(
    buf_ptr, scale_ptr, zero_ptr, j, n, mask,
    BITS: tl.constexpr, COUNT: tl.constexpr, LENGTH: tl.constexpr, BAND_OFF: tl.constexpr,
    SCALE_ROW: tl.constexpr, GROUP: tl.constexpr, NGROUPS: tl.constexpr,
):
    """fp32 values of elements (`j`, `n`) of one band (row `j` of the band, column `n` < LENGTH).

    `j` and `n` broadcast against each other and against `mask`; masked elements are 0. Every load
    is masked, so `mask` must exclude `j >= COUNT` and `n >= LENGTH` (the interpreter does not
    catch out-of-bounds reads).
    """
    if BITS == 16:
        # Raw fp16 rows, unpadded. Read as two bytes: the band may start at an odd byte offset.
        addr = buf_ptr + BAND_OFF + (j * LENGTH + n) * 2
        lo = tl.load(addr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(addr + 1, mask=mask, other=0).to(tl.uint16)
        val = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        P8: tl.constexpr = (LENGTH + 7) // 8
        if BITS == 8:
            code = _shard(buf_ptr, BAND_OFF, j, n, mask, 8, P8)
        else:
            # torchao bitpacking: shards of 4, 2, 1 bits (those set in BITS), largest first.
            W4: tl.constexpr = BITS & 4
            W2: tl.constexpr = BITS & 2
            W1: tl.constexpr = BITS & 1
            code = tl.zeros_like(j + n)
            if W4:
                code = code | _shard(buf_ptr, BAND_OFF, j, n, mask, 4, P8)
            if W2:
                code = code | (_shard(buf_ptr, BAND_OFF + COUNT * P8 * W4, j, n, mask, 2, P8) << W4)
            if W1:
                code = code | (_shard(buf_ptr, BAND_OFF + COUNT * P8 * (W4 + W2), j, n, mask, 1, P8) << (W4 + W2))
        g = (SCALE_ROW + j) * NGROUPS + n // GROUP
        scale = tl.load(scale_ptr + g, mask=mask, other=0).to(tl.float32)
        zero = tl.load(zero_ptr + g, mask=mask, other=0).to(tl.float32)
        val = (code.to(tl.float32) - zero) * scale
    return tl.where(mask, val, 0.0)
