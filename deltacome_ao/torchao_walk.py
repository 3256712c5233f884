"""What the running torchao `quantize_` call is doing — the one place that reads torchao's internals.

torchao 0.18 calls a config's handler as `handler(module, config)`, one module at a time, without
the module's name or the model. Delta compression needs both (the base weight is found by name,
and the whole model is compressed all-or-nothing), so the `quantize_` shortcut of `DeltaCoMeConfig`
asks this module which walk it is in. Two call paths exist in the pinned torchao:

- `quantize_(model, config, filter_fn, device)` recurses through
  `_replace_with_custom_fn_if_matches_filter(model, replacement_fn, filter_fn, cur_fqn, device, ...)`:
  the outermost such frame holds the root `model`, `filter_fn` and `device`;
- `quantize_(model, FqnToConfig({...}))` calls `_fqn_to_config_handler(module, fqn, config)` per
  matching module: that frame holds the module's `fqn`, and `quantize_`'s frame holds `model`.

`tests/test_torchao_contract.py` pins these names against the installed torchao, so an upgrade that
changes them fails loudly there instead of silently compressing the wrong way. Everything else
uses `compress_(model, config)`, which needs none of this.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["Walk", "current_walk", "WALK_FUNCTION", "FQN_FUNCTION", "QUANTIZE_FUNCTION", "DEFAULT_FILTER"]

WALK_FUNCTION = "_replace_with_custom_fn_if_matches_filter"
FQN_FUNCTION = "_fqn_to_config_handler"
QUANTIZE_FUNCTION = "quantize_"
DEFAULT_FILTER = "_is_linear"  # quantize_'s filter_fn when none is given (torchao.quantization.quant_api)


@dataclass(frozen=True)
class Walk:
    """One running `quantize_` call: its root model, and either the filter and device of a module
    walk, or the fully qualified name of the one module an `FqnToConfig` entry hands over."""

    frame: Any  # the call's outermost torchao frame: identifies the running call
    root: torch.nn.Module
    filter_fn: Optional[Callable] = None
    device: Any = None
    fqn: Optional[str] = None
    exact: bool = False  # FqnToConfig: the entry names this module exactly (not a pattern or _default)

    @property
    def user_filter(self) -> Optional[Callable]:
        """The filter the caller passed to `quantize_`, or None when it is torchao's default (every
        `nn.Linear`): then the config's own selection applies (Conv1D and stacked experts too)."""
        f = self.filter_fn
        if f is not None and getattr(f, "__name__", None) == DEFAULT_FILTER and "torchao" in getattr(f, "__module__", ""):
            return None
        return f


def current_walk() -> Optional[Walk]:
    """The torchao `quantize_` call the caller runs inside, or None (called directly)."""
    frame, walk, fqn, quantize = sys._getframe(1), None, None, None
    while frame is not None:
        name = frame.f_code.co_name
        if name == WALK_FUNCTION:
            walk = frame  # keep going: the outermost one has the root
        elif name == FQN_FUNCTION and fqn is None:
            fqn = frame
        elif name == QUANTIZE_FUNCTION and "torchao" in frame.f_code.co_filename:
            quantize = frame
            break
        frame = frame.f_back
    if walk is not None:
        local = walk.f_locals
        return Walk(walk, local["model"], filter_fn=local["filter_fn"], device=local.get("device"))
    if fqn is not None and quantize is not None:
        name, mapping = fqn.f_locals["fqn"], getattr(fqn.f_locals.get("config"), "fqn_to_config", {})
        return Walk(fqn, quantize.f_locals["model"], device=quantize.f_locals.get("device"), fqn=name,
                    exact=name in mapping or f"{name}.weight" in mapping)
    return None
