"""`DeltaCoMeConfig` and its `quantize_` handler.

torchao calls a handler with one module and the config, never the module's name, and replaces
modules one at a time. Delta compression needs both the name (to find the matching base weight)
and all-or-nothing behaviour (a failure halfway must not leave a half-compressed model). So on the
first call of a `quantize_` run the handler finds the model being converted (the outermost frame of
torchao's module walk), plans and compresses *every* selected layer without touching the model,
and only then do this and the following calls swap in the precomputed weights. Any error is raised
before the first swap.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors import safe_open
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

from .allocate import FP16_BITS, OPTIMAL_CANDIDATES, PAPER_SCHEDULE, SUPPORTED_BITS
from .bitdelta_tensor import BitDeltaTensor
from .calibrate import calibrated_weights
from .mixed_precision_delta_tensor import MixedPrecisionDeltaTensor
from .recipes import GENERIC, Recipe, recipe_for

__all__ = ["DeltaCoMeConfig", "deltacome_config", "BaseWeights", "METHODS", "delta_report"]

METHODS = ("deltacome", "single", "lowrank", "bitdelta")


INDEX_NAME = "model.safetensors.index.json"


def _few(items, k: int = 4) -> str:
    """The first `k` items for an error message, and how many more there are."""
    items = list(items)
    return ", ".join(items[:k]) + (f", ... (+{len(items) - k})" if len(items) > k else "")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` directory: the shards its
    `model.safetensors.index.json` lists, else `model.safetensors`, else every `*.safetensors`
    file; [] when there is none."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shard(s) listed in {INDEX_NAME} are missing: {_few(missing)}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    return sorted(model_dir.glob("*.safetensors"))


class BaseWeights:
    """Read-only access to the base model's tensors by name, from an `nn.Module`, a state dict, or
    a local directory of (possibly sharded) safetensors files (`files`). A directory is read
    lazily, one tensor at a time."""

    def __init__(self, source: Any):
        self.model_type: str | None = None
        self.files: list[Path] = []
        self._files: dict[str, Path] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        if isinstance(source, torch.nn.Module):
            self._tensors = dict(source.state_dict(keep_vars=False))
            config = getattr(source, "config", None)
            self.model_type = getattr(config, "model_type", None)
        elif isinstance(source, dict):
            self._tensors = source
        elif isinstance(source, (str, Path)):
            path = Path(source)
            self.files = safetensors_files(path) if path.is_dir() else []
            if not self.files:
                raise FileNotFoundError(
                    f"base {str(source)!r} is not a directory with .safetensors files; pass an nn.Module, "
                    f"a state dict or a local directory saved with save_pretrained"
                )
            for f in self.files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        self._files[key] = f
            config_file = path / "config.json"
            if config_file.exists():
                self.model_type = json.loads(config_file.read_text()).get("model_type")
        else:
            raise TypeError(f"base must be an nn.Module, a state dict or a directory path, got {type(source).__name__}")

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._files

    def keys(self):
        return list(self._tensors) + list(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors[name]
        if name not in self._files:
            raise KeyError(name)
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._tensors:
            return tuple(self._tensors[name].shape)
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())


@dataclass
class DeltaCoMeConfig(AOBaseConfig):
    """Compress each selected linear layer's delta against `base`.

    base: the model the fine-tune started from — `nn.Module`, state dict or safetensors directory.
    alpha: delta bytes / fp16 bytes of each matrix (1/16 = 1 bit per parameter, everything counted).
    bands: explicit [(bits, count), ...] for every layer, overriding the budget-derived schedule.
    group_size: quantization group along each singular vector.
    method: "deltacome" (8/3/2-bit schedule), or a baseline at the same budget: "single" (every kept
        vector at `single_bits`), "lowrank" (top vectors in fp16), "bitdelta" (sign + one scale).
    svd: "auto" | "exact" | "randomized".
    recipe: which modules to compress; default from the model's `config.model_type`.
    allocation: "paper" (the 8/3/2-bit schedule) or "optimal" (each singular vector's width from
        `candidates`, 0 = dropped, minimising the measured error within `alpha`); method "deltacome".
    calibration: None (data-free RTN) or an iterable of `input_ids` tensors (or dicts of model
        inputs): the factors are then quantized with GPTQ, layer by layer (see `calibrate.py`), with
        `damp` (fraction of the Hessian's mean diagonal), `act_order` and, if `target_correction`,
        Û quantized toward the target that best reproduces the layer's delta outputs.
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
    _runs: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.base is None:
            raise ValueError("DeltaCoMeConfig needs base=: the base model, its state dict or a safetensors directory")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if not (self.alpha > 0):
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"unknown svd {self.svd!r}; choose from 'auto', 'exact', 'randomized'")
        for label, bits in [("single_bits", self.single_bits)] + [("bands", b) for b, _ in (self.bands or ())]:
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{label}: unsupported bit-width {bits}; choose from {SUPPORTED_BITS}")
        if self.allocation not in ("paper", "optimal"):
            raise ValueError(f"unknown allocation {self.allocation!r}; use 'paper' or 'optimal'")
        if self.allocation == "optimal":
            if self.method != "deltacome":
                raise ValueError(f"allocation='optimal' chooses the widths itself; it needs method='deltacome', not {self.method!r}")
            if not any(self.candidates) or any(b != 0 and b not in SUPPORTED_BITS for b in self.candidates):
                raise ValueError(f"candidates {tuple(self.candidates)}: use 0 (dropped) and widths from {SUPPORTED_BITS}")
        if self.calibration is not None and self.method == "bitdelta":
            raise ValueError("calibration (GPTQ) applies to the SVD methods, not to method='bitdelta'")
        if not (self.damp >= 0):
            raise ValueError(f"damp must be non-negative, got {self.damp}")
        if self.calibration is not None and not isinstance(self.calibration, (list, tuple, torch.Tensor)):
            self.calibration = list(self.calibration)  # an iterator would be used up by the first run
        if not isinstance(self.base, BaseWeights):
            self.base = BaseWeights(self.base)

    def schedule(self):
        if self.method == "single":
            return ((self.single_bits, None),)
        if self.method == "lowrank":
            return ((FP16_BITS, None),)
        return PAPER_SCHEDULE

    def compress(
        self, finetuned: torch.Tensor, base: torch.Tensor, name: str, hessian: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One weight matrix -> its compressed tensor (the per-layer step of the handler).

        `hessian`: Σ xᵀx / N of the layer's calibration inputs (GPTQ), or None (RTN)."""
        if self.method == "bitdelta":
            return BitDeltaTensor.from_hp(finetuned, base, name=name)
        return MixedPrecisionDeltaTensor.from_hp(
            finetuned, base, alpha=self.alpha, schedule=self.schedule(), bands=self.bands,
            group_size=self.group_size, svd=self.svd, name=name, allocation=self.allocation,
            candidates=tuple(self.candidates), hessian=hessian, damp=self.damp, act_order=self.act_order,
            target_correction=self.target_correction,
        )


def deltacome_config(base, alpha: float = 1 / 16, method: str = "deltacome", **kwargs) -> DeltaCoMeConfig:
    """Shorthand: `quantize_(model, deltacome_config(base, alpha=1/32))`."""
    return DeltaCoMeConfig(base=base, alpha=alpha, method=method, **kwargs)


def _torchao_walk():
    """(root model, filter_fn, outermost frame) of the running `quantize_` module walk, if any."""
    frame, outer = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter":
            outer = frame
        frame = frame.f_back
    if outer is None:
        return None
    return outer.f_locals["model"], outer.f_locals["filter_fn"], outer


def _selected(root: torch.nn.Module, filter_fn: Callable) -> list[tuple[str, torch.nn.Module]]:
    """The modules torchao's walk hands to the handler, in order (it stops descending at a match)."""
    out = []

    def visit(module, name):
        if filter_fn(module, name):
            out.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, "")
    return out


def _check_compatible(root: torch.nn.Module, base: BaseWeights):
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type and base.model_type and model_type != base.model_type:
        raise ValueError(
            f"the base is a {base.model_type!r} model but the fine-tuned model is {model_type!r}; "
            f"pass the base model this one was fine-tuned from"
        )
    for name, tensor in root.state_dict().items():
        if name in base and base.shape(name) != tuple(tensor.shape):
            shape, base_shape = tuple(tensor.shape), base.shape(name)
            vocab = ("embed" in name or "lm_head" in name) and shape[1:] == base_shape[1:]
            hint = " (the vocabulary sizes differ)" if vocab else ""
            raise ValueError(
                f"{name}: fine-tuned shape {shape} but base shape {base_shape}{hint}; "
                f"the base must have the fine-tuned model's architecture"
            )


def _plan(root: torch.nn.Module, filter_fn: Callable, config: DeltaCoMeConfig):
    """Compress every selected layer of `root` without touching it.

    Returns ({id(module): new weight}, ids of every module the walk will hand to the handler).
    """
    _check_compatible(root, config.base)
    selected = _selected(root, filter_fn)
    if len(selected) == 1 and selected[0][0] == "":
        targets = selected  # quantize_ on a bare linear layer
    else:
        model_type = getattr(getattr(root, "config", None), "model_type", None)
        recipe = config.recipe or recipe_for(model_type)
        targets = [(n, m) for n, m in selected if isinstance(m, torch.nn.Linear) and recipe.selects(n)]
        if not targets:
            raise ValueError(
                f"recipe {recipe.name!r} selects none of the {len(selected)} layers quantize_ visits "
                f"(first: {selected[0][0]!r}); pass recipe= for this model"
            )
    keys = [f"{name}.weight" if name else "weight" for name, _ in targets]
    for (name, module), key in zip(targets, keys):
        where = name or "module"
        if isinstance(module.weight, (MixedPrecisionDeltaTensor, BitDeltaTensor)):
            kind = type(module.weight).__name__
            raise ValueError(f"{where}: the weight is already a {kind}; compress the original fine-tuned model")
        if key not in config.base:
            raise KeyError(
                f"{where}: the base has no tensor {key!r}; the base is missing weights or has another "
                f"architecture (names are relative to the model given to quantize_)"
            )
        if module.bias is None and key[: -len("weight")] + "bias" in config.base:
            raise ValueError(
                f"{where}: the base has a bias but the fine-tuned layer has none; the base has another architecture"
            )
    if config.calibration is not None:
        return calibrated_weights(root, targets, keys, config), {id(m) for _, m in selected}
    weights = {}
    bar = tqdm(list(zip(targets, keys)), desc=f"{config.method} delta", disable=not config.progress, unit="layer")
    for (name, module), key in bar:
        finetuned = module.weight.detach()
        base = config.base[key].to(device=finetuned.device, dtype=finetuned.dtype)
        weights[id(module)] = config.compress(finetuned, base, name or "weight")
    return weights, {id(m) for _, m in selected}


@register_quantize_module_handler(DeltaCoMeConfig)
def _deltacome_transform(module: torch.nn.Module, config: DeltaCoMeConfig) -> torch.nn.Module:
    walk = _torchao_walk()
    if walk is None:
        root, filter_fn, frame = module, (lambda m, n: True), None
    else:
        root, filter_fn, frame = walk
    run_key = (id(root), id(frame))
    if run_key not in config._runs:
        config._runs.clear()
        config._runs[run_key] = _plan(root, filter_fn, config)
    weights, pending = config._runs[run_key]
    weight = weights.pop(id(module), None)
    pending.discard(id(module))
    if not pending:
        del config._runs[run_key]
    if weight is not None:
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


def delta_report(model: torch.nn.Module) -> list[dict]:
    """Per-layer bands, bits per parameter and bytes of every compressed weight in `model`."""
    rows = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, (MixedPrecisionDeltaTensor, BitDeltaTensor)):
            rows.append({
                "name": name,
                "shape": list(w.shape),
                "bands": [[b.bits, b.count] for b in w.bands] if isinstance(w, MixedPrecisionDeltaTensor) else [[1, "sign"]],
                "delta_bytes": w.delta_nbytes(),
                "bits_per_param": w.bits_per_param(),
            })
    return rows
