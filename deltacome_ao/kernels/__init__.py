"""Kernels for the `deltacome::` operators: Triton on CUDA, a small C kernel on CPU.

Importing this package is cheap and safe anywhere: it does not import triton. When triton is
installed it registers CUDA implementations of `deltacome::delta_linear` (`dispatch.py`: fused GEMV,
fused GEMM or dequantise + cuBLAS by token count) and `deltacome::segmented_delta_linear`
(`segmented.py`: many deltas in one batch); the kernel modules are imported at the first CUDA call.
On CPU, `cpu.py` registers a C kernel (built with the system compiler at first use, reference path
as the fallback) for `delta_linear`, `delta_only_linear` and `segmented_delta_linear`. The registered
functions launch plain Triton kernels inside the opaque custom ops, so `torch.compile(fullgraph=True)`
sees one node and CUDA graphs capture the launches (no autotuning, no host syncs on that path).

See docs/kernels.md for the design.
"""

from __future__ import annotations

import importlib.util

from ..factors import PackedFactors
from ..ops import delta_linear, segmented_delta_linear
from . import cpu

__all__ = ["HAS_TRITON", "registered", "delta_linear_cuda", "segmented_delta_linear_cuda"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
registered = False


def delta_linear_cuda(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts,
                       group_size):
    from .dispatch import delta_linear_triton

    f = PackedFactors(v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size,
                      *base_weight.shape)
    return delta_linear_triton(x, base_weight, f)


def segmented_delta_linear_cuda(y, x, rows, tensors, bits, counts, nbands, group_sizes):
    from .segmented import segmented_delta_triton
    from ..ops import unflatten_segments

    groups = unflatten_segments(rows, tensors, bits, counts, nbands, group_sizes, y.shape[-1], x.shape[-1])
    return segmented_delta_triton(y.clone(), x, groups)


cpu.register()  # the library itself is built at the first CPU call

if HAS_TRITON:
    delta_linear.register_kernel("cuda")(delta_linear_cuda)
    segmented_delta_linear.register_kernel("cuda")(segmented_delta_linear_cuda)
    registered = True
