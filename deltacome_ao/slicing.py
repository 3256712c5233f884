"""Stage 4 (packing): exact slices of packed factors — what tensor parallelism cuts a weight into.

`W[a:b, :] = W_base[a:b, :] + Û[a:b] diag(s) V̂` and `W[:, a:b] = W_base[:, a:b] + Û diag(s) V̂[:, a:b]`:
an output slice cuts every row of Ûᵀ, an input slice every row of V̂, and the other factor stays
whole. Packed rows are bit-interleaved (`packing.py`), so a slice is not a view: the codes of the
kept columns are unpacked and packed again, once (`slice_factors`). Scales and zero-points are per
group of `group_size` along each row; a slice that starts on a group boundary keeps its groups as
they are (the last one may be ragged, as the unsliced row's last group already may be), so the
dequantized values of the slice are bit-identical to the same entries of the whole factor.

A slice that does not start on a group boundary (e.g. 11008 / 4 = 2752 columns with groups of 128)
is still exact: `regroup` first re-expresses the factors with the finer group size
`gcd(group_size, start)`, each old group becoming `group_size / new` groups with the same scale and
zero-point — the same values, with more (repeated) scales. `regroup_cost` says how many bytes that
adds; pick `group_size` at compression time so that it divides every shard size (`out / tp` and
`in / tp`) to avoid it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .allocate import FP16_BITS
from .factors import PackedFactors
from .packing import band_offsets, pack_rows, unpack_rows

__all__ = ["slice_factors", "regroup", "regroup_cost", "shard_group_size", "shard_bounds"]


def _check_range(length: int, start: int, end: int, what: str) -> None:
    if not (0 <= start < end <= length):
        raise ValueError(f"{what}: slice [{start}, {end}) is not a non-empty range inside [0, {length})")


def shard_group_size(group_size: int, *starts: int) -> int:
    """The largest group size that divides `group_size` and puts every start on a group boundary."""
    g = int(group_size)
    for s in starts:
        g = math.gcd(g, int(s)) if s else g
    return g


def shard_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of shard `index` of `parts` equal shards of `length` (ValueError if uneven)."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"shard {index} of {parts}")
    if length % parts:
        raise ValueError(f"{length} does not split into {parts} equal shards")
    size = length // parts
    return index * size, (index + 1) * size


def _repeat_groups(table: torch.Tensor, old: int, new: int, length: int) -> torch.Tensor:
    """Per-group table (rows, ceil(length / old)) -> (rows, ceil(length / new)), new divides old."""
    groups = math.ceil(length / new)
    index = torch.arange(groups, device=table.device) * new // old
    return table.index_select(1, index).contiguous() if table.shape[0] else table.new_zeros(0, groups)


def regroup(f: PackedFactors, group_size: int) -> PackedFactors:
    """The same factors with a finer quantization group (`group_size` must divide `f.group_size`):
    every dequantized value is unchanged, only the scale / zero-point tables grow."""
    new, old = int(group_size), f.group_size
    if new == old:
        return f
    if new < 1 or old % new:
        raise ValueError(f"group size {new} does not divide the factors' group size {old}")
    return replace(
        f,
        v_scale=_repeat_groups(f.v_scale, old, new, f.in_features),
        v_zero=_repeat_groups(f.v_zero, old, new, f.in_features),
        u_scale=_repeat_groups(f.u_scale, old, new, f.out_features),
        u_zero=_repeat_groups(f.u_zero, old, new, f.out_features),
        group_size=new,
    )


def regroup_cost(f: PackedFactors, group_size: int) -> int:
    """Bytes `regroup(f, group_size)` adds (scale fp16 + zero uint8 per group and quantized row)."""
    return regroup(f, group_size).nbytes() - f.nbytes() if group_size != f.group_size else 0


def _slice_rows(packed, scale, zero, f: PackedFactors, length: int, start: int, end: int):
    """One factor's (packed, scale, zero) with each row cut to columns [start, end); start % group == 0."""
    g = f.group_size
    new_len = end - start
    chunks = []
    for bits, count, (b0, b1) in zip(f.bits, f.counts, band_offsets(f.bits, f.counts, length)):
        codes = unpack_rows(packed[b0:b1], bits, count, length)[:, start:end]
        if bits == FP16_BITS:
            codes = codes.contiguous()
        chunks.append(pack_rows(codes.contiguous(), bits))
    g0, g1 = start // g, math.ceil(end / g)
    out = torch.cat(chunks) if chunks else packed.new_zeros(0)
    return out, scale[:, g0:g1].contiguous(), zero[:, g0:g1].contiguous(), new_len


def slice_factors(f: PackedFactors, dim: int, start: int, end: int) -> PackedFactors:
    """The factors of `Δ[start:end, :]` (dim 0, output features) or `Δ[:, start:end]` (dim 1, input
    features), exact (see the module docstring). The other factor and `s` are shared, not copied."""
    if dim not in (0, 1):
        raise ValueError(f"a weight has dims 0 (output) and 1 (input), got {dim}")
    length = f.out_features if dim == 0 else f.in_features
    _check_range(length, start, end, f"dim {dim} of a {f.out_features}x{f.in_features} delta")
    if start == 0 and end == length:
        return f
    f = regroup(f, shard_group_size(f.group_size, start))
    if dim == 0:
        packed, scale, zero, n = _slice_rows(f.u_packed, f.u_scale, f.u_zero, f, length, start, end)
        return replace(f, u_packed=packed, u_scale=scale, u_zero=zero, out_features=n)
    packed, scale, zero, n = _slice_rows(f.v_packed, f.v_scale, f.v_zero, f, length, start, end)
    return replace(f, v_packed=packed, v_scale=scale, v_zero=zero, in_features=n)
