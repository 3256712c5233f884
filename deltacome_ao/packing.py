"""Stage 4: bit-packing of quantization codes into flat uint8 buffers.

Codes of width 1..7 use torchao's `bitpacking.pack` layout along each row: a b-bit code is split
into power-of-two shards (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1); a w-bit shard holds
8 / w codes per byte, code `i` of a row of (padded) length L living in byte `i % (L·w/8)` at bit
offset `(i // (L·w/8)) · w`. So 3-bit codes really take 3 bits. 8-bit codes are stored as they
are and 16-bit rows are raw fp16 bytes. Rows are padded to a multiple of 8 codes.

All rows of one band go into one flat buffer, shard after shard; the bands of a matrix are
concatenated in order, so a whole matrix factor is one uint8 tensor plus its band list.
"""

from __future__ import annotations

import torch
from torchao.prototype.dtypes.uintx.bitpacking import numbits, pack, unpack

from .allocate import FP16_BITS

__all__ = ["padded_length", "packed_nbytes", "pack_rows", "unpack_rows", "band_offsets"]


def padded_length(length: int) -> int:
    return -(-length // 8) * 8


def packed_nbytes(bits: int, rows: int, length: int) -> int:
    if bits == FP16_BITS:
        return rows * length * 2
    return rows * padded_length(length) * bits // 8


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (r, L) codes (uint8, or fp16 when bits == 16) into a flat uint8 buffer."""
    if bits == FP16_BITS:
        return codes.to(torch.float16).contiguous().view(torch.uint8).reshape(-1)
    rows, length = codes.shape
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    pad = padded_length(length) - length
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    if bits == 8 or rows == 0:
        return c.contiguous().reshape(-1)
    shards = pack(c.contiguous(), bits, dim=-1)
    return torch.cat([s.reshape(-1) for s in shards])


def unpack_rows(buf: torch.Tensor, bits: int, rows: int, length: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (r, L) uint8 codes (fp16 values when bits == 16)."""
    if bits == FP16_BITS:
        if buf.storage_offset() % 2:  # a 16-bit band may follow an odd number of bytes
            buf = buf.clone()
        return buf.view(torch.float16).view(rows, length)
    padded = padded_length(length)
    if bits == 8 or rows == 0:
        return buf.view(rows, padded)[:, :length]
    shards, start = [], 0
    for w in numbits[bits]:
        size = rows * padded * w // 8
        shards.append(buf[start:start + size].view(rows, padded * w // 8))
        start += size
    return unpack(shards, bits, dim=-1)[:, :length]


def band_offsets(bits_list, counts, length: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of each band inside a matrix factor's flat buffer."""
    out, start = [], 0
    for bits, count in zip(bits_list, counts):
        end = start + packed_nbytes(bits, count, length)
        out.append((start, end))
        start = end
    return out
