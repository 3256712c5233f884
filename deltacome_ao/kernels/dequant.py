"""Dequantise a whole packed factor to a dense (rank, length) matrix in one launch.

Used by the "dequantise once, then cuBLAS" prefill path: at thousands of tokens the three matmuls
are compute bound and cuBLAS beats anything hand-written, while the dequantisation itself only
reads the packed codes once (≈2 MB for a 4096² layer at 1 bit/param) and writes rank × length
values of the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..factors import PackedFactors
from .common import dequant_band
from .configs import dequant_config
from .layout import BandLayout, chunk_starts

__all__ = ["dequantize_factor_triton", "dequant_launch_args", "MULT_NONE", "MULT_S", "MULT_SQRT", "MULT_SIGNED_SQRT"]

# How the per-row multiplier is derived from s (a row j of the result is scaled by it).
MULT_NONE, MULT_S, MULT_SQRT, MULT_SIGNED_SQRT = 0, 1, 2, 3


@triton.jit
def row_multiplier(s, MODE: tl.constexpr):
    """sqrt(|s|) on one side and sign(s)·sqrt(|s|) on the other keeps both low-rank matmuls in the
    range of fp16 (s absorbs the max-abs normalisation of both singular vectors, so it can be large)."""
    if MODE == 1:
        m = s
    elif MODE == 2:
        m = tl.sqrt(tl.abs(s))
    elif MODE == 3:
        m = tl.where(s < 0, -tl.sqrt(tl.abs(s)), tl.sqrt(tl.abs(s)))
    else:
        m = tl.full(s.shape, 1.0, tl.float32)
    return m


@triton.jit
def _dequant_kernel(
    buf_ptr, scale_ptr, zero_ptr, s_ptr, out_ptr, stride_out,
    LENGTH: tl.constexpr, GROUP: tl.constexpr, NGROUPS: tl.constexpr,
    BITS: tl.constexpr, COUNTS: tl.constexpr, OFFSETS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    RANK_OFFSETS: tl.constexpr, CHUNKS: tl.constexpr, NBANDS: tl.constexpr,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_r = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    nm = n < LENGTH
    for b in tl.static_range(NBANDS):
        if (pid_r >= CHUNKS[b]) & (pid_r < CHUNKS[b + 1]):
            j = (pid_r - CHUNKS[b]) * BLOCK_R + tl.arange(0, BLOCK_R)
            jm = j < COUNTS[b]
            mask = jm[:, None] & nm[None, :]
            v = dequant_band(
                buf_ptr, scale_ptr, zero_ptr, j[:, None], n[None, :], mask,
                BITS[b], COUNTS[b], LENGTH, OFFSETS[b], SCALE_ROWS[b], GROUP, NGROUPS,
            )
            s = tl.load(s_ptr + RANK_OFFSETS[b] + j, mask=jm, other=0.0)
            v = v * row_multiplier(s, MODE)[:, None]
            rows = RANK_OFFSETS[b] + j
            tl.store(out_ptr + rows[:, None] * stride_out + n[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Triton wants a real pointer even for a table the kernel never reads."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def dequant_launch_args(factors: PackedFactors, layout: BandLayout, which: str, dtype=torch.float32,
                        mode: int = MULT_NONE, config: dict | None = None):
    """(kernel, grid, args, kwargs) of one whole-factor dequantisation; args[4] is the output."""
    packed, scale, zero, s = (getattr(factors, f"{which}_packed"), getattr(factors, f"{which}_scale"),
                              getattr(factors, f"{which}_zero"), factors.s)
    length = layout.in_features if which == "v" else layout.out_features
    offsets = layout.v_offsets if which == "v" else layout.u_offsets
    ngroups = layout.v_groups if which == "v" else layout.u_groups
    out = torch.empty(layout.rank, length, dtype=dtype, device=packed.device)
    cfg = dequant_config()
    if config:
        cfg.update(config)
    chunks = chunk_starts(layout.counts, cfg["BLOCK_R"])
    grid = (chunks[-1], triton.cdiv(length, cfg["BLOCK_L"]))
    args = (_nonempty(packed), _nonempty(scale.contiguous()), _nonempty(zero.contiguous()), _nonempty(s.contiguous()),
            out, out.stride(0))
    kwargs = dict(
        LENGTH=length, GROUP=layout.group_size, NGROUPS=ngroups,
        BITS=layout.bits, COUNTS=layout.counts, OFFSETS=offsets, SCALE_ROWS=layout.scale_rows,
        RANK_OFFSETS=layout.rank_offsets, CHUNKS=chunks, NBANDS=layout.nbands, MODE=mode,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_L=cfg["BLOCK_L"], num_warps=cfg.get("num_warps", 4),
    )
    return _dequant_kernel, grid, args, kwargs


def dequantize_factor_triton(factors: PackedFactors, layout: BandLayout, which: str, dtype=torch.float32,
                             mode: int = MULT_NONE, config: dict | None = None) -> torch.Tensor:
    """Dense (rank, length) factor (`which` = "v": V̂, rows of length in; "u": Ûᵀ, rows of length out),
    row j multiplied by `row_multiplier(s[j], mode)`, in `dtype`."""
    kernel, grid, args, kwargs = dequant_launch_args(factors, layout, which, dtype, mode, config)
    out = args[4]
    if out.numel():
        kernel[grid](*args, **kwargs)
    return out
