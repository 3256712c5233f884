"""Host-side description of a packed factor, as the kernels read it (no Triton here).

A factor (V̂ with rows of length `in`, or Ûᵀ with rows of length `out`) is one flat uint8 buffer:
bands one after the other (`packing.band_offsets`), inside a quantized band of `b` bits the
power-of-two shards of `b` (4, 2, 1 — largest first; 8 bits is a single 8-bit shard), each shard
`count` rows of `P·w/8` bytes, `P` = row length padded to a multiple of 8. Code `n` of a row lives
in shard byte `n % (P·w/8)` at bit `(n // (P·w/8))·w`, and the shard holding bits starting at bit
`rel` contributes `(byte >> shift & (2^w-1)) << rel` (rel = sum of the larger shards' widths).
16-bit bands are raw fp16 rows of the unpadded length. Scale / zero rows exist only for the
quantized bands, in band order.

The kernels are specialised on this description (band bits, counts and byte offsets are
`tl.constexpr` tuples): a model has a handful of distinct (shape, bands) pairs, so a handful of
compiled variants, and every offset, shard split and shift is a compile-time constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..allocate import FP16_BITS
from ..packing import band_offsets

__all__ = ["BandLayout", "band_layout", "chunk_starts"]


@dataclass(frozen=True)
class BandLayout:
    """Per-band constants of one (bits, counts) allocation for an (out, in) matrix."""

    bits: tuple[int, ...]
    counts: tuple[int, ...]
    rank_offsets: tuple[int, ...]  # first singular vector of each band (index into s / t)
    scale_rows: tuple[int, ...]  # first scale / zero row of each band (0 for 16-bit bands)
    v_offsets: tuple[int, ...]  # byte offset of each band in the V̂ buffer (rows of length in)
    u_offsets: tuple[int, ...]  # byte offset of each band in the Ûᵀ buffer (rows of length out)
    out_features: int
    in_features: int
    group_size: int

    @property
    def rank(self) -> int:
        return sum(self.counts)

    @property
    def nbands(self) -> int:
        return len(self.bits)

    @property
    def v_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def u_groups(self) -> int:
        return math.ceil(self.out_features / self.group_size)


def band_layout(bits, counts, out_features: int, in_features: int, group_size: int) -> BandLayout:
    bits = tuple(int(b) for b in bits)
    counts = tuple(int(c) for c in counts)
    if len(bits) != len(counts):
        raise ValueError(f"bits {bits} and counts {counts} differ in length")
    for b in bits:
        if not (1 <= b <= 8 or b == FP16_BITS):
            raise ValueError(f"unsupported bit-width {b}")
    rank_offsets, scale_rows, r, q = [], [], 0, 0
    for b, c in zip(bits, counts):
        rank_offsets.append(r)
        scale_rows.append(q if b != FP16_BITS else 0)
        r += c
        q += c if b != FP16_BITS else 0
    v_offsets = tuple(s for s, _ in band_offsets(bits, counts, in_features))
    u_offsets = tuple(s for s, _ in band_offsets(bits, counts, out_features))
    return BandLayout(
        bits, counts, tuple(rank_offsets), tuple(scale_rows), v_offsets, u_offsets,
        int(out_features), int(in_features), int(group_size),
    )


def chunk_starts(counts, rows_per_chunk: int) -> tuple[int, ...]:
    """Cumulative number of `rows_per_chunk`-row chunks before each band (len = nbands + 1)."""
    out = [0]
    for c in counts:
        out.append(out[-1] + -(-int(c) // rows_per_chunk))
    return tuple(out)
