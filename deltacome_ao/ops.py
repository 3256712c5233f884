"""The `deltacome::delta_linear` operator: `x @ W_base.T + ((x @ V̂.T) * s) @ Û.T`.

Registered with `torch.library` so `torch.compile(fullgraph=True)` treats it as one opaque node.
The implementation here is the reference path (any device): it unpacks the factors and runs three
matmuls, never forming the dense delta. `deltacome_ao.kernels` registers the fused Triton kernel
for CUDA on the same operator; nothing here depends on it.
"""

from __future__ import annotations

import torch

from .allocate import FP16_BITS
from .packing import band_offsets, unpack_rows
from .quantize import dequantize_codes

__all__ = ["dequantize_factor", "dequantize_factors", "low_rank_term", "delta_linear", "delta_linear_reference",
           "delta_only_linear"]


def dequantize_factor(packed, scale, zero, bits, counts, length: int, group_size: int) -> torch.Tensor:
    """All bands of one factor (V̂ as (r, in) or Ûᵀ as (r, out)), fp32."""
    rows, q_row = [], 0
    for b, c, (start, end) in zip(bits, counts, band_offsets(bits, counts, length)):
        codes = unpack_rows(packed[start:end], b, c, length)
        if b == FP16_BITS:
            rows.append(codes.float())
            continue
        rows.append(dequantize_codes(codes, scale[q_row:q_row + c], zero[q_row:q_row + c], b, group_size))
        q_row += c
    if not rows:
        return torch.zeros(0, length, device=packed.device)
    return torch.cat(rows)


def dequantize_factors(out_features: int, in_features: int, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero,
                       bits, counts, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V̂ (r, in), Ûᵀ (r, out)) in fp32 for one compressed weight."""
    v = dequantize_factor(v_packed, v_scale, v_zero, bits, counts, in_features, group_size)
    ut = dequantize_factor(u_packed, u_scale, u_zero, bits, counts, out_features, group_size)
    return v, ut


def low_rank_term(x: torch.Tensor, v: torch.Tensor, ut: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`((x V̂ᵀ) * s) Ûᵀ` in fp32: its inputs are tiny compared with the base output."""
    return ((x.float() @ v.T) * s) @ ut


def delta_linear_reference(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts,
                           group_size: int) -> torch.Tensor:
    """The reference path of `delta_linear` (also the kernels' fallback for unsupported inputs)."""
    v, ut = dequantize_factors(*base_weight.shape, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, bits, counts,
                               group_size)
    y = torch.nn.functional.linear(x, base_weight.to(x.dtype))
    return (y.float() + low_rank_term(x, v, ut, s)).to(x.dtype)


@torch.library.custom_op("deltacome::delta_linear", mutates_args=())
def delta_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    u_packed: torch.Tensor,
    u_scale: torch.Tensor,
    u_zero: torch.Tensor,
    s: torch.Tensor,
    bits: list[int],
    counts: list[int],
    group_size: int,
) -> torch.Tensor:
    return delta_linear_reference(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts,
                                  group_size)


@delta_linear.register_fake
def _(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
    return x.new_empty(*x.shape[:-1], base_weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size = inputs
    ctx.save_for_backward(base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s)
    ctx.meta = (bits, counts, group_size, x.dtype)


def _backward(ctx, grad):
    """Gradient for the input only: the compressed weight is frozen."""
    base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s = ctx.saved_tensors
    bits, counts, group_size, dtype = ctx.meta
    v, ut = dequantize_factors(*base_weight.shape, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, bits, counts,
                               group_size)
    g = grad.float()
    grad_x = g @ base_weight.float() + ((g @ ut.T) * s) @ v
    return (grad_x.to(dtype),) + (None,) * 11


delta_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("deltacome::delta_only_linear", mutates_args=())
def delta_only_linear(
    x: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    u_packed: torch.Tensor,
    u_scale: torch.Tensor,
    u_zero: torch.Tensor,
    s: torch.Tensor,
    bits: list[int],
    counts: list[int],
    out_features: int,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """The delta term alone, `((x @ V̂.T) * s) @ Û.T`, fp32 inside, `x.dtype` out: used when the base
    weight is itself a quantized tensor subclass (which a custom op cannot take as input), so the
    base term runs through that subclass's own `F.linear`."""
    v, ut = dequantize_factors(out_features, in_features, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, bits,
                               counts, group_size)
    return low_rank_term(x, v, ut, s).to(x.dtype)


@delta_only_linear.register_fake
def _(x, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, out_features, in_features, group_size):
    return x.new_empty(*x.shape[:-1], out_features)
