"""Fused decode kernel: `y = x W_baseᵀ + ((x V̂ᵀ)·s) Ûᵀ` for a few tokens, in ONE launch.

At 1 token the base GEMV is memory bound (4096² bf16 = 33.5 MB ≈ 10 µs on an H100) and the delta
adds ≈6 % bytes, so the delta must ride along with the base read instead of costing a second launch
(6-13 µs from Python). The difficulty is the dependency: every output needs all of
t = (x V̂ᵀ)·s (rank r ≈ 1000), and t needs all of V̂. Computing t redundantly in every output
program would read V̂ (≈1 MB) once per program (≈128×). Instead the grid has two kinds of
programs, told apart by a ticket taken with an atomic counter at program start:

* tickets [0, T): "t-programs". Each owns BR_T singular vectors of one band, reads those rows of
  V̂ once (unpacking the codes in registers), writes its slice of t (fp32 scratch, M × r) and bumps
  a "done" counter (release).
* tickets [T, T + tiles): "output programs". Each owns 8·BC output features, streams their base
  rows once (the bulk of the bytes), then waits (acquire spin) until done == T — by then the
  t-programs, which started first and are short, have long finished — and adds t · Ûᵀ[:, tile],
  reading each Ûᵀ byte of the tile once.

Tickets instead of `program_id` make the wait deadlock-free whatever order the hardware starts
programs in: a program that waits holds a ticket ≥ T, so all t-programs have already started and
never wait themselves. (Under the interpreter, programs run one after another in id order, which
is also ticket order.) The cost is a 2-int32 zero-filled sync buffer per call (one memset node in a
CUDA graph) and the M × r fp32 t scratch.

Output ownership follows the packed layout: with P = out padded to 8 and P8 = P/8, an output
program owns features {c + q·P8 : c in [c0, c0+BC), q in 0..7}. For a w-bit shard (row = P8·w
bytes) those are exactly the bytes [c0, c0+BC) + {0..w-1}·P8, each holding 8/w of the program's
codes — so every packed byte a program loads is fully used, for every bit-width at once (1, 2,
4 and 8-bit shards, and so 3/5/6/7-bit codes). The t-programs walk V̂ rows the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..factors import PackedFactors
from .common import dequant_band
from .configs import gemv_block_m, gemv_config
from .layout import BandLayout, chunk_starts

__all__ = ["delta_gemv", "gemv_launch_args"]


@triton.jit
def _t_rows(
    x_ptr, v_ptr, vs_ptr, vz_ptr, s_ptr, t_ptr, M, stride_xm, chunk,
    IN: tl.constexpr, GROUP: tl.constexpr, NG_IN: tl.constexpr, RANK: tl.constexpr,
    BITS: tl.constexpr, COUNT: tl.constexpr, V_OFF: tl.constexpr, SCALE_ROW: tl.constexpr, J_OFF: tl.constexpr,
    BLOCK_M: tl.constexpr, BR_T: tl.constexpr, BC_T: tl.constexpr, DELTA_PREC: tl.constexpr,
):
    """t[:, J_OFF + j] = s_j · (x · v_j) for the BR_T rows j of one band chunk."""
    P8: tl.constexpr = (IN + 7) // 8
    KK: tl.constexpr = 8 * BC_T
    j = chunk * BR_T + tl.arange(0, BR_T)
    jm = j < COUNT
    kk = tl.arange(0, KK)
    cc = kk % BC_T
    q = kk // BC_T
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    if BLOCK_M >= 16:
        acc = tl.zeros((BLOCK_M, BR_T), tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BR_T, KK), tl.float32)
    for c0 in range(0, P8, BC_T):
        c = c0 + cc
        k = c + q * P8
        km = (c < P8) & (k < IN)
        v = dequant_band(
            v_ptr, vs_ptr, vz_ptr, j[:, None], k[None, :], jm[:, None] & km[None, :],
            BITS, COUNT, IN, V_OFF, SCALE_ROW, GROUP, NG_IN,
        )
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        xt = xt.to(tl.float32)
        if BLOCK_M >= 16:
            acc += tl.dot(xt, tl.trans(v), input_precision=DELTA_PREC)
        else:
            acc3 += xt[:, None, :] * v[None, :, :]
    if BLOCK_M < 16:
        acc = tl.sum(acc3, axis=2)
    s = tl.load(s_ptr + J_OFF + j, mask=jm, other=0.0)
    tl.store(t_ptr + m[:, None] * RANK + J_OFF + j[None, :], acc * s[None, :], mask=mm[:, None] & jm[None, :])


@triton.jit
def _delta_gemv_kernel(
    x_ptr, w_ptr, v_ptr, vs_ptr, vz_ptr, u_ptr, us_ptr, uz_ptr, s_ptr, t_ptr, sync_ptr, y_ptr,
    M, stride_xm, stride_wn, stride_wk, stride_ym,
    IN: tl.constexpr, OUT: tl.constexpr, GROUP: tl.constexpr, NG_IN: tl.constexpr, NG_OUT: tl.constexpr,
    RANK: tl.constexpr, NBANDS: tl.constexpr, BITS: tl.constexpr, COUNTS: tl.constexpr,
    V_OFFS: tl.constexpr, U_OFFS: tl.constexpr, SCALE_ROWS: tl.constexpr, J_OFFS: tl.constexpr,
    T_STARTS: tl.constexpr, T_PROGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BR_T: tl.constexpr, BC_T: tl.constexpr,
    BR_U: tl.constexpr, BASE_PREC: tl.constexpr, DELTA_PREC: tl.constexpr,
):
    ticket = tl.atomic_add(sync_ptr, 1)
    if ticket < T_PROGS:
        # ---- phase 1: one chunk of t = (x V̂ᵀ)·s ---------------------------------------------
        for b in tl.static_range(NBANDS):
            if (ticket >= T_STARTS[b]) & (ticket < T_STARTS[b + 1]):
                _t_rows(
                    x_ptr, v_ptr, vs_ptr, vz_ptr, s_ptr, t_ptr, M, stride_xm, ticket - T_STARTS[b],
                    IN, GROUP, NG_IN, RANK, BITS[b], COUNTS[b], V_OFFS[b], SCALE_ROWS[b], J_OFFS[b],
                    BLOCK_M, BR_T, BC_T, DELTA_PREC,
                )
        tl.debug_barrier()  # every thread's t stores happen before the release below
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        # ---- phase 2: 8·BC output features: base rows, then + t Ûᵀ -------------------------------
        P8: tl.constexpr = (OUT + 7) // 8
        ROWS: tl.constexpr = 8 * BC
        X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        i = tl.arange(0, ROWS)
        c = (ticket - T_PROGS) * BC + i % BC
        n = c + (i // BC) * P8
        nm = (c < P8) & (n < OUT)
        m = tl.arange(0, BLOCK_M)
        mm = m < M
        kb = tl.arange(0, BK)
        if BLOCK_M >= 16:
            acc = tl.zeros((BLOCK_M, ROWS), tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_M, ROWS, BK), tl.float32)
        for k0 in range(0, IN, BK):
            k = k0 + kb
            km = k < IN
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=nm[:, None] & km[None, :], other=0.0)
            xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = w.to(X_DTYPE)  # the reference computes F.linear(x, W.to(x.dtype))
            if BLOCK_M >= 16:
                acc += tl.dot(xt, tl.trans(w), input_precision=BASE_PREC)
            else:
                acc3 += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if BLOCK_M < 16:
            acc = tl.sum(acc3, axis=2)
        if T_PROGS > 0:
            done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            while done < T_PROGS:
                done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            for b in tl.static_range(NBANDS):
                for j0 in range(0, COUNTS[b], BR_U):
                    j = j0 + tl.arange(0, BR_U)
                    jm = j < COUNTS[b]
                    ut = dequant_band(
                        u_ptr, us_ptr, uz_ptr, j[:, None], n[None, :], jm[:, None] & nm[None, :],
                        BITS[b], COUNTS[b], OUT, U_OFFS[b], SCALE_ROWS[b], GROUP, NG_OUT,
                    )
                    tt = tl.load(
                        t_ptr + m[:, None] * RANK + J_OFFS[b] + j[None, :], mask=mm[:, None] & jm[None, :],
                        other=0.0, cache_modifier=".cg",
                    )
                    if BLOCK_M >= 16:
                        acc += tl.dot(tt, ut, input_precision=DELTA_PREC)
                    else:
                        acc += tl.sum(tt[:, :, None] * ut[None, :, :], axis=1)
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def gemv_launch_args(x2, base_weight, factors: PackedFactors, layout: BandLayout, config: dict | None = None):
    """(kernel, grid, positional args, keyword args) of one fused-GEMV launch; allocates y and scratch.

    Split from `delta_gemv` so the exact same launch can be compiled ahead of time (tests/aot.py).
    """
    M, IN = x2.shape
    OUT = base_weight.shape[0]
    block_m = gemv_block_m(M)
    cfg = gemv_config(block_m, fp32=x2.dtype == torch.float32)
    if config:
        cfg.update(config)
    num_warps = cfg.pop("num_warps", 4)
    t_starts = chunk_starts(layout.counts, cfg["BR_T"])
    t_progs = t_starts[-1]
    tiles = triton.cdiv(triton.cdiv(OUT, 8), cfg["BC"])
    dev = x2.device
    y = torch.empty(M, OUT, dtype=x2.dtype, device=dev)
    t = torch.empty(max(M * layout.rank, 1), dtype=torch.float32, device=dev)
    sync = torch.zeros(2, dtype=torch.int32, device=dev)
    fp32 = x2.dtype == torch.float32
    f = factors
    args = (
        x2, base_weight, _nonempty(f.v_packed), _nonempty(f.v_scale), _nonempty(f.v_zero),
        _nonempty(f.u_packed), _nonempty(f.u_scale), _nonempty(f.u_zero), _nonempty(f.s), t, sync, y,
        M, x2.stride(0), base_weight.stride(0), base_weight.stride(1), y.stride(0),
    )
    kwargs = dict(
        IN=IN, OUT=OUT, GROUP=layout.group_size, NG_IN=layout.v_groups, NG_OUT=layout.u_groups,
        RANK=layout.rank, NBANDS=layout.nbands, BITS=layout.bits, COUNTS=layout.counts,
        V_OFFS=layout.v_offsets, U_OFFS=layout.u_offsets, SCALE_ROWS=layout.scale_rows, J_OFFS=layout.rank_offsets,
        T_STARTS=t_starts, T_PROGS=t_progs, BLOCK_M=block_m,
        BASE_PREC="ieee" if fp32 else "tf32", DELTA_PREC="ieee" if fp32 else "tf32",
        num_warps=num_warps, **cfg,
    )
    return _delta_gemv_kernel, (t_progs + tiles,), args, kwargs, y


def delta_gemv(x2, base_weight, factors: PackedFactors, layout: BandLayout, config: dict | None = None) -> torch.Tensor:
    """Fused base + delta GEMV for x2 (M ≤ 16, in) contiguous rows; returns (M, out) in x2.dtype.
    `factors`: contiguous tensors, fp32 `s` (`dispatch.kernel_factors`)."""
    kernel, grid, args, kwargs, y = gemv_launch_args(x2, base_weight, factors, layout, config)
    kernel[grid](*args, **kwargs)
    return y
