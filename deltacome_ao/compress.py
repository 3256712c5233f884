"""`compress_(model, config)`: replace a fine-tuned model's weights by base + compressed delta.

The core entry point (torchao's `quantize_(model, DeltaCoMeConfig(...))` is a shortcut to it, see
`config.py`). It plans while holding the whole model, because delta compression needs every
module's name (to find the matching base weight) and must be all-or-nothing: `plan_compression`
checks the pair and compresses every selected layer without touching the model, and only then are
the new weights swapped in. Any error leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .calibrate import calibrated_weights
from .checkpoint import check_pair
from .delta_tensor import DeltaTensor
from .recipes import recipe_for

__all__ = ["compress_", "plan_compression", "select_layers", "walk_modules", "compressed_layers", "delta_report"]


def _default_filter(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear)


def walk_modules(root: torch.nn.Module, filter_fn: Callable) -> list[tuple[str, torch.nn.Module]]:
    """The modules `filter_fn(module, name)` selects, in module order, not descending into a match
    (torchao's walk)."""
    out = []

    def visit(module, name):
        if filter_fn(module, name):
            out.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, "")
    return out


def select_layers(root: torch.nn.Module, config: Any, filter_fn: Optional[Callable] = None) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs `compress_` compresses: the modules `filter_fn` selects (default:
    every `nn.Linear`) that the recipe selects (`config.recipe`, else by `config.model_type`), or
    the root itself when it is the only match (a bare linear layer). ValueError if none."""
    visited = walk_modules(root, filter_fn or _default_filter)
    if len(visited) == 1 and visited[0][0] == "":
        return visited
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    recipe = config.recipe or recipe_for(model_type)
    seen: set = set()  # a module shared at two paths is compressed once, under its first name
    targets = [(n, m) for n, m in visited if isinstance(m, torch.nn.Linear) and recipe.selects(n)
               and not (id(m) in seen or seen.add(id(m)))]
    if not targets:
        first = visited[0][0] if visited else None
        raise ValueError(
            f"recipe {recipe.name!r} selects none of the {len(visited)} layers the filter visits "
            f"(first: {first!r}); pass recipe= for this model"
        )
    return targets


def plan_compression(root: torch.nn.Module, config: Any, targets: list[tuple[str, torch.nn.Module]],
                     device: Any = None) -> dict[int, DeltaTensor]:
    """Compress every target of `root` without touching it -> {id(module): compressed weight}.

    `targets`: (name relative to `root`, module) pairs, e.g. from `select_layers`. `device`: where
    the compression runs and the weights end up (default: each weight's own device).
    Raises `CheckpointMismatchError` (base and fine-tune differ in architecture) or ValueError.
    """
    keys = [f"{name}.weight" if name else "weight" for name, _ in targets]
    for (name, module), key in zip(targets, keys):
        if isinstance(module.weight, DeltaTensor):
            raise ValueError(f"{name or 'module'}: the weight is already a {type(module.weight).__name__}; "
                             f"compress the original fine-tuned model")
    shapes = {k: tuple(v.shape) for k, v in root.state_dict().items()}
    check_pair(config.base, shapes, keys, model_type=getattr(getattr(root, "config", None), "model_type", None))
    if config.calibration is not None:
        weights = calibrated_weights(root, targets, keys, config)
        return {k: w.to(device) for k, w in weights.items()} if device is not None else weights
    weights = {}
    bar = tqdm(list(zip(targets, keys)), desc=f"{config.method} delta", disable=not config.progress, unit="layer")
    for (name, module), key in bar:
        finetuned = module.weight.detach()
        if device is not None:
            finetuned = finetuned.to(device)
        base = config.base[key].to(device=finetuned.device, dtype=finetuned.dtype)
        weights[id(module)] = config.compress(finetuned, base, name or "weight")
    return weights


def compress_(model: torch.nn.Module, config: Any, filter_fn: Optional[Callable] = None,
              device: Any = None) -> torch.nn.Module:
    """Compress the delta of every selected linear layer of `model` against `config.base`, in place.

    model: the fine-tuned model (an HF causal LM, any module tree, or a bare `nn.Linear`).
    config: a `DeltaCoMeConfig` (base, alpha, method, recipe, calibration, ...).
    filter_fn: `(module, name) -> bool` narrowing the candidates (default every `nn.Linear`).
    device: run the compression there and leave the model there (as torchao's `quantize_`).

    All or nothing: on any error the model is unchanged. Returns `model`.
    """
    targets = select_layers(model, config, filter_fn)
    weights = plan_compression(model, config, targets, device)
    if device is not None:
        model.to(device)
    for _, module in targets:
        module.weight = torch.nn.Parameter(weights[id(module)], requires_grad=False)
    return model


def compressed_layers(model: torch.nn.Module) -> dict[str, DeltaTensor]:
    """{module name: compressed weight} of every module whose `weight` is a `DeltaTensor`."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), DeltaTensor)
    }


def delta_report(model: torch.nn.Module) -> list[dict]:
    """Per compressed layer: name, shape, kind (tensor class), structure (`describe()`, e.g. the
    bands "8b×2 3b×32 2b×20"), bands as [[bits, count], ...] when the kind has bands, delta bytes
    and bits per parameter."""
    rows = []
    for name, w in compressed_layers(model).items():
        bands = getattr(w, "bands", None)
        rows.append({
            "name": name,
            "shape": list(w.shape),
            "tensor": type(w).__name__,
            "structure": w.describe(),
            "bands": [[b.bits, b.count] for b in bands] if bands is not None else None,
            "delta_bytes": w.delta_nbytes(),
            "bits_per_param": w.bits_per_param(),
        })
    return rows
