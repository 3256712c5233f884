"""PEFT-style controls of `MultiDeltaModel`: switch every delta off for a block, and combine deltas.

- `disable_deltas(model)`: inside the block every row of `model` runs the base (deltas stay
  loaded; PEFT's `disable_adapter()`). Per thread / task (a context variable, like the routing),
  so a server's other requests keep their deltas.
- `weighted_artifact(...)`: the linear combination Σ wᵢ Δᵢ of loaded deltas, re-compressed with one
  method / alpha (the SVD of the weighted dense sum, layer by layer) and written as a delta
  artifact; `MultiDeltaModel.add_weighted_delta` loads it as a new delta. Kept (dense) tensors
  combine the same way: `base + Σ wᵢ (tensorᵢ − base)`.

`MultiDeltaModel.unload()` (in model.py) gives back the base model untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..artifact import save_delta, set_tensor
from ..config import DeltaCoMeConfig
from ..methods import handing_over_base
from .routing import UnknownDeltaError

__all__ = ["disable_deltas", "deltas_disabled", "weighted_artifact"]

_DISABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("deltacome_disabled", default=frozenset())


@contextlib.contextmanager
def disable_deltas(model: torch.nn.Module):
    """Every row of `model` (a `MultiDeltaModel`) runs the base inside the block."""
    token = _DISABLED.set(_DISABLED.get() | {id(model)})
    try:
        yield model
    finally:
        _DISABLED.reset(token)


def deltas_disabled(model: torch.nn.Module) -> bool:
    return id(model) in _DISABLED.get()


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _combined_config(documents: Mapping[str, Mapping], overrides: Mapping[str, Any]) -> dict:
    """method / alpha / group_size / allocation of the combination: the sources' common values,
    unless given."""
    out = {}
    for field in ("method", "alpha", "group_size", "allocation"):
        if overrides.get(field) is not None:
            out[field] = overrides[field]
            continue
        values = {repr(d.get(field)) for d in documents.values()}
        value = next(iter(documents.values())).get(field)
        if len(values) > 1 or value is None:
            raise ValueError(f"the deltas combined do not record one {field} ({sorted(values)}); pass {field}=")
        out[field] = value
    return out


def weighted_artifact(layers: Mapping[str, torch.nn.Module], skeleton: torch.nn.Module,
                      documents: Mapping[str, Mapping], weights: Mapping[str, float], out_dir: str | os.PathLike,
                      **overrides: Any) -> Path:
    """Write Σ wᵢ Δᵢ of the named loaded deltas as an artifact at `out_dir`; returns its path.

    layers: the model's multi-delta layers by module name; skeleton: the plain base module tree
    (sharing the base's tensors); documents: each loaded delta's `delta_config.json`.
    overrides: method, alpha, group_size, allocation (default: the sources' common values).
    Calibrated (GPTQ) sources are re-compressed data-free (RTN): no calibration data is at hand."""
    if not weights:
        raise ValueError("give at least one {delta name: weight}")
    unknown = sorted(set(weights) - set(documents))
    if unknown:
        raise UnknownDeltaError(f"no delta named {unknown}; loaded: {sorted(documents)}")
    for n, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"weight of {n!r} must be a finite number, got {w!r}")
    fields = _combined_config({n: documents[n] for n in weights}, overrides)
    config = DeltaCoMeConfig(base={}, progress=False, **fields)
    model = _structural_copy(skeleton)
    with torch.no_grad():
        for module_name, layer in layers.items():
            entries, names = layer._registry.entries, layer._registry.names  # one consistent snapshot
            used = [(entries[names[n]], float(w)) for n, w in weights.items() if n in names]
            target = model.get_submodule(module_name)
            compressed = [(e.delta, w) for e, w in used if e.delta is not None]
            if compressed:
                base_w = target.weight.detach()
                total = sum(w * d.delta_weight().float() for d, w in compressed)
                # the weight may hold base_w as it is (no copy of the base per layer): `model` only lives
                # until save_delta below has written the deltas, and nothing changes base_w meanwhile
                new = handing_over_base(config).compress(base_w.float() + total, base_w, module_name)
                target.weight = torch.nn.Parameter(new, requires_grad=False)
            leaves = sorted({leaf for e, _ in used for leaf in (e.dense or {})})
            for leaf in leaves:
                base_t = getattr(target, leaf).detach()
                value = base_t.float() + sum(w * (e.dense[leaf].float() - base_t.float())
                                             for e, w in used if e.dense and leaf in e.dense)
                set_tensor(model, f"{module_name}.{leaf}" if module_name else leaf, value.to(base_t.dtype))
    metadata = {"weighted_combination": {n: float(w) for n, w in weights.items()},
                "sources": {n: documents[n].get("user") for n in weights}}
    return save_delta(model, out_dir, base=skeleton, config=config, metadata=metadata, overwrite=True,
                      **_base_fields(documents, weights))


def _base_fields(documents: Mapping[str, Mapping], weights: Mapping[str, float]) -> dict:
    names = {documents[n].get("base_model_name_or_path") for n in weights}
    revisions = {documents[n].get("base_revision") for n in weights}
    out: dict[str, Optional[str]] = {}
    if len(names) == 1 and None not in names:
        out["base_model_name_or_path"] = names.pop()
        if len(revisions) == 1:
            out["base_revision"] = revisions.pop()
    return out
