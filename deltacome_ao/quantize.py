"""Stage 3: group-wise asymmetric quantization of singular vectors.

Each row is one singular vector (a row of Vh, or a column of U stored as a row), split into groups
of `group_size` along its length. Rows are scaled to max |x| = 1 beforehand (the factor goes into S),
so fp16 scales never underflow, whatever the magnitude of the delta. The math is torchao's
`choose_qparams_affine` / `quantize_affine` / `dequantize_affine`; this module only fixes the
storage dtypes (fp16 scale, uint8 zero-point) and the ragged last group.

`quantize_rows` is the RTN (data-free) quantizer; a calibrated quantizer (GPTQ) returns the same
`QuantizedRows` and plugs in at the same place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

from .allocate import FP16_BITS

__all__ = ["QuantizedRows", "quantize_rows", "dequantize_rows"]


@dataclass
class QuantizedRows:
    """`codes` (r, L) uint8 (fp16 values when bits == 16); `scale` fp16 and `zero` uint8, (r, groups)."""

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _pad_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad the last group by repeating the last column: leaves that group's min/max unchanged."""
    length = x.shape[-1]
    padded = math.ceil(length / group_size) * group_size
    if padded == length:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, padded - length)], dim=-1)


def quantize_rows(x: torch.Tensor, bits: int, group_size: int) -> QuantizedRows:
    """Round-to-nearest quantization of each row of `x` (r, L) to `bits` bits, group-wise."""
    r, length = x.shape
    if bits == FP16_BITS:
        empty = x.new_zeros(r, 0)
        return QuantizedRows(bits, x.to(torch.float16), empty.to(torch.float16), empty.to(torch.uint8))
    x = x.float()
    groups = math.ceil(length / group_size)
    if r == 0:
        return QuantizedRows(
            bits,
            torch.zeros(0, length, dtype=torch.uint8, device=x.device),
            torch.zeros(0, groups, dtype=torch.float16, device=x.device),
            torch.zeros(0, groups, dtype=torch.uint8, device=x.device),
        )
    xp = _pad_groups(x, group_size)
    block = (1, group_size)
    qmax = (1 << bits) - 1
    scale, zero = choose_qparams_affine(
        xp, MappingType.ASYMMETRIC, block, torch.uint8, 0, qmax,
        eps=torch.finfo(torch.float16).tiny, scale_dtype=torch.float32, zero_point_dtype=torch.int32,
    )
    scale = scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)
    codes = quantize_affine(xp, block, scale, zero, torch.uint8, 0, qmax)
    return QuantizedRows(
        bits,
        codes[:, :length].contiguous(),
        scale.view(r, groups).to(torch.float16),
        zero.view(r, groups).to(torch.uint8),
    )


def dequantize_rows(q: QuantizedRows, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to rounding), fp32 (r, L)."""
    return dequantize_codes(q.codes, q.scale, q.zero, q.bits, group_size)


def dequantize_codes(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    if bits == FP16_BITS:
        return codes.float()
    r, length = codes.shape
    if r == 0:
        return torch.zeros(0, length, device=codes.device)
    groups = scale.shape[-1]
    padded = groups * group_size
    c = torch.nn.functional.pad(codes, (0, padded - length)) if padded != length else codes
    out = dequantize_affine(
        c, (1, group_size), scale.float(), zero.to(torch.int32), torch.uint8, 0, (1 << bits) - 1,
        output_dtype=torch.float32,
    )
    return out[:, :length]
