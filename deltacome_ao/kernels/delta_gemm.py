"""Prefill (many tokens): two implementations of `y = x W_baseᵀ + ((x V̂ᵀ)·s) Ûᵀ`.

`delta_gemm_fused` — tensor cores, codes unpacked on the fly, two launches:
  1. t-projection: t = (x V̂ᵀ)·sqrt|s|, grid (M tiles × rank chunks × SPLIT_K); each program runs
     (its share of) the K loop over in_features with `tl.dot`, dequantising its V̂ rows tile by
     tile. t is fp32 (split-K partial sums are added with fp32 atomics into a zeroed buffer).
  2. GEMM: grid (M tiles × N tiles, grouped for L2 reuse); the K loop runs over in_features
     (x · W_baseᵀ) and then over the rank (t · (sign(s)·sqrt|s|·Ûᵀ)), both with `tl.dot` into one fp32
     accumulator — the delta is a few hundred extra K steps of the same GEMM. Splitting s as
     sqrt|s| on each side keeps both products in fp16 range (s also carries the max-abs
     normalisation of both singular vectors and can be large).
  Launch latency does not matter at these sizes, so two launches are fine.

`delta_gemm_dequant` — dequantise V̂ and Ûᵀ once per call (one Triton launch each, ≈(in+out)·r
values written), then cuBLAS: y = F.linear(x, W); t = x V̂ᵀ; y += t Ûᵀ (addmm). At thousands of
tokens cuBLAS is the faster GEMM and the dequantisation cost is amortised over all tokens.

The dispatcher (`dispatch.py`) picks between them by token count, thresholds in `configs.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..factors import PackedFactors
from .common import dequant_band
from .configs import gemm_config, tproj_config
from .dequant import MULT_SIGNED_SQRT, MULT_SQRT, dequantize_factor_triton, row_multiplier
from .layout import BandLayout, chunk_starts

__all__ = ["delta_gemm_fused", "delta_gemm_dequant", "tproj_launch_args", "gemm_launch_args"]


@triton.jit
def _tproj_kernel(
    x_ptr, v_ptr, vs_ptr, vz_ptr, s_ptr, t_ptr, M, stride_xm, stride_tm,
    IN: tl.constexpr, GROUP: tl.constexpr, NG_IN: tl.constexpr, NBANDS: tl.constexpr,
    BITS: tl.constexpr, COUNTS: tl.constexpr, V_OFFS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    J_OFFS: tl.constexpr, CHUNKS: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # Split-K (grid axis 2) gives small-M calls enough programs; partial sums are added atomically.
    K_PER: tl.constexpr = ((IN + SPLIT_K - 1) // SPLIT_K + BK - 1) // BK * BK
    k_lo = tl.program_id(2) * K_PER
    m = pid_m * BM + tl.arange(0, BM)
    mm = m < M
    kb = tl.arange(0, BK)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    for b in tl.static_range(NBANDS):
        if (pid_r >= CHUNKS[b]) & (pid_r < CHUNKS[b + 1]):
            j = (pid_r - CHUNKS[b]) * BR + tl.arange(0, BR)
            jm = j < COUNTS[b]
            acc = tl.zeros((BM, BR), tl.float32)
            for k0 in range(k_lo, k_lo + K_PER, BK):
                k = k0 + kb
                km = k < IN
                xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
                v = dequant_band(
                    v_ptr, vs_ptr, vz_ptr, j[None, :], k[:, None], km[:, None] & jm[None, :],
                    BITS[b], COUNTS[b], IN, V_OFFS[b], SCALE_ROWS[b], GROUP, NG_IN,
                )  # (BK, BR) = V̂ᵀ tile
                acc += tl.dot(xt, v.to(X_DTYPE), input_precision=PREC)
            s = tl.load(s_ptr + J_OFFS[b] + j, mask=jm, other=0.0)
            acc = acc * row_multiplier(s, 2)[None, :]
            t_ptrs = t_ptr + m[:, None] * stride_tm + J_OFFS[b] + j[None, :]
            if SPLIT_K == 1:
                tl.store(t_ptrs, acc, mask=mm[:, None] & jm[None, :])
            else:
                tl.atomic_add(t_ptrs, acc, mask=mm[:, None] & jm[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, t_ptr, u_ptr, us_ptr, uz_ptr, s_ptr, y_ptr,
    M, stride_xm, stride_wn, stride_wk, stride_tm, stride_ym,
    IN: tl.constexpr, OUT: tl.constexpr, GROUP: tl.constexpr, NG_OUT: tl.constexpr, NBANDS: tl.constexpr,
    BITS: tl.constexpr, COUNTS: tl.constexpr, U_OFFS: tl.constexpr, SCALE_ROWS: tl.constexpr, J_OFFS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each column tile of W while it sits in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n: tl.constexpr = (OUT + BN - 1) // BN
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    m = pid_m * BM + tl.arange(0, BM)
    mm = m < M
    n = pid_n * BN + tl.arange(0, BN)
    nm = n < OUT
    kb = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, IN, BK):
        k = k0 + kb
        km = k < IN
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None] * stride_wk + n[None, :] * stride_wn, mask=km[:, None] & nm[None, :], other=0.0)
        acc += tl.dot(xt, w.to(X_DTYPE), input_precision=PREC)
    for b in tl.static_range(NBANDS):
        for j0 in range(0, COUNTS[b], BR):
            j = j0 + tl.arange(0, BR)
            jm = j < COUNTS[b]
            tt = tl.load(t_ptr + m[:, None] * stride_tm + J_OFFS[b] + j[None, :], mask=mm[:, None] & jm[None, :], other=0.0)
            ut = dequant_band(
                u_ptr, us_ptr, uz_ptr, j[:, None], n[None, :], jm[:, None] & nm[None, :],
                BITS[b], COUNTS[b], OUT, U_OFFS[b], SCALE_ROWS[b], GROUP, NG_OUT,
            )
            s = tl.load(s_ptr + J_OFFS[b] + j, mask=jm, other=0.0)
            ut = ut * row_multiplier(s, 3)[:, None]
            acc += tl.dot(tt.to(X_DTYPE), ut.to(X_DTYPE), input_precision=PREC)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def tproj_launch_args(x2, factors: PackedFactors, layout: BandLayout, config: dict | None = None):
    M, IN = x2.shape
    cfg = tproj_config(M, fp32=x2.dtype == torch.float32)
    if config:
        cfg.update(config)
    num_warps, num_stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
    chunks = chunk_starts(layout.counts, cfg["BR"])
    split_k = cfg.setdefault("SPLIT_K", 1)
    alloc = torch.zeros if split_k > 1 else torch.empty
    t = alloc(M, max(layout.rank, 1), dtype=torch.float32, device=x2.device)
    f = factors
    args = (x2, _nonempty(f.v_packed), _nonempty(f.v_scale), _nonempty(f.v_zero), _nonempty(f.s), t, M, x2.stride(0),
            t.stride(0))
    kwargs = dict(
        IN=IN, GROUP=layout.group_size, NG_IN=layout.v_groups, NBANDS=layout.nbands, BITS=layout.bits,
        COUNTS=layout.counts, V_OFFS=layout.v_offsets, SCALE_ROWS=layout.scale_rows, J_OFFS=layout.rank_offsets,
        CHUNKS=chunks, PREC=_prec(x2.dtype), num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return _tproj_kernel, (triton.cdiv(M, cfg["BM"]), chunks[-1], split_k), args, kwargs, t


def gemm_launch_args(x2, base_weight, t, factors: PackedFactors, layout: BandLayout, config: dict | None = None):
    M, IN = x2.shape
    OUT = base_weight.shape[0]
    cfg = gemm_config(M, fp32=x2.dtype == torch.float32)
    if config:
        cfg.update(config)
    num_warps, num_stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
    y = torch.empty(M, OUT, dtype=x2.dtype, device=x2.device)
    f = factors
    args = (
        x2, base_weight, t, _nonempty(f.u_packed), _nonempty(f.u_scale), _nonempty(f.u_zero), _nonempty(f.s), y,
        M, x2.stride(0), base_weight.stride(0), base_weight.stride(1), t.stride(0), y.stride(0),
    )
    kwargs = dict(
        IN=IN, OUT=OUT, GROUP=layout.group_size, NG_OUT=layout.u_groups, NBANDS=layout.nbands, BITS=layout.bits,
        COUNTS=layout.counts, U_OFFS=layout.u_offsets, SCALE_ROWS=layout.scale_rows, J_OFFS=layout.rank_offsets,
        PREC=_prec(x2.dtype), num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(OUT, cfg["BN"]),)
    return _gemm_kernel, grid, args, kwargs, y


def delta_gemm_fused(x2, base_weight, factors: PackedFactors, layout: BandLayout, tproj: dict | None = None,
                     gemm: dict | None = None) -> torch.Tensor:
    """Tensor-core path for x2 (M, in) contiguous rows; returns (M, out) in x2.dtype. `factors`:
    contiguous tensors, fp32 `s` (`dispatch.kernel_factors`)."""
    if layout.rank:
        kernel, grid, args, kwargs, t = tproj_launch_args(x2, factors, layout, tproj)
        kernel[grid](*args, **kwargs)
    else:
        t = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x2.device)
    kernel, grid, args, kwargs, y = gemm_launch_args(x2, base_weight, t, factors, layout, gemm)
    kernel[grid](*args, **kwargs)
    return y


def delta_gemm_dequant(x2, base_weight, factors: PackedFactors, layout: BandLayout) -> torch.Tensor:
    """Dequantise both factors (Triton), then three cuBLAS matmuls, in x2.dtype."""
    y = torch.nn.functional.linear(x2, base_weight.to(x2.dtype))
    if layout.rank == 0:
        return y
    v = dequantize_factor_triton(factors, layout, "v", x2.dtype, MULT_SQRT)
    ut = dequantize_factor_triton(factors, layout, "u", x2.dtype, MULT_SIGNED_SQRT)
    return torch.addmm(y, x2 @ v.T, ut)
