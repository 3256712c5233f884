"""Stage 2: how many bits each singular vector gets, under a byte budget.

A *band* is a run of consecutive singular vectors (largest first) stored at one bit-width. Bits 1..8
are group-wise quantized; 16 means plain fp16 (the low-rank baseline). The cost model below is the
real storage of the packed tensors (see `packing.py` and `quantize.py`), so the budget includes
codes, padding, scales, zero-points and S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Band",
    "PAPER_SCHEDULE",
    "SCALE_BITS",
    "ZERO_BITS",
    "S_BITS",
    "FP16_BITS",
    "vector_cost_bits",
    "budget_bits",
    "allocate",
    "bands_cost_bits",
]

SCALE_BITS = 16  # fp16 scale per group
ZERO_BITS = 8  # uint8 zero-point per group
S_BITS = 32  # fp32 singular value per vector (robust for tiny deltas)
FP16_BITS = 16  # a band stored unquantized

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP16_BITS)

# Delta-CoMe's schedule: 8 bits for the top 2 vectors, 3 bits for the next 32, 2 bits for the rest.
PAPER_SCHEDULE: tuple[tuple[int, int | None], ...] = ((8, 2), (3, 32), (2, None))


@dataclass(frozen=True)
class Band:
    bits: int
    count: int


def _padded(length: int) -> int:
    return -(-length // 8) * 8


def vector_cost_bits(bits: int, out_features: int, in_features: int, group_size: int) -> int:
    """Stored bits of one singular triple (u, s, v) at `bits` bits."""
    if bits == FP16_BITS:
        return FP16_BITS * (out_features + in_features) + S_BITS
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose from {SUPPORTED_BITS}")
    codes = bits * (_padded(out_features) + _padded(in_features))
    groups = math.ceil(out_features / group_size) + math.ceil(in_features / group_size)
    return codes + groups * (SCALE_BITS + ZERO_BITS) + S_BITS


def budget_bits(out_features: int, in_features: int, alpha: float) -> int:
    """`alpha` is the delta's size as a fraction of the fp16 matrix (1/16 = 1 bit per parameter)."""
    return math.floor(alpha * 16 * out_features * in_features)


def bands_cost_bits(bands, out_features: int, in_features: int, group_size: int) -> int:
    return sum(b.count * vector_cost_bits(b.bits, out_features, in_features, group_size) for b in bands)


def allocate(
    out_features: int,
    in_features: int,
    alpha: float,
    schedule=PAPER_SCHEDULE,
    group_size: int = 128,
    max_rank: int | None = None,
) -> tuple[Band, ...]:
    """Fill `schedule` ((bits, count or None = as many as fit), ...) greedily within the budget.

    Bands are filled in order; a band that cannot be filled completely takes what fits and the
    remaining budget flows to the next (cheaper) band, so every shape — square, MLP, GQA k/v — ends
    up at or below `alpha`. `max_rank` caps the total number of vectors (the delta's rank).
    """
    if not (alpha > 0):
        raise ValueError(f"alpha must be positive, got {alpha}")
    rank_left = min(out_features, in_features) if max_rank is None else min(max_rank, out_features, in_features)
    bits_left = budget_bits(out_features, in_features, alpha)
    bands = []
    for bits, count in schedule:
        cost = vector_cost_bits(bits, out_features, in_features, group_size)
        want = rank_left if count is None else min(count, rank_left)
        take = min(want, bits_left // cost)
        if take > 0:
            bands.append(Band(bits, take))
            bits_left -= take * cost
            rank_left -= take
    return tuple(bands)
