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
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .artifact import DeltaArtifact
from .checkpoint import BaseWeights, CheckpointMismatchError, check_pair, few, safetensors_files
from .compress import compress_layer, coverage_summary, matmul_layers, uncompressed_reason
from .config import DeltaCoMeConfig
from .methods import handing_over_base
from .methods.mixed_precision import BudgetTooSmallError
from .fingerprint import fingerprint, same, tensor_entry
from .format import CONFIG_NAME, SEP, WEIGHTS_NAME, model_config as config_fields
from .hub import base_reference
from .recipes import Recipe, recipe_for

__all__ = ["compress_streaming", "CheckpointMismatchError", "checkpoint_files", "linear_weight_names"]

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


def _checkpoint(model_dir: str | os.PathLike, role: str) -> BaseWeights:
    """`BaseWeights` over a checkpoint directory, with errors that name its role ("base", ...)."""
    checkpoint_files(model_dir, role)
    return BaseWeights(Path(model_dir), role=role)


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


class _ConvertedWeights(BaseWeights):
    """A checkpoint read under the names and shapes the model has once transformers converted it on load
    (Mixtral's per-expert `block_sparse_moe.experts.N.w1/w3.weight` merged into `mlp.experts.gate_up_proj`,
    LLaVA's renamed prefixes, ...): a merged tensor is built from its sources, one target at a time, with
    transformers' own converter, when it is read."""

    def __init__(self, inner: BaseWeights, skeleton, plan: dict, converters: dict):
        self.__dict__.update(inner.__dict__)
        self._inner, self._plan, self._converters = inner, plan, converters
        self._shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        self._skeleton = skeleton

    def keys(self) -> list[str]:
        return list(self._plan)

    def __contains__(self, name: str) -> bool:
        return name in self._plan

    def __getitem__(self, name: str) -> torch.Tensor:
        sources = self._plan[name]
        if len(sources) == 1 and sources[0][1] is None:
            return self._inner[sources[0][0]]
        import copy

        converter = copy.deepcopy(self._converters[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, self._inner[key])
        out = converter.convert(name, model=self._skeleton, config=getattr(self._skeleton, "config", None))
        value = out[name]
        return value[0] if isinstance(value, list) else value

    def shape(self, name: str) -> tuple[int, ...]:
        sources = self._plan[name]
        if len(sources) == 1 and sources[0][1] is None:
            return self._inner.shape(sources[0][0])
        return self._shapes[name]

    def aliases(self) -> dict[str, str]:
        return {}


def _as_loaded(weights: BaseWeights, skeleton) -> BaseWeights:
    """`weights` under the names transformers loads them as into `skeleton` (itself when nothing is renamed)."""
    if skeleton is None:
        return weights
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return weights
    conversions = get_model_conversion_mapping(skeleton)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    plan: dict[str, list] = {}
    for key in sorted(weights.keys(), key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = key, None
        plan.setdefault(target, []).append((key, pattern))
    if all(len(v) == 1 and v[0] == (k, None) for k, v in plan.items()):
        return weights
    return _ConvertedWeights(weights, skeleton, plan, {p: c for c in converters for p in c.source_patterns})


def _structure(skeleton, recipe: Recipe, ft: BaseWeights, shapes: Mapping[str, tuple], embeddings: bool = False):
    """(ordered fine-tuned tensor names, {compressed key: `compress.Layer` or None}, {alias: kept name},
    first parameter name)."""
    if skeleton is None:
        order = list(ft.keys())
        return order, dict.fromkeys(linear_weight_names(order, recipe, shapes)), {}, (order[0] if order else None)
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
            f"the fine-tuned checkpoint lacks {len(missing)} tensor(s) its config.json's model has: {few(missing)}"
        )
    listed = set(order)
    order += [k for k in ft.keys() if k not in listed and k not in aliases]  # stored extras, as save_delta keeps them
    compressed = {  # compress_'s selection, on the skeleton
        layer.key: layer for layer in matmul_layers(skeleton, None, embeddings)
        if recipe.selects(layer.name) and layer.key in ft and layer.key not in aliases
    }
    first = next((n for n, _ in skeleton.named_parameters()), None)
    first = aliases.get(first, first)
    return order, compressed, aliases, first


def compress_streaming(
    base_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    strict: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    base_model_name_or_path: Optional[str] = None,
    base_revision: Optional[str] = None,
    device: Any = None,
    **options: Any,
) -> dict:
    """Compress the fine-tuned checkpoint against the base checkpoint into the delta artifact `out_dir`.

    options: `DeltaCoMeConfig` fields (`alpha`, `method`, `group_size`, `allocation`, `svd`, `bands`,
        `single_bits`, `candidates`, `recipe`, `progress`, ...; `calibration` needs forward passes
        and is refused).
    strict: the two checkpoints must hold the same tensor names (else `CheckpointMismatchError`);
        with `strict=False` fine-tuned-only tensors are kept as they are, as `save_delta` does.
    metadata: stored under "user" in `delta_config.json`.
    base_model_name_or_path, base_revision: recorded for the base (default: `base_dir`, or the repo
        id and commit of a Hub cache snapshot directory; `hub.base_reference`).
    device: where each pair is compressed (e.g. "cuda": the SVD and quantization of one matrix run
        there, one pair of tensors at a time on the device); the packed factors come back to the CPU
        before the next pair. Default: the CPU. ValueError for "meta".

    Everything checkable from the headers (names, shapes, model type, an existing `out_dir`) is
    checked before any work; nothing is written until the end, atomically, so an error leaves no
    output directory. Returns a summary (counts, bytes, seconds, per-matrix timings).
    """
    if options.get("calibration") is not None:
        raise ValueError("compress_streaming is data-free: calibration (GPTQ) needs the whole model; use quantize_")
    if options.get("allocation") == "global":
        raise ValueError("compress_streaming compresses one tensor pair at a time, but allocation='global' plans one "
                         "budget over every matrix first; use compress_ (or allocation='optimal' here)")
    if device is not None and torch.device(device).type == "meta":
        raise ValueError("device='meta': compression needs the weights' values (an SVD of each delta); pass a real "
                         "device (e.g. 'cuda') or None for the CPU")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    base_path, ft_path = Path(base_dir), Path(finetuned_dir)
    base = _checkpoint(base_path, "base")
    ft = _checkpoint(ft_path, "fine-tuned checkpoint")
    config = DeltaCoMeConfig(base=base, **options)
    progress = config.progress
    model_config, skeleton = _skeleton(ft_path)
    # checkpoints whose tensors transformers converts on load (merged MoE experts, renamed prefixes) are
    # read as the loaded model has them, so the artifact is the one save_delta writes for that model
    ft, base = _as_loaded(ft, skeleton), _as_loaded(base, skeleton)
    config.base = base
    recipe = config.recipe or recipe_for(ft.model_type)
    order, compressed, aliases, first = _structure(skeleton, recipe, ft, {k: ft.shape(k) for k in ft.keys()},
                                                   config.embeddings)
    if not compressed:
        raise ValueError(f"recipe {recipe.name!r} selects no linear weight of {ft_path}; pass recipe= for this model")
    check_pair(base, {k: ft.shape(k) for k in order}, list(compressed), model_type=ft.model_type, strict=strict,
               ignore=aliases)
    base_set = set(base.keys())
    # each base tensor is read (or cast) for its one compress call and dropped with the compressed weight
    # right after: the weight may hold it as it is (no copy of the base per matrix)
    compressing = handing_over_base(config)
    skipped: dict[str, str] = {}
    budget_errors: list = []

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    kept: dict[str, torch.Tensor] = {}
    timings: list[dict] = []
    model_dtype = None
    bar = tqdm(order, desc=f"{config.method} delta (streaming)", disable=not progress, unit="tensor")
    with torch.no_grad():
        for key in bar:
            if progress:
                bar.set_postfix_str(key, refresh=False)
            f = ft[key]
            if key == first:
                model_dtype = f.dtype
            w = None
            if key in compressed:
                b = base[key]
                entries[key] = tensor_entry(b)
                b = b.to(dtype=f.dtype)
                layer = compressed[key]
                name = layer.name if layer is not None else key[: -len(".weight")]
                t0 = time.perf_counter()
                fd, bd = (f, b) if device is None else (f.to(device), b.to(device))
                try:
                    w = (compress_layer(layer, fd, bd, compressing) if layer is not None
                         else compressing.compress(fd, bd, name))
                except BudgetTooSmallError as e:  # as compress_: a matrix too small for one vector stays dense
                    budget_errors.append(e)
                    skipped[key] = "budget"
                except NotImplementedError:
                    if layer is None or layer.form != "experts":
                        raise
                    skipped[key] = "unstackable"
                seconds = time.perf_counter() - t0
                del fd, bd
                if w is None:
                    if not same(f, b):
                        kept[key] = f
                    del b
                    continue
                del f, b
                layers[name] = w.spec()
                for inner, t in w.delta_tensors().items():
                    tensors[f"{key}{SEP}{inner}"] = t.detach().to("cpu").contiguous()
                timings.append({"name": name, "shape": list(w.shape), "seconds": seconds})
                del w
            elif key in base_set:
                b = base[key]
                entries[key] = tensor_entry(b)
                if not same(f, b):
                    kept[key] = f
                del b
            else:  # only in the fine-tuned checkpoint (strict=False)
                kept[key] = f
            f = None
        bar.close()
        if budget_errors and not layers:
            raise budget_errors[0]
        rest = [k for k in base.keys() if k not in entries and k not in aliases]  # base-only (strict=False)
        for key in tqdm(rest, desc="base fingerprint", disable=not (progress and rest), unit="tensor"):
            entries[key] = tensor_entry(base[key])
    # `layers` in module order, as compressed_layers(model) lists them
    names = [(layer.name if layer is not None else k[: -len(".weight")]) for k, layer in compressed.items()]
    layers = {n: layers[n] for n in names if n in layers}
    compressed_params = {key: int(torch.Size(ft.shape(key)).numel()) for key, layer in compressed.items()
                         if key not in skipped}
    reasons = {k: uncompressed_reason(skeleton, k, skipped) if skeleton is not None else skipped.get(k, "other")
               for k in kept}
    coverage = coverage_summary({**compressed_params, **{k: v.numel() for k, v in kept.items()}}, compressed_params,
                                reasons)
    del skeleton
    model_type = base.model_type or ft.model_type
    document = DeltaArtifact(
        layers=layers, tensors=tensors, kept=kept, aliases=aliases,
        fingerprint=fingerprint(entries, model_type, complete=True),
        model_dtype=model_dtype if model_dtype is not None else torch.float32,
        model_config=config_fields(model_config), config=config, metadata=metadata, coverage=coverage,
        **dict(zip(("base_model_name_or_path", "base_revision"),
                   base_reference(base_dir, base_model_name_or_path, base_revision))),
    ).write(out, overwrite)
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
