"""Choose a kernel by token count and run it: the CUDA implementation of `deltacome::delta_linear`.

    tokens <= decode_max_tokens      fused GEMV, one launch               (delta_gemv.py)
    tokens <= fused_gemm_max_tokens  fused tensor-core GEMM, two launches (delta_gemm.py; not for fp32 x)
    otherwise                        dequantise once + cuBLAS             (delta_gemm.py)

Thresholds come from `configs.dispatch_thresholds(device name)` (data, to be filled from GPU
measurements). Inputs the kernels do not cover (dtypes other than fp16/bf16/fp32, empty shapes)
fall back to the reference math of `deltacome_ao.ops`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..factors import PackedFactors
from ..ops import delta_linear_reference
from .configs import dispatch_thresholds
from .delta_gemm import delta_gemm_dequant, delta_gemm_fused
from .delta_gemv import delta_gemv
from .layout import BandLayout, band_layout

__all__ = ["PATHS", "choose_path", "delta_linear_triton", "cached_layout", "kernel_factors"]

PATHS = ("gemv", "gemm_fused", "gemm_dequant")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def cached_layout(bits: tuple, counts: tuple, out_features: int, in_features: int, group_size: int) -> BandLayout:
    return band_layout(bits, counts, out_features, in_features, group_size)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def kernel_factors(factors: PackedFactors) -> PackedFactors:
    """The factors as the kernels read them: every tensor contiguous, `s` in fp32."""
    f = factors.map_tensors(lambda t: t.contiguous())
    return f if f.s.dtype == torch.float32 else dataclasses.replace(f, s=f.s.float())


def choose_path(tokens: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    th = dispatch_thresholds(_device_name(device) if device is not None else None)
    if tokens <= th["decode_max_tokens"]:
        return "gemv"
    # fp32 activations: the fused GEMM would run "ieee" fp32 dots on CUDA cores; cuBLAS is better.
    if tokens <= th["fused_gemm_max_tokens"] and dtype != torch.float32:
        return "gemm_fused"
    return "gemm_dequant"


def delta_linear_triton(x: torch.Tensor, base_weight: torch.Tensor, factors: PackedFactors,
                        path: str | None = None) -> torch.Tensor:
    """Same contract as `torch.ops.deltacome.delta_linear`; `path` forces one of `PATHS`."""
    out_features, in_features = base_weight.shape
    f = factors
    if (
        x.dtype not in _FLOATS or base_weight.dtype not in _FLOATS or x.shape[-1] != in_features
        or x.numel() == 0 or out_features == 0 or in_features == 0
    ):
        return delta_linear_reference(x, base_weight, f)
    layout = cached_layout(f.bits, f.counts, out_features, in_features, f.group_size)
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    path = path or choose_path(tokens, x.device, x.dtype)
    args = (x2, base_weight, kernel_factors(f), layout)
    if path == "gemv":
        y = delta_gemv(*args)
    elif path == "gemm_fused":
        y = delta_gemm_fused(*args)
    elif path == "gemm_dequant":
        y = delta_gemm_dequant(*args)
    else:
        raise ValueError(f"unknown path {path!r}; choose from {PATHS}")
    return y.reshape(*x.shape[:-1], out_features)
