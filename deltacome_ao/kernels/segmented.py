"""Segmented (SGMV-style) multi-delta kernel: the CUDA implementation of `deltacome::segmented_delta_linear`.

Contract: `segmented_delta_triton(y, x, groups)` does what `ops.segmented_reference` does — for each
`(rows, PackedFactors)` of `groups`, `y[rows] += ((x[rows] V̂ᵀ) · s) Ûᵀ` (fp32 math, one rounding to
`y.dtype` at the end) — in place, and returns `y`.

Design (two launches per *layout class*, whatever the number of deltas in it):

* Deltas whose allocation is the same (band bits / counts, shape, group size, dtypes) form a layout
  class; the kernels are specialised on it (`tl.constexpr` tuples, like the single-delta kernels), so
  every shard split and offset is a compile-time constant. The paper schedule depends only on the
  shape, so a layer normally has one class, hence two launches per call for all its deltas.
* A class's segments (one per active delta) are described by a small int64 table on the device, one
  row per segment: `[first token, tokens, v, v_scale, v_zero, s, u, u_scale, u_zero]`. The factor
  columns are *element offsets* from an anchor tensor (the factor of that role with the lowest
  address, passed as the kernel's pointer argument), so different deltas' separate tensors are
  reached with plain pointer arithmetic and no offset is negative. The table is cached by its
  content (so it is correct whatever gets freed or reallocated) and CUDA-graph capture after a
  warm-up call finds it cached: no host-to-device copy inside the capture.
* Token rows: the batch rows of each segment, times the tokens per row (`x` may be (B, ..., in)),
  concatenated in segment order (`tok`, built with device ops).
* Launch 1, `_shrink_kernel`, grid (rank chunks, segments, token blocks): `t = (x_g V̂ᵀ)·s` into an
  fp32 scratch (tokens × rank) — V̂ unpacked and dequantised in registers (`common.dequant_band`).
* Launch 2, `_expand_kernel`, grid (output tiles, segments, token blocks): `y_g += t Ûᵀ`, Ûᵀ unpacked
  in registers; one read-modify-write of `y` per tile.
* Column ownership as in `delta_gemv.py`: a tile of `8·BC` features `{c + q·P8}` uses every byte it
  loads from every shard. For decode (one token block per segment) each active delta's packed
  factors are read once per call.
* Token blocks: `BM ≤ 8` uses CUDA-core FMAs (3-D broadcast, fp32); larger blocks use `tl.dot`
  (`ieee` for fp32 activations, `tf32` for half activations on the GPU).

Inputs it does not cover (dtypes other than fp16/bf16/fp32, factors on another device or not
contiguous) go to the reference path.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ..ops import segmented_reference
from .common import dequant_band
from .layout import band_layout, chunk_starts

__all__ = ["segmented_delta_triton", "SegmentedConfig", "default_config"]

_META = 9  # int64 columns per segment
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _shrink_kernel(
    x_ptr, t_ptr, tok_ptr, meta_ptr, v_ptr, vs_ptr, vz_ptr, s_ptr, stride_xm,
    R: tl.constexpr, IN: tl.constexpr, GROUP: tl.constexpr, NG_IN: tl.constexpr, NBANDS: tl.constexpr,
    BITS: tl.constexpr, COUNTS: tl.constexpr, V_OFFS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    J_OFFS: tl.constexpr, CHUNKS: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    mb = tl.program_id(2)
    row = meta_ptr + g * 9
    first = tl.load(row)
    count = tl.load(row + 1)
    if mb * BM >= count:
        return
    vb = v_ptr + tl.load(row + 2)
    vsb = vs_ptr + tl.load(row + 3)
    vzb = vz_ptr + tl.load(row + 4)
    sb = s_ptr + tl.load(row + 5)

    m = mb * BM + tl.arange(0, BM)
    mm = m < count
    tok = tl.load(tok_ptr + first + m, mask=mm, other=0)
    P8: tl.constexpr = (IN + 7) // 8
    i = tl.arange(0, 8 * BC)
    q = i // BC
    c = i % BC
    for b in tl.static_range(NBANDS):
        if (pid_r >= CHUNKS[b]) & (pid_r < CHUNKS[b + 1]):
            j = (pid_r - CHUNKS[b]) * BR + tl.arange(0, BR)
            jm = j < COUNTS[b]
            acc = tl.zeros((BM, BR), tl.float32)
            for c0 in range(0, P8, BC):
                n = c0 + c + q * P8
                nm = (c0 + c < P8) & (n < IN)
                xt = tl.load(x_ptr + tok[:, None] * stride_xm + n[None, :], mask=mm[:, None] & nm[None, :],
                             other=0.0).to(tl.float32)
                v = dequant_band(vb, vsb, vzb, j[:, None], n[None, :], jm[:, None] & nm[None, :],
                                 BITS[b], COUNTS[b], IN, V_OFFS[b], SCALE_ROWS[b], GROUP, NG_IN)  # (BR, 8BC)
                if USE_DOT:
                    acc += tl.dot(xt, tl.trans(v), input_precision=PREC)
                else:
                    acc += tl.sum(xt[:, None, :] * v[None, :, :], axis=2)
            s = tl.load(sb + J_OFFS[b] + j, mask=jm, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
            tl.store(t_ptr + (first + m)[:, None] * R + J_OFFS[b] + j[None, :], acc, mask=mm[:, None] & jm[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, tok_ptr, meta_ptr, u_ptr, us_ptr, uz_ptr, stride_ym,
    R: tl.constexpr, OUT: tl.constexpr, GROUP: tl.constexpr, NG_OUT: tl.constexpr, NBANDS: tl.constexpr,
    BITS: tl.constexpr, COUNTS: tl.constexpr, U_OFFS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    J_OFFS: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    mb = tl.program_id(2)
    row = meta_ptr + g * 9
    first = tl.load(row)
    count = tl.load(row + 1)
    if mb * BM >= count:
        return
    ub = u_ptr + tl.load(row + 6)
    usb = us_ptr + tl.load(row + 7)
    uzb = uz_ptr + tl.load(row + 8)

    m = mb * BM + tl.arange(0, BM)
    mm = m < count
    tok = tl.load(tok_ptr + first + m, mask=mm, other=0)
    P8: tl.constexpr = (OUT + 7) // 8
    i = tl.arange(0, 8 * BC)
    cc = pid_n * BC + i % BC
    n = cc + (i // BC) * P8
    nm = (cc < P8) & (n < OUT)
    acc = tl.zeros((BM, 8 * BC), tl.float32)
    for b in tl.static_range(NBANDS):
        for j0 in range(0, COUNTS[b], BR):
            j = j0 + tl.arange(0, BR)
            jm = j < COUNTS[b]
            tt = tl.load(t_ptr + (first + m)[:, None] * R + J_OFFS[b] + j[None, :], mask=mm[:, None] & jm[None, :],
                         other=0.0)
            u = dequant_band(ub, usb, uzb, j[:, None], n[None, :], jm[:, None] & nm[None, :],
                             BITS[b], COUNTS[b], OUT, U_OFFS[b], SCALE_ROWS[b], GROUP, NG_OUT)  # (BR, 8BC)
            if USE_DOT:
                acc += tl.dot(tt, u, input_precision=PREC)
            else:
                acc += tl.sum(tt[:, :, None] * u[None, :, :], axis=1)
    ymask = mm[:, None] & nm[None, :]
    yp = y_ptr + tok[:, None] * stride_ym + n[None, :]
    yv = tl.load(yp, mask=ymask, other=0.0).to(tl.float32)
    tl.store(yp, (yv + acc).to(y_ptr.dtype.element_ty), mask=ymask)


# --- host side ----------------------------------------------------------------------------------


class SegmentedConfig(dict):
    """Launch config: BM (token block), BR (singular vectors per step), BC (8·BC features per tile),
    use_dot (tl.dot instead of FMAs; needs BM, BR ≥ 16), num_warps. Untuned starting points."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_config(max_tokens: int) -> SegmentedConfig:
    """Decode (≤ 8 tokens in the largest segment): FMAs with the token block padded to a power of 2;
    more tokens: `tl.dot` with 16 (interpreter) / 32 token blocks. Not tuned on a GPU."""
    if max_tokens <= 8:
        bm = 1 << max(0, math.ceil(math.log2(max(1, max_tokens))))
        return SegmentedConfig(BM=bm, BR=16, BC=16, use_dot=False, num_warps=4)
    return SegmentedConfig(BM=16 if _interpreting() else 32, BR=32, BC=16, use_dot=True, num_warps=4)


_META_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_META_CACHE_SIZE = 4096
_ARANGE: dict = {}


def _meta_tensor(values: tuple, device) -> torch.Tensor:
    """The int64 segment table, cached by content (always correct; no H2D copy on a hit, so a CUDA
    graph captured after a warm-up call records none)."""
    key = (str(device), values)
    t = _META_CACHE.get(key)
    if t is None:
        t = torch.tensor(values, dtype=torch.int64).to(device)
        _META_CACHE[key] = t
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    else:
        _META_CACHE.move_to_end(key)
    return t


def _arange(n: int, device) -> torch.Tensor:
    key = (str(device), n)
    t = _ARANGE.get(key)
    if t is None:
        t = _ARANGE[key] = torch.arange(n, dtype=torch.int64, device=device)
    return t


_ROLES = ("v_packed", "v_scale", "v_zero", "s", "u_packed", "u_scale", "u_zero")


def _supported(x, y, f) -> bool:
    for name in _ROLES:
        t = getattr(f, name)
        if t.device != x.device or not t.is_contiguous():
            return False
    return f.s.dtype in _DTYPES and f.v_zero.dtype == torch.uint8 and f.u_zero.dtype == torch.uint8


def segmented_delta_triton(y: torch.Tensor, x: torch.Tensor, groups, config: dict | None = None) -> torch.Tensor:
    """`ops.segmented_reference` with Triton kernels (see the module docstring); `groups` is
    [(rows, PackedFactors), ...]."""
    active = [(i, rows, f) for i, (rows, f) in enumerate(groups) if f.rank > 0 and rows.numel() > 0]
    if not active:
        return y
    if x.dtype not in _DTYPES or y.dtype not in _DTYPES or x.numel() == 0 or x.dim() < 2:
        return segmented_reference(y, x, [(rows, f) for _, rows, f in active])
    in_f, out_f = x.shape[-1], y.shape[-1]
    fallback = [(i, rows, f) for i, rows, f in active
                if not _supported(x, y, f) or (f.out_features, f.in_features) != (out_f, in_f)]
    if fallback:
        segmented_reference(y, x, [(rows, f) for _, rows, f in fallback])
        skip = {i for i, _, _ in fallback}
        active = [a for a in active if a[0] not in skip]
        if not active:
            return y
    per_row = x[0].numel() // in_f  # tokens per batch row
    x2 = x.reshape(-1, in_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = y.view(-1, out_f) if y.is_contiguous() else y.contiguous().view(-1, out_f)

    classes: dict = {}
    for d, rows, f in active:
        key = (f.bits, f.counts, f.group_size, f.s.dtype, f.v_scale.dtype, f.u_scale.dtype)
        classes.setdefault(key, []).append((rows, f))
    for (bits, counts, group_size, _, _, _), members in classes.items():
        _launch(y2, x2, members, bits, counts, group_size, per_row, config)
    if y2.data_ptr() != y.data_ptr():
        y.copy_(y2.view_as(y))
    return y


def _launch(y2, x2, members, bits, counts, group_size, per_row, config):
    device = x2.device
    out_f, in_f = y2.shape[1], x2.shape[1]
    lay = band_layout(bits, counts, out_f, in_f, group_size)
    anchors = [min((getattr(f, name) for _, f in members), key=lambda t: t.data_ptr()) for name in _ROLES]
    values, toks, first, longest = [], [], 0, 0
    for rows, f in members:
        n = rows.numel() * per_row
        values += [first, n]
        for name, a in zip(_ROLES, anchors):
            diff = getattr(f, name).data_ptr() - a.data_ptr()
            assert diff % a.element_size() == 0
            values.append(diff // a.element_size())
        rows = rows.to(torch.int64)
        toks.append(rows if per_row == 1 else (rows[:, None] * per_row + _arange(per_row, device)[None, :]).reshape(-1))
        first += n
        longest = max(longest, n)
    meta = _meta_tensor(tuple(values), device)
    tok = toks[0] if len(toks) == 1 else torch.cat(toks)
    cfg = dict(default_config(longest))
    if config:
        cfg.update(config)
    bm, br, bc, use_dot = int(cfg["BM"]), int(cfg["BR"]), int(cfg["BC"]), bool(cfg["use_dot"])
    prec = "ieee" if (x2.dtype == torch.float32 or device.type != "cuda") else "tf32"
    r = lay.rank
    t = torch.empty(first, r, dtype=torch.float32, device=device)
    nseg, mblocks = len(members), triton.cdiv(longest, bm)
    common = dict(R=r, GROUP=group_size, NBANDS=lay.nbands, BITS=lay.bits, COUNTS=lay.counts,
                  SCALE_ROWS=lay.scale_rows, J_OFFS=lay.rank_offsets,
                  BM=bm, BR=br, BC=bc, USE_DOT=use_dot, PREC=prec, num_warps=int(cfg.get("num_warps", 4)))
    chunks = chunk_starts(lay.counts, br)
    _shrink_kernel[(chunks[-1], nseg, mblocks)](
        x2, t, tok, meta, *anchors[:4], x2.stride(0),
        IN=in_f, NG_IN=lay.v_groups, V_OFFS=lay.v_offsets, CHUNKS=chunks, **common)
    _expand_kernel[(triton.cdiv((out_f + 7) // 8, bc), nseg, mblocks)](
        y2, t, tok, meta, *anchors[4:], y2.stride(0),
        OUT=out_f, NG_OUT=lay.u_groups, U_OFFS=lay.u_offsets, **common)
