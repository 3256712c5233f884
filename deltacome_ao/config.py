"""`DeltaCoMeConfig` and its torchao `quantize_` handler.

`quantize_(model, DeltaCoMeConfig(base=...))` is the torchao-style shortcut to
`compress_(model, config)` (`compress.py`): torchao hands the handler one module at a time, so on
the first call of a `quantize_` run the handler asks `torchao_walk` for the model being converted,
plans every layer with `compress.plan_compression` (nothing changes yet), and this and the following
calls swap in the precomputed weights. The run's state lives here, keyed by the running call — never
on the config, which stays a plain value (a copy of it shares the base and copies no model).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .allocate import OPTIMAL_CANDIDATES, SUPPORTED_BITS
from .checkpoint import BaseWeights
from .compress import (
    compressed_layers,
    config_fields,
    delta_report,
    matmul_layers,
    notify_compressed,
    plan_compression,
    record_skipped,
    select_layers,
    skipped_by_selection as _skipped,
    swap_in,
    walk_modules,
)
from .delta_tensor import DeltaTensor
from .methods import get_method, method_names
from .recipes import Recipe
from .torchao_walk import current_walk

__all__ = ["DeltaCoMeConfig", "deltacome_config", "SVD_METHODS", "ALLOCATIONS",
           "BaseWeights", "delta_report", "compressed_layers"]  # the last three: 0.1 import paths

SVD_METHODS = ("auto", "exact", "randomized")
ALLOCATIONS = ("paper", "optimal")


@dataclass
class DeltaCoMeConfig(AOBaseConfig):
    """Compress each selected linear layer's delta against `base`.

    base: the model the fine-tune started from — `nn.Module`, state dict or safetensors directory.
    alpha: delta bytes / fp16 bytes of each matrix, in (0, 1] (1/16 = 1 bit per parameter,
        everything stored counted).
    bands: explicit [(bits, count), ...] for every layer, overriding the budget-derived schedule.
    group_size: quantization group along each singular vector (>= 2).
    method: a registered method (`methods.method_names()`): "deltacome" (8/3/2-bit schedule), or a
        baseline at the same budget: "single" (every kept vector at `single_bits`), "lowrank" (top
        vectors in fp16), "bitdelta" (sign + one scale).
    svd: "auto" | "exact" | "randomized".
    recipe: which matmul weights to compress, by name; default from the model's `config.model_type`
        (every weight used as a matrix multiply: `nn.Linear`, `Conv1D`, stacked experts).
    embeddings: also compress the deltas of the input / position embeddings and the output head (kept
        exact by default, as in the paper).
    allocation: "paper" (the 8/3/2-bit schedule) or "optimal" (each singular vector's width from
        `candidates`, 0 = dropped, minimising the measured error within `alpha`); method "deltacome".
    calibration: None (data-free RTN) or an iterable of `input_ids` tensors (or dicts of model
        inputs): the factors are then quantized with GPTQ, layer by layer (see `calibrate.py`), with
        `damp` (fraction of the Hessian's mean diagonal), `act_order` and, if `target_correction`,
        Û quantized toward the target that best reproduces the layer's delta outputs.

    Every field is validated here; a bad value raises ValueError naming the valid range.
    """

    base: Any = None
    alpha: float = 1 / 16
    bands: Optional[Sequence[tuple[int, int]]] = None
    group_size: int = 128
    method: str = "deltacome"
    single_bits: int = 2
    svd: str = "auto"
    recipe: Optional[Recipe] = None
    progress: bool = True
    allocation: str = "paper"
    candidates: Sequence[int] = OPTIMAL_CANDIDATES
    calibration: Optional[Any] = field(default=None, repr=False, compare=False)
    damp: float = 0.01
    act_order: bool = True
    target_correction: bool = False
    embeddings: bool = False

    def __post_init__(self):
        if self.base is None:
            raise ValueError("DeltaCoMeConfig needs base=: the base model, its state dict or a safetensors directory")
        method = get_method(self.method)
        if not _is_number(self.alpha) or not (0 < self.alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1] (delta bytes / fp16 bytes; 1/16 = 1 bit per parameter), "
                             f"got {self.alpha!r}")
        if not _is_int(self.group_size) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (values per scale and zero-point), got {self.group_size!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"unknown svd {self.svd!r}; choose from {SVD_METHODS}")
        if self.single_bits not in SUPPORTED_BITS:
            raise ValueError(f"single_bits: unsupported bit-width {self.single_bits!r}; choose from {SUPPORTED_BITS}")
        if self.bands is not None:
            self.bands = tuple(self._band(b) for b in self.bands)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {ALLOCATIONS}")
        if self.allocation not in method.allocations:
            raise ValueError(f"allocation={self.allocation!r} needs a method that chooses widths itself "
                             f"(one of {[m for m in method_names() if self.allocation in get_method(m).allocations]}), "
                             f"not {self.method!r}")
        if self.allocation == "optimal":
            if not any(self.candidates) or any(b != 0 and b not in SUPPORTED_BITS for b in self.candidates):
                raise ValueError(f"candidates {tuple(self.candidates)}: use 0 (dropped) and widths from {SUPPORTED_BITS}")
        if self.calibration is not None and not method.calibrated:
            raise ValueError(f"calibration (GPTQ) applies to methods that quantize singular vectors, not to method={self.method!r}")
        if not _is_number(self.damp) or not (0 <= self.damp < math.inf):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if self.calibration is not None and not isinstance(self.calibration, (list, tuple, torch.Tensor)):
            self.calibration = list(self.calibration)  # an iterator would be used up by the first run
        if not isinstance(self.base, BaseWeights):
            self.base = BaseWeights(self.base)

    @staticmethod
    def _band(band) -> tuple[int, int]:
        try:
            bits, count = band
        except (TypeError, ValueError):
            raise ValueError(f"bands: each band is (bits, count), got {band!r}") from None
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bands: unsupported bit-width {bits!r}; choose from {SUPPORTED_BITS}")
        if not _is_int(count) or count < 1:
            raise ValueError(f"bands: the count of singular vectors must be an integer >= 1, got {count!r}")
        return int(bits), int(count)

    def compress(self, finetuned: torch.Tensor, base: torch.Tensor, name: str = "weight",
                 hessian: Optional[torch.Tensor] = None) -> DeltaTensor:
        """One weight matrix -> its compressed tensor, by the registered method.

        `hessian`: Σ xᵀx / N of the layer's calibration inputs (GPTQ), or None (RTN)."""
        method = get_method(self.method)
        if hessian is not None and method.calibrated:
            weight = method.compress(finetuned, base, self, name=name, hessian=hessian)
        else:
            weight = method.compress(finetuned, base, self, name=name)
        if type(weight) is not method.tensor:
            raise TypeError(f"method {self.method!r} is registered with {method.tensor.__name__} but its compress "
                            f"function returned {type(weight).__name__}")
        return weight.with_contiguous_parts()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def deltacome_config(base, alpha: float = 1 / 16, method: str = "deltacome", **kwargs) -> DeltaCoMeConfig:
    """Shorthand: `quantize_(model, deltacome_config(base, alpha=1/32))`."""
    return DeltaCoMeConfig(base=base, alpha=alpha, method=method, **kwargs)


# --- the quantize_ shortcut --------------------------------------------------------------------------

_RUNS: dict = {}  # (thread, call) -> (root id, {id(module): {param: weight}}, ids of modules still to visit)
_RUNS_LOCK = threading.Lock()


def _plan_root(root, config, filter_fn, device):
    """Plan every layer of `root` (nothing changes yet) -> ({id(module): {param: weight}}, skipped)."""
    targets = select_layers(root, config, filter_fn)
    skipped = _skipped(root, config, filter_fn, targets)
    return plan_compression(root, config, targets, device, skipped), skipped


def _finish(root, config, skipped) -> None:
    record_skipped(root, skipped)
    notify_compressed(root, config_fields(config))


@register_quantize_module_handler(DeltaCoMeConfig)
def _quantize_handler(module: torch.nn.Module, config: DeltaCoMeConfig) -> torch.nn.Module:
    walk = current_walk()
    if walk is None or walk.fqn == "":  # handed the model itself: compress all of it at once
        weights, skipped = _plan_root(module, config, None, walk.device if walk else None)
        swap_in(module, weights)
        _finish(module, config, skipped)
        return module
    if walk.fqn is not None:  # an FqnToConfig entry: this one module, by its name in the root
        targets = [t for t in matmul_layers(walk.root, lambda m, n: m is module, embeddings=True)]
        if not targets:
            raise ValueError(
                f"FqnToConfig maps {walk.fqn!r} ({type(module).__name__}) to a DeltaCoMeConfig; map modules holding "
                f"a matmul weight (or the whole model, '') to it, or use compress_(model, config, filter_fn=...)"
            )
        swap_in(walk.root, plan_compression(walk.root, config, targets, walk.device))
        notify_compressed(walk.root, config_fields(config))
        return module
    # torchao's module walk: plan every layer on the first call (with torchao's default filter, the
    # config's own selection: Conv1D and stacked experts too), swap in at once the layers of modules
    # torchao does not visit, and one visited module's per call.
    key = (threading.get_ident(), walk.key)
    with _RUNS_LOCK:
        run = _RUNS.get(key)
    if run is None or run[0] != id(walk.root) or id(module) not in run[2]:
        visits = {id(m) for _, m in walk_modules(walk.root, walk.filter_fn)}
        weights, skipped = _plan_root(walk.root, config, walk.user_filter, walk.device)
        swap_in(walk.root, {k: v for k, v in weights.items() if k not in visits})
        weights = {k: v for k, v in weights.items() if k in visits}
        run = (id(walk.root), weights, visits)
        with _RUNS_LOCK:
            _RUNS[key] = run
        _finish(walk.root, config, skipped)
    _, weights, pending = run
    pending.discard(id(module))
    if not pending:
        with _RUNS_LOCK:
            _RUNS.pop(key, None)
    for param, w in weights.pop(id(module), {}).items():
        setattr(module, param, torch.nn.Parameter(w, requires_grad=False))
    if not pending:
        notify_compressed(walk.root, config_fields(config))  # again: every weight is in place now
    return module
