"""Undo `artifact.load_delta`: `unload(model)` gives the base back, bit for bit.

`load_delta` swaps tensors into the base it is given (each compressed layer's weight becomes a
tensor subclass around the base's own weight; kept tensors — embeddings, norms, lm_head — replace
the base's). Before the swap it hands the objects it replaces to `remember`; `unload` puts exactly
those objects back (the same `nn.Parameter`s, so identity, `requires_grad` and every byte are the
base's), PEFT's `unload()` for the single-delta path. Memory: the replaced compressed-layer weights
share their storage with the compressed tensors' `base_weight` (nothing extra); the replaced kept
tensors are the base's originals, held until `unload` or `forget` (for a 7B Llama whose fine-tune
changed the embeddings and lm_head: 2 × 250 MiB in bf16). `load_delta(..., keep_originals=False)`
keeps nothing (then `unload` refuses).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping

import torch

from .checkpoint import unaliased
from .fingerprint import VERIFY_LEVELS, check_base

__all__ = ["LoadRecord", "remember", "forget", "loaded_deltas", "replaced_tensors", "unload"]


@dataclass
class LoadRecord:
    """One `load_delta` onto a model: where the delta came from, the objects it replaced (by tensor
    name) and the base fingerprint it was checked against."""

    delta_dir: str
    replaced: dict
    fingerprint: Mapping


_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, list[LoadRecord]]" = weakref.WeakKeyDictionary()


def remember(model: torch.nn.Module, record: LoadRecord) -> None:
    """Called by `load_delta` just before it swaps tensors in."""
    _LOADED.setdefault(model, []).append(record)


def forget(model: torch.nn.Module) -> None:
    """Drop what `load_delta` kept for `unload` (frees the base's replaced kept tensors)."""
    _LOADED.pop(model, None)


def loaded_deltas(model: torch.nn.Module) -> list[str]:
    """The artifact directories `load_delta` put onto `model` (that `unload` would take off)."""
    return [r.delta_dir for r in _LOADED.get(model, [])]


def replaced_tensors(model: torch.nn.Module) -> dict:
    """{tensor name: the base's object} of everything `load_delta` replaced on `model` (the first
    record wins: that is the base's own tensor)."""
    out = {}
    for record in _LOADED.get(model, []):
        for name, t in record.replaced.items():
            out.setdefault(name, t)
    return out


def _put(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise ValueError(f"{name}: the model has no such parameter or buffer any more; cannot restore it")


def unload(model: torch.nn.Module, verify: str = "none") -> torch.nn.Module:
    """Take every delta `load_delta` put onto `model` off again and return the base, with exactly
    the parameter and buffer objects it had before (bit-exact, same identities).

    verify: "sample" / "full" also check the result against the base fingerprint the delta recorded
    (`BaseMismatchError` if, e.g., the base's tensors were modified in place since); "none" trusts
    the restored objects. Raises ValueError when nothing was loaded with `load_delta` (or with
    `keep_originals=False`)."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    records = _LOADED.get(model)
    if not records:
        raise ValueError("no delta was put onto this model by load_delta (with keep_originals=True); nothing to unload")
    for record in reversed(records):
        for name, original in record.replaced.items():
            _put(model, name, original)
    _LOADED.pop(model, None)
    if verify != "none":
        state, _ = unaliased(model.state_dict(keep_vars=False).items())
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        for record in records:
            check_base(record.fingerprint, state, model_type, verify, what=f"the unloaded base (of {record.delta_dir})")
    return model
