"""Multi-tenant serving: one base model, many deltas, mixed in one batch.

    routing.py   which row uses which delta (`Routing`, the `routing(...)` context, the errors)
    layers.py    the multi-delta layers (linear, embedding, leaf modules) and their shared registry
    model.py     `MultiDeltaModel`: loads artifacts, wraps the modules they touch, routes a batch

The grouped low-rank step is the `deltacome::segmented_delta_linear` operator (`ops.py`; the Triton
kernel is its CUDA implementation). See docs/serving.md.
"""

from __future__ import annotations

from ..factors import PackedFactors
from ..ops import segmented_reference
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
    "DeltaFactors", "segmented_delta_reference",
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
