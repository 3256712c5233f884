"""Streaming compression: a delta artifact straight from two checkpoints on disk.

`compress_streaming(base_dir, finetuned_dir, out_dir, alpha=..., ...)` reads the base and the
fine-tuned checkpoint (safetensors, one file or sharded) one tensor pair at a time, compresses the
selected linear weights with the same per-matrix step as `quantize_` (`DeltaCoMeConfig.compress`),
keeps the other tensors that differ from the base, fingerprints every base tensor as it passes, and
writes the artifact with `artifact.save_delta`'s writer. Neither model is ever loaded whole: in
memory at a time are one base tensor, one fine-tuned tensor and the work of compressing them, plus
what the artifact will hold (the packed factors, ≈ alpha × the size of the compressed weights, and
the kept tensors). See docs/streaming.md.

The artifact is the one `save_delta(model, out, base=base, config=config)` writes after
`quantize_(model, config)` on the same pair with the same options: the same `delta.safetensors`
bytes and the same `delta_config.json` content, so `load_delta` / `DeltaCoMeModel.from_pretrained`
read it unchanged. Which weights are compressed follows `quantize_`'s rule (an `nn.Linear` the
recipe of the fine-tuned `config.json`'s `model_type` selects); module order, tied weights and the
config come from the model skeleton built on the meta device from that `config.json` (no weights),
or, when transformers cannot build it, from the names alone (every 2-D `<module>.weight` the recipe
selects, in checkpoint order, no ties).
"""

from __future__ import annotations

import os
import time
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .artifact import (
    CONFIG_NAME,
    SEP,
    WEIGHTS_NAME,
    _entry,
    _few,
    _fingerprint_of_entries,
    _model_config,
    _same,
    _write_artifact,
    layer_spec,
)
from .config import BaseWeights, DeltaCoMeConfig, safetensors_files
from .recipes import Recipe, recipe_for

__all__ = ["compress_streaming", "CheckpointMismatchError", "checkpoint_files", "linear_weight_names"]

class CheckpointMismatchError(ValueError):
    """The two checkpoints do not have the same architecture (names, shapes, model type)."""


def checkpoint_files(model_dir: str | os.PathLike, role: str = "checkpoint") -> list[Path]:
    """The safetensors files of a checkpoint directory (`config.safetensors_files`), with errors
    that name the checkpoint's role."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {str(model_dir)!r} is not a directory")
    try:
        files = safetensors_files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{role} {e}") from None
    if not files:
        raise FileNotFoundError(f"{role} {path} holds no *.safetensors file; give a save_pretrained directory")
    return files


class _Checkpoint(BaseWeights):
    """`BaseWeights` over a checkpoint directory, whose errors name its role ("base", ...)."""

    def __init__(self, model_dir: str | os.PathLike, role: str):
        checkpoint_files(model_dir, role)
        super().__init__(Path(model_dir))


def linear_weight_names(names, recipe: Recipe, shapes: Mapping[str, tuple] | None = None) -> list[str]:
    """Name-based form of `quantize_`'s selection, for when no model skeleton is available: the
    `<module>.weight` entries (2-D, when `shapes` is given) whose module the recipe selects."""
    out = []
    for key in names:
        if not key.endswith(".weight"):
            continue
        if shapes is not None and len(shapes[key]) != 2:
            continue
        if recipe.selects(key[: -len(".weight")]):
            out.append(key)
    return out


def _skeleton(model_dir: Path):
    """(config, model on the meta device) of a checkpoint directory, or (config, None) / (None, None)."""
    if not (model_dir / "config.json").is_file():
        return None, None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception:  # not a transformers config: the names alone decide
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return config, None
    return config, model


def _structure(skeleton, recipe: Recipe, ft: _Checkpoint, shapes: Mapping[str, tuple]):
    """(ordered fine-tuned tensor names, compressed weight keys, {alias: kept name}, first parameter name)."""
    if skeleton is None:
        order = list(ft.keys())
        return order, linear_weight_names(order, recipe, shapes), {}, (order[0] if order else None)
    state = skeleton.state_dict(keep_vars=True)
    seen, aliases, order = {}, {}, []
    for key, t in state.items():
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        order.append(key)
    missing = [k for k in order if k not in ft]
    if missing:
        raise CheckpointMismatchError(
            f"the fine-tuned checkpoint lacks {len(missing)} tensor(s) its config.json's model has: {_few(missing)}"
        )
    listed = set(order)
    order += [k for k in ft.keys() if k not in listed and k not in aliases]  # stored extras, as save_delta keeps them
    compressed = [
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and recipe.selects(name) and f"{name}.weight" in ft
        and f"{name}.weight" not in aliases
    ]
    first = next((n for n, _ in skeleton.named_parameters()), None)
    first = aliases.get(first, first)
    return order, compressed, aliases, first


def _check_pair(base: _Checkpoint, ft: _Checkpoint, order: list[str], compressed: list[str],
                aliases: Mapping[str, str], strict: bool) -> dict[str, tuple]:
    """Everything that can be checked from the headers, before any work: model type, names, shapes."""
    if base.model_type and ft.model_type and base.model_type != ft.model_type:
        raise CheckpointMismatchError(
            f"the base is a {base.model_type!r} model but the fine-tuned model is {ft.model_type!r}; "
            f"pass the base model this one was fine-tuned from"
        )
    base_keys = [k for k in base.keys() if k not in aliases]
    base_set, ft_set = set(base_keys), set(order)
    only_ft, only_base = [k for k in order if k not in base_set], [k for k in base_keys if k not in ft_set]
    if strict and (only_ft or only_base):
        parts = []
        if only_ft:
            parts.append(f"{len(only_ft)} only in the fine-tuned one: {_few(only_ft)}")
        if only_base:
            parts.append(f"{len(only_base)} only in the base: {_few(only_base)}")
        raise CheckpointMismatchError(
            "the checkpoints have different tensor names (" + "; ".join(parts) + "); pass the base this model "
            "was fine-tuned from, or strict=False to store fine-tuned-only tensors as they are"
        )
    missing = [k for k in compressed if k not in base_set]
    if missing:
        raise CheckpointMismatchError(
            f"the base has no tensor {_few(missing)}; the base is missing weights or has another architecture"
        )
    shapes = {}
    for key in order:
        shapes[key] = ft.shape(key)
        if key in base_set and base.shape(key) != shapes[key]:
            shape, base_shape = shapes[key], base.shape(key)
            vocab = ("embed" in key or "lm_head" in key) and shape[1:] == base_shape[1:]
            hint = " (the vocabulary sizes differ)" if vocab else ""
            raise CheckpointMismatchError(
                f"{key}: fine-tuned shape {shape} but base shape {base_shape}{hint}; "
                f"the base must have the fine-tuned model's architecture"
            )
    for key in compressed:
        if len(shapes[key]) != 2:
            raise CheckpointMismatchError(f"{key}: a selected linear weight must be 2-D, got shape {shapes[key]}")
        bias = key[: -len("weight")] + "bias"
        if bias not in ft_set and bias in base_set:
            raise CheckpointMismatchError(
                f"{key[: -len('.weight')]}: the base has a bias but the fine-tuned layer has none; "
                f"the base has another architecture"
            )
    return shapes


def compress_streaming(
    base_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    alpha: float = 1 / 16,
    method: str = "deltacome",
    group_size: int = 128,
    allocation: str = "paper",
    svd: str = "auto",
    recipe: Optional[Recipe] = None,
    strict: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict:
    """Compress the fine-tuned checkpoint against the base checkpoint into the delta artifact `out_dir`.

    Options as `DeltaCoMeConfig` (`alpha`, `method`, `group_size`, `allocation`, `svd`, `bands`,
    `single_bits`, `candidates`, `recipe`; calibration needs forward passes and is refused).
    strict: the two checkpoints must hold the same tensor names (else `CheckpointMismatchError`);
        with `strict=False` fine-tuned-only tensors are kept as they are, as `save_delta` does.
    metadata: stored under "user" in `delta_config.json`.

    Everything checkable from the headers (names, shapes, model type, an existing `out_dir`) is
    checked before any work; nothing is written until the end, atomically, so an error leaves no
    output directory. Returns a summary (counts, bytes, seconds, per-matrix timings).
    """
    if options.get("calibration") is not None:
        raise ValueError("compress_streaming is data-free: calibration (GPTQ) needs the whole model; use quantize_")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    base_path, ft_path = Path(base_dir), Path(finetuned_dir)
    base = _Checkpoint(base_path, "base")
    ft = _Checkpoint(ft_path, "fine-tuned checkpoint")
    config = DeltaCoMeConfig(
        base=base, alpha=alpha, method=method, group_size=group_size, allocation=allocation, svd=svd,
        recipe=recipe, progress=progress, **options,
    )
    model_config, skeleton = _skeleton(ft_path)
    recipe = config.recipe or recipe_for(ft.model_type)
    order, compressed, aliases, first = _structure(skeleton, recipe, ft, {k: ft.shape(k) for k in ft.keys()})
    if not compressed:
        raise ValueError(f"recipe {recipe.name!r} selects no linear weight of {ft_path}; pass recipe= for this model")
    _check_pair(base, ft, order, compressed, aliases, strict)
    del skeleton
    compressed_set, base_set = set(compressed), set(base.keys())

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    kept: dict[str, torch.Tensor] = {}
    timings: list[dict] = []
    model_dtype = None
    bar = tqdm(order, desc=f"{method} delta (streaming)", disable=not progress, unit="tensor")
    with torch.no_grad():
        for key in bar:
            if progress:
                bar.set_postfix_str(key, refresh=False)
            f = ft[key]
            if key == first:
                model_dtype = f.dtype
            if key in compressed_set:
                b = base[key]
                entries[key] = _entry(b)
                b = b.to(dtype=f.dtype)
                name = key[: -len(".weight")]
                t0 = time.perf_counter()
                w = config.compress(f, b, name)
                seconds = time.perf_counter() - t0
                del f, b
                layers[name] = layer_spec(w)
                for inner in w.tensor_data_names[1:]:
                    tensors[f"{key}{SEP}{inner}"] = getattr(w, inner).detach().contiguous()
                timings.append({"name": name, "shape": list(w.shape), "seconds": seconds})
                del w
            elif key in base_set:
                b = base[key]
                entries[key] = _entry(b)
                if not _same(f, b):
                    kept[key] = f
                del b
            else:  # only in the fine-tuned checkpoint (strict=False)
                kept[key] = f
            f = None
        bar.close()
        rest = [k for k in base.keys() if k not in entries and k not in aliases]  # base-only (strict=False)
        for key in tqdm(rest, desc="base fingerprint", disable=not (progress and rest), unit="tensor"):
            entries[key] = _entry(base[key])
    # `layers` in module order, as compressed_layers(model) lists them
    layers = {k[: -len(".weight")]: layers[k[: -len(".weight")]] for k in compressed}
    model_type = base.model_type or ft.model_type
    document = _write_artifact(
        out, tensors, kept, layers=layers, aliases=aliases,
        fingerprint=_fingerprint_of_entries(entries, model_type, complete=True), config=config,
        model_dtype=model_dtype if model_dtype is not None else torch.float32,
        model_config=_model_config(types.SimpleNamespace(config=model_config)) if model_config is not None else None,
        metadata=metadata, overwrite=overwrite,
    )
    del tensors, kept
    return {
        "out_dir": str(out),
        "tensors": len(order),
        "compressed": len(layers),
        "kept": len(document["kept"]),
        "bytes_in": sum(p.stat().st_size for p in base.files + ft.files),
        "bytes_compressed": document["bytes"]["compressed"],
        "bytes_kept": document["bytes"]["kept"],
        "artifact_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        "files": {"delta": WEIGHTS_NAME, "config": CONFIG_NAME},
        "seconds": time.perf_counter() - start,
        "per_matrix": timings,
    }
