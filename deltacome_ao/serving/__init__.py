"""Multi-tenant serving: one base model, many deltas, mixed in one batch.

    routing.py   which row uses which delta (`Routing`, the `routing(...)` context, the errors)
    layers.py    the multi-delta layers (linear, embedding, leaf modules) and their shared registry
    model.py     `MultiDeltaModel`: loads artifacts, wraps the modules they touch, routes a batch

The grouped low-rank step is the `deltacome::segmented_delta_linear` operator (`ops.py`; the Triton
kernel is its CUDA implementation). See docs/serving.md.
"""

from __future__ import annotations

from ..factors import PackedFactors
from ..ops import segmented_delta_linear, segmented_delta_linear_reference, segmented_reference, unflatten_segments
from .layers import DeltaEntry, MultiDeltaEmbedding, MultiDeltaLayer, MultiDeltaLinear, MultiDeltaModule, wrap_module
from .model import MultiDeltaModel
from .routing import (
    BASE,
    DeltaInUseError,
    Routing,
    UnknownDeltaError,
    UnsupportedDeltaError,
    current_routing,
    resolve_routing,
    routing,
)

__all__ = [
    "MultiDeltaLinear", "MultiDeltaEmbedding", "MultiDeltaModule", "MultiDeltaLayer", "MultiDeltaModel", "DeltaEntry",
    "Routing", "routing", "current_routing", "resolve_routing", "wrap_module", "UnknownDeltaError", "DeltaInUseError",
    "UnsupportedDeltaError", "BASE",
    # kept for one release (0.1 names)
    "DeltaFactors", "segmented_delta_reference", "register_segmented_backend",
]


class DeltaFactors:
    """Deprecated (0.1): the packed factors of a served delta are `factors.PackedFactors`;
    `DeltaFactors.from_tensor(t)` returns `t.low_rank_factors()` on `device`."""

    @staticmethod
    def from_tensor(t, device=None, cache: bool = False) -> PackedFactors:
        f = t.low_rank_factors()
        return f.to(device) if device is not None else f


def segmented_delta_reference(y, x, groups, factors):
    """Deprecated (0.1) form of `ops.segmented_reference`: `groups` [(delta id, rows)], `factors`
    {delta id: PackedFactors}."""
    return segmented_reference(y, x, [(rows, factors[d]) for d, rows in groups if factors.get(d) is not None])


def register_segmented_backend(device_type: str, fn):
    """Deprecated (0.1): make `fn(y, x, groups, factors)` — `groups` [(delta id, rows)], `factors`
    {delta id: PackedFactors}, `y` updated in place and returned — the implementation of
    `deltacome::segmented_delta_linear` for `device_type`; None restores the reference path. Register
    on the op directly instead (`segmented_delta_linear.register_kernel(device_type)`, docs/extending.md)."""
    if fn is None:
        segmented_delta_linear.register_kernel(device_type)(segmented_delta_linear_reference)
        return

    def impl(y, x, rows, tensors, bits, counts, nbands, group_sizes):
        groups = unflatten_segments(rows, tensors, bits, counts, nbands, group_sizes, y.shape[-1], x.shape[-1])
        return fn(y.clone(), x, [(i, r) for i, (r, _) in enumerate(groups)], {i: f for i, (_, f) in enumerate(groups)})

    segmented_delta_linear.register_kernel(device_type)(impl)
