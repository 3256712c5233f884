"""`DeltaCoMeConfig` and its torchao `quantize_` handler.

`quantize_(model, DeltaCoMeConfig(base=...))` is the torchao-style shortcut to
`compress_(model, config)` (`compress.py`): torchao hands the handler one module at a time, so on
the first call of a `quantize_` run the handler asks `torchao_walk` for the model being converted,
plans every layer with `compress.plan_compression` (nothing changes yet), and this and the following
calls swap in the precomputed weights. The run's state lives here, keyed by the running call — never
on the config, which stays a plain value (a copy of it shares the base and copies no model).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

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
from .methods import ALLOCATIONS, get_method, method_names
from .budget import SENSITIVITIES
from .recipes import Recipe
from .self_calibration import SELF_SOURCES, SelfCalibration, as_self_calibration
from .torchao_walk import current_walk

__all__ = ["DeltaCoMeConfig", "deltacome_config", "SVD_METHODS", "ALLOCATIONS", "SelfCalibration",
           "BaseWeights", "delta_report", "compressed_layers"]  # the last three: 0.1 import paths

SVD_METHODS = ("auto", "exact", "randomized")


def __getattr__(name: str):
    if name == "METHODS":  # 0.1: a fixed tuple; now whatever is registered
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        "global": `alpha` is the model-level ratio (all compressed matrices together), and the widths
        are chosen over all matrices at once to minimise one proxy of the output error (`budget.py`:
        weight-space error data-free; with calibration, each layer's output error weighted by the
        Fisher of its outputs); a matrix spends at most `global_cap` × its own alpha budget. Use it
        with calibration (`calibration="self"` needs no user data): data-free, its weight-space proxy
        does not track the output error and can lose to "optimal" (docs/results.md, issue 15).
    calibration: None (data-free RTN), an iterable of `input_ids` tensors (or dicts of model
        inputs), or "self" / "base" / a `SelfCalibration(...)`: sequences sampled from the fine-tuned
        (or base) model itself when it is compressed — no user data (`self_calibration.py`). The
        factors are then quantized with GPTQ, layer by layer (see `calibrate.py`), with
        `damp` (fraction of the Hessian's mean diagonal), `act_order` and, if `target_correction`,
        Û quantized toward the target that best reproduces the layer's delta outputs.
    whiten: with calibration, decompose each delta in its layer's output metric (the SVD of ΔW L,
        H = L Lᵀ the layer's input Hessian; `methods.mixed_precision.whitened_svd`): the kept singular
        vectors are those that move the outputs most. Without calibration it changes nothing.
    global_cap: with allocation "global", the most one matrix may spend, as a multiple (>= 1) of
        alpha × its fp16 size (it may also get nothing).
    global_sensitivity: with allocation "global", the proxy: "weight" (weight-space error, data-free),
        "output" (each layer's output error, calibration Hessians) or "fisher" (output error weighted by
        the Fisher of the layer's outputs); None: "fisher" with calibration, else "weight".
    method_options: the method's own settings ({name: JSON value}; the names it declared at
        registration, the others keep their defaults); recorded in the artifact.

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
    method_options: Mapping[str, Any] = field(default_factory=dict)
    embeddings: bool = False
    global_cap: float = 4.0
    global_sensitivity: Optional[str] = None
    whiten: bool = False

    def __post_init__(self):
        if self.base is None:
            raise ValueError("DeltaCoMeConfig needs base=: the base model, its state dict or a safetensors directory")
        self.validate_options()
        if not isinstance(self.base, BaseWeights):
            self.base = BaseWeights(self.base)

    @classmethod
    def check_options(cls, **options) -> None:
        """Validate options as `DeltaCoMeConfig(base=..., **options)` would, without a base (the
        command line checks its options before loading any model). ValueError / TypeError."""
        names = {f.name for f in fields(cls)} - {"base"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown DeltaCoMeConfig option(s) {unknown}")
        probe = object.__new__(cls)
        for f in fields(cls):
            if f.name != "base":
                default = f.default_factory() if f.default is MISSING else f.default
                setattr(probe, f.name, options.get(f.name, default))
        probe.validate_options()

    def validate_options(self) -> None:
        """Check every field but `base` (ValueError naming the field and its valid range); the
        command line runs this before loading any model."""
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a string, one of {method_names()}; got {self.method!r}")
        method = get_method(self.method)
        if not _is_number(self.alpha) or not (0 < self.alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1] (delta bytes / fp16 bytes; 1/16 = 1 bit per parameter), "
                             f"got {self.alpha!r}")
        if not _is_int(self.group_size) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (values per scale and zero-point), got {self.group_size!r}")
        if not isinstance(self.svd, str) or self.svd not in SVD_METHODS:
            raise ValueError(f"unknown svd {self.svd!r}; choose from {SVD_METHODS}")
        if not _is_int(self.single_bits) or self.single_bits not in SUPPORTED_BITS:
            raise ValueError(f"single_bits: unsupported bit-width {self.single_bits!r}; choose from {SUPPORTED_BITS}")
        if self.bands is not None:
            if isinstance(self.bands, (str, bytes)) or not hasattr(self.bands, "__iter__"):
                raise ValueError(f"bands must be a sequence of (bits, count) pairs, got {self.bands!r}")
            self.bands = tuple(self._band(b) for b in self.bands)
            if not self.bands:
                raise ValueError("bands: give at least one (bits, count) pair, or bands=None for the budget's schedule")
        if self.recipe is not None and not isinstance(self.recipe, Recipe):
            raise ValueError(f"recipe must be a deltacome_ao.recipes.Recipe or None, got {type(self.recipe).__name__}")
        for flag in ("progress", "act_order", "target_correction", "whiten", "embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {ALLOCATIONS}")
        if (isinstance(self.candidates, (str, bytes)) or not hasattr(self.candidates, "__iter__")
                or not all(_is_int(b) and (b == 0 or b in SUPPORTED_BITS) for b in self.candidates)):
            raise ValueError(f"candidates {self.candidates!r}: a sequence of 0 (dropped) and widths from {SUPPORTED_BITS}")
        self.candidates = tuple(self.candidates)
        if self.allocation not in method.allocations:
            raise ValueError(f"allocation={self.allocation!r} needs a method that chooses widths itself "
                             f"(one of {[m for m in method_names() if self.allocation in get_method(m).allocations]}), "
                             f"not {self.method!r}")
        if self.allocation == "global":
            if self.bands is not None:
                raise ValueError("bands= fixes every layer's bands; allocation='global' chooses them (drop one)")
            if not _is_number(self.global_cap) or self.global_cap < 1:
                raise ValueError(f"global_cap must be a number >= 1 (a matrix's cap as a multiple of its alpha budget), "
                                 f"got {self.global_cap!r}")
            if self.global_sensitivity not in (None, *SENSITIVITIES):
                raise ValueError(f"unknown global_sensitivity {self.global_sensitivity!r}; choose from {SENSITIVITIES} "
                                 f"or None")
            if self.global_sensitivity in ("output", "fisher") and self.calibration is None:
                raise ValueError(f"global_sensitivity={self.global_sensitivity!r} needs calibration (e.g. "
                                 f"calibration='self')")
        elif self.global_cap != 4.0 or self.global_sensitivity is not None:  # would be ignored: say so
            raise ValueError(f"global_cap / global_sensitivity apply only with allocation='global' (got "
                             f"allocation={self.allocation!r}, global_cap={self.global_cap!r}, "
                             f"global_sensitivity={self.global_sensitivity!r}); set allocation='global' or drop them")
        if self.allocation in ("optimal", "global"):
            if not any(self.candidates) or any(b != 0 and b not in SUPPORTED_BITS for b in self.candidates):
                raise ValueError(f"candidates {tuple(self.candidates)}: use 0 (dropped) and widths from {SUPPORTED_BITS}")
        if self.calibration is not None and not method.calibrated:
            raise ValueError(f"calibration (GPTQ) applies to methods that quantize singular vectors, not to method={self.method!r}")
        if not _is_number(self.damp) or not (0 <= self.damp < math.inf):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if self.calibration is not None:
            self._check_calibration()
        self._check_method_options(method)

    def _check_method_options(self, method) -> None:
        if not isinstance(self.method_options, Mapping):
            raise ValueError(f"method_options must be a mapping of option names to values, got {self.method_options!r}")
        unknown = sorted(set(self.method_options) - set(method.options))
        if unknown:
            declared = sorted(method.options) or "none"
            raise ValueError(f"method_options: method {self.method!r} has no option(s) {unknown}; its options: {declared}")
        try:
            json.dumps(dict(self.method_options))
        except (TypeError, ValueError):
            raise ValueError(f"method_options must be JSON values (they are recorded in the artifact), "
                             f"got {self.method_options!r}") from None
        self.method_options = {**method.options, **self.method_options}

    def _check_calibration(self) -> None:
        samples = self.calibration
        if isinstance(samples, str) and samples not in SELF_SOURCES:
            raise ValueError(f"calibration must be None or an iterable of input_ids tensors, or 'self' / 'base' "
                             f"(sequences sampled from the fine-tuned / base model) or a SelfCalibration(...); "
                             f"got {samples!r}")
        if as_self_calibration(samples) is not None:  # "self" / "base": the SelfCalibration they mean
            self.calibration = as_self_calibration(samples)
            return
        if isinstance(samples, torch.Tensor):
            if samples.dim() != 2 or samples.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"calibration: a tensor must be batch x seq integer input_ids, got a "
                                 f"{tuple(samples.shape)} {samples.dtype} tensor")
            return
        if isinstance(samples, (str, bytes, Mapping)) or not hasattr(samples, "__iter__"):
            raise ValueError(f"calibration must be None or an iterable of input_ids tensors (or dicts of model inputs), "
                             f"got {type(samples).__name__}")
        if not isinstance(samples, (list, tuple)):
            self.calibration = samples = list(samples)  # an iterator would be used up by the first run
        if not samples:
            raise ValueError("calibration= is empty; pass a list of input_ids tensors (or None for data-free RTN)")
        for i, sample in enumerate(samples):
            ids = sample.get("input_ids") if isinstance(sample, Mapping) else sample
            if not (isinstance(ids, torch.Tensor) and ids.dim() in (1, 2) and ids.dtype in (torch.int32, torch.int64)):
                what = f"a {tuple(ids.shape)} {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"calibration[{i}]: expected input_ids (a 1-D or batch x seq integer tensor, or a dict "
                                 f"with one), got {what}")

    @staticmethod
    def _band(band) -> tuple[int, int]:
        try:
            bits, count = band
        except (TypeError, ValueError):
            raise ValueError(f"bands: each band is (bits, count), got {band!r}") from None
        if not _is_int(bits) or bits not in SUPPORTED_BITS:
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
        problem = weight.layout_mismatch()
        if problem:  # caught here, not when the artifact is read back
            raise TypeError(f"method {self.method!r}, {name}: the compressed weight does not match "
                            f"{method.tensor.__name__}.delta_layout: {problem}")
        return weight.with_contiguous_parts()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def deltacome_config(base, alpha: float = 1 / 16, method: str = "deltacome", **kwargs) -> DeltaCoMeConfig:
    """Shorthand: `quantize_(model, deltacome_config(base, alpha=1/32))`."""
    return DeltaCoMeConfig(base=base, alpha=alpha, method=method, **kwargs)


# --- the quantize_ shortcut --------------------------------------------------------------------------

# thread -> (the running call's outermost frame, {id(module): (ids of its parameters, visits left)} of
# the modules the walk has still to visit, as the call's first step left them). Holding the frame keeps its identity from
# being reused by a later call; a finished call's entry is dropped, an aborted one's is replaced by
# the thread's next call.
_RUNS: dict = {}
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
def _quantize_handler(module: torch.nn.Module, config: DeltaCoMeConfig, parameter_name: str = "weight") -> torch.nn.Module:
    """torchao calls this once per module it visits. The first call of a `quantize_` run plans the
    whole model and swaps every compressed weight at once (all or nothing); the later calls of the
    same run only recognise modules already done."""
    if parameter_name != "weight":
        raise ValueError(f"DeltaCoMeConfig compresses a module's weight, not {parameter_name!r}")
    walk = current_walk()
    if walk is None or walk.fqn == "":  # handed the model itself: compress all of it at once
        weights, skipped = _plan_root(module, config, None, walk.device if walk else None)
        swap_in(module, weights)
        _finish(module, config, skipped)
        return module
    if walk.fqn is not None:  # an FqnToConfig entry: this module, by its name in the root
        return _quantize_named(module, config, walk)
    thread = threading.get_ident()
    with _RUNS_LOCK:
        run = _RUNS.get(thread)
        if run is not None and run[0] is walk.frame and run[1].get(id(module), (None,))[0] == _params(module):
            params, visits = run[1][id(module)]  # done by this call's first step
            if visits > 1:
                run[1][id(module)] = (params, visits - 1)  # a module shared at several paths
            else:
                del run[1][id(module)]
            if not run[1]:
                del _RUNS[thread]
            return module
        _RUNS.pop(thread, None)  # a new call: whatever an earlier, aborted call left is stale
    # With torchao's default filter, the config's own selection applies (Conv1D and stacked experts too).
    later = [m for _, m in walk_modules(walk.root, walk.filter_fn) if m is not module]
    weights, skipped = _plan_root(walk.root, config, walk.user_filter, walk.device)
    swap_in(walk.root, weights)
    _finish(walk.root, config, skipped)
    # every module the walk still visits: the parameters it holds now (compressed or left as is), and
    # how many more times the walk reaches it (once per path it sits at)
    remaining = {}
    for m in later:
        remaining[id(m)] = (_params(m), remaining.get(id(m), (None, 0))[1] + 1)
    if remaining:
        with _RUNS_LOCK:
            _RUNS[thread] = (walk.frame, remaining)
    return module


def _params(module: torch.nn.Module) -> tuple:
    return tuple(id(p) for p in module._parameters.values())


def _quantize_named(module: torch.nn.Module, config: DeltaCoMeConfig, walk) -> torch.nn.Module:
    """One `FqnToConfig` entry. An entry naming the module exactly compresses its matmul weights; a
    pattern (`re:...`) or `_default` entry only those the config's selection picks (as `compress_`)."""
    targets = matmul_layers(walk.root, lambda m, n: m is module, embeddings=True)
    if not targets:
        raise ValueError(
            f"FqnToConfig maps {walk.fqn!r} ({type(module).__name__}) to a DeltaCoMeConfig; map modules holding "
            f"a matmul weight (or the whole model, '') to it, or use compress_(model, config, filter_fn=...)"
        )
    if not walk.exact:
        selected = {(id(t.module), t.param) for t in select_layers(walk.root, config)}
        targets = [t for t in targets if (id(t.module), t.param) in selected]
        if not targets:
            return module
    swap_in(walk.root, plan_compression(walk.root, config, targets, walk.device))
    notify_compressed(walk.root, config_fields(config))
    return module
