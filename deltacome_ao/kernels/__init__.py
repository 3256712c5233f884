"""Triton kernels for `deltacome::delta_linear`, registered as its CUDA implementation.

Importing this package is cheap and safe anywhere: it does not import triton. When triton is
installed it registers `_cuda_impl` for the "cuda" dispatch key; the first CUDA call imports the
kernel modules (`dispatch.py`, `delta_gemv.py`, `delta_gemm.py`, `dequant.py`). CPU tensors keep
using the reference implementation in `deltacome_ao.ops`. The registered function launches plain
Triton kernels inside the opaque custom op, so `torch.compile(fullgraph=True)` sees one node and
CUDA graphs capture the launches (no autotuning, no host syncs on that path).

See docs/kernels.md for the design.
"""

from __future__ import annotations

import importlib.util

from ..ops import delta_linear

__all__ = ["HAS_TRITON", "registered"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
registered = False


def _cuda_impl(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
    from .dispatch import delta_linear_triton

    return delta_linear_triton(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts,
                               group_size)


def _segmented_cuda(y, x, groups, factors):
    from .segmented import segmented_delta_triton

    return segmented_delta_triton(y, x, groups, factors)


if HAS_TRITON:
    delta_linear.register_kernel("cuda")(_cuda_impl)
    registered = True
    # multi-delta serving seam (segmented.py); serving imports no triton either
    from ..serving import register_segmented_backend

    register_segmented_backend("cuda", _segmented_cuda)
