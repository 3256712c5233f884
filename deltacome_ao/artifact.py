"""The delta artifact — only what a fine-tune adds to its base, on disk.

`save_delta(model, out_dir, base=...)` writes a directory with

- `delta.safetensors`: every inner tensor of each compressed weight except `base_weight`, under
  `<module>.weight:<inner name>`, plus every other tensor of the fine-tuned model that differs from
  the base (embeddings, norms, lm_head, biases: the kept, non-linear deltas), under its own name;
- `delta_config.json`: format version, method / alpha (when known), the per-layer structure
  (`DeltaTensor.spec()`), the library version and a fingerprint of the base (`fingerprint.py`).

`load_delta(base_model, delta_dir)` (or `DeltaCoMeModel.from_pretrained(base_or_path, delta_dir)`)
checks the base against the fingerprint, then puts the delta onto it: each compressed layer becomes
a tensor subclass around the base module's own weight, the kept tensors replace the base's.
Only safetensors and JSON are read; nothing is unpickled. The format itself is `format.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import BaseWeights, few, unaliased, write_dir_atomic
from .compress import compressed_layers, coverage_summary, notify_compressed, uncompressed_reason
from .config import DeltaCoMeConfig
from .delta_tensor import DeltaTensor, dtype_name, parse_dtype
from .fingerprint import (
    VERIFY_LEVELS,
    BaseMismatchError,
    check_base,
    fingerprint,
    same,
    tensor_entry,
)
from .format import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    SEP,
    WEIGHTS_NAME,
    DeltaFormatError,
    assemble,
    check_spec,
    flatten_state_dict,
    inner_layout,
    layer_key,
    layer_spec,
    method_fields,
    model_config,
    read_delta_config,
    shell,
    spec_key,
    stored_names,
)
from .finetune_config import apply_finetune_config
from .version import __version__

__all__ = [
    "save_delta",
    "load_delta",
    "delta_size",
    "DeltaArtifact",
    "get_tensor",
    "set_tensor",
    "read_delta_config",
    "DeltaCoMeModel",
    "BaseMismatchError",
    "DeltaFormatError",
    # kept importable from here (their home is format.py / compress.py)
    "compressed_layers",
    "layer_spec",
    "inner_layout",
    "shell",
    "assemble",
    "flatten_state_dict",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SEP",
    "FORMAT_VERSION",
]


# --- save ------------------------------------------------------------------------------------------


def save_delta(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    base: Any = None,
    config: Optional[DeltaCoMeConfig] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write the delta of the compressed `model` to `out_dir` (atomically) and return its path.

    base: the base the model was compressed against (`nn.Module`, state dict or safetensors
        directory, as for `DeltaCoMeConfig`; or the config itself). Then only the non-compressed
        tensors that differ from it are stored, the fingerprint covers every base tensor, and each
        compressed layer's `base_weight` is checked to be that base's weight. Without it every
        non-compressed tensor is stored and the fingerprint covers the base weights of the
        compressed layers only — exactly the base tensors the loaded model then depends on.
    config: the `DeltaCoMeConfig` used (recorded: method, alpha, group size, allocation).
    metadata: any JSON-serialisable mapping, stored under "user".

    Raises ValueError (no compressed layer), `BaseMismatchError` (the base is not the one the layers
    were built on), FileExistsError (`out_dir` exists and not `overwrite`).
    """
    layers = compressed_layers(model)
    if not layers:
        raise ValueError("the model has no compressed layer; run compress_(model, DeltaCoMeConfig(base=...)) first")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if isinstance(base, DeltaCoMeConfig):
        config, base = base, base.base
    weight_keys = {layer_key(n, w.dim()): n for n, w in layers.items()}
    state, model_aliases = unaliased(model.state_dict(keep_vars=False).items())  # ties of compressed tables too
    state = {k: v for k, v in state.items() if k not in weight_keys}
    tensors: dict[str, torch.Tensor] = {}
    for name, w in layers.items():
        for inner, t in w.delta_tensors().items():
            tensors[f"{layer_key(name, w.dim())}{SEP}{inner}"] = t.detach().contiguous()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base is None:
        kept = dict(state)
        fp = fingerprint({k: tensor_entry(layers[n].base_weight) for k, n in weight_keys.items()}, model_type,
                         complete=False)
    else:
        kept, fp = _diff_against_base(base if isinstance(base, BaseWeights) else BaseWeights(base), layers,
                                      weight_keys, state, model_type)
    DeltaArtifact(
        layers={name: w.spec() for name, w in layers.items()}, tensors=tensors, kept=kept,
        aliases=dict(model_aliases), fingerprint=fp, model_dtype=next((p.dtype for p in model.parameters()), torch.float32),
        model_config=model_config(getattr(model, "config", None)), config=config, metadata=metadata,
        coverage=_coverage(model, layers, kept) if base is not None else None,
    ).write(out, overwrite)
    return out


def _coverage(model, layers, kept) -> dict:
    """The coverage section of delta_config.json: the compressed layers and the kept (changed,
    uncompressed) tensors, each with the reason it is not compressed (`compress.coverage_summary`)."""
    compressed = {layer_key(n, w.dim()): w.numel() for n, w in layers.items()}
    skipped = getattr(model, "deltacome_skipped", None)
    reasons = {k: uncompressed_reason(model, k, skipped) for k in kept}
    return coverage_summary({**compressed, **{k: v.numel() for k, v in kept.items()}}, compressed, reasons)


def _diff_against_base(weights: BaseWeights, layers, weight_keys, state, model_type):
    """One base tensor at a time (a safetensors base is read lazily): fingerprint it, check the
    compressed layer built on it, or compare it with the fine-tuned tensor of the same name.
    Returns (kept tensors, fingerprint)."""
    missing = [k for k in weight_keys if k not in weights]
    if missing:
        raise BaseMismatchError(f"the base has no tensor {few(missing)}; pass the base this model was compressed against")
    tied = weights.aliases()
    entries, kept = {}, {}
    for key in weights.keys():
        if key in tied:
            continue
        b = weights[key]
        entries[key] = tensor_entry(b)
        if key in weight_keys:
            w = layers[weight_keys[key]].base_weight
            if tuple(b.shape) != tuple(w.shape) or not same(b.to(w.dtype), w):
                raise BaseMismatchError(
                    f"{key}: the compressed layer's base weight is not this base's weight; "
                    f"pass the base this model was compressed against"
                )
        elif key in state and not same(state[key], b):
            kept[key] = state[key]
    kept.update({k: v for k, v in state.items() if k not in entries and k not in kept})
    return kept, fingerprint(entries, weights.model_type or model_type, complete=True)


@dataclass
class DeltaArtifact:
    """Everything a delta artifact holds, before it is written (built by `save_delta` and by
    `streaming.compress_streaming`, written by `write`).

    layers: {module name: layer spec}, in module order. tensors: the compressed layers' inner
    tensors by stored name (`<module>.weight:<inner>`). kept: the other tensors that differ from the
    base. aliases: {tied name: kept name}. fingerprint: `fingerprint.fingerprint(...)` of the base.
    """

    layers: dict
    tensors: dict
    kept: dict
    aliases: dict
    fingerprint: dict
    model_dtype: torch.dtype = torch.float32
    model_config: Optional[dict] = None
    config: Optional[DeltaCoMeConfig] = None
    metadata: Optional[Mapping[str, Any]] = None
    coverage: Optional[dict] = None

    def document(self) -> dict:
        """The `delta_config.json` content."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library": "deltacome_ao",
            "library_version": __version__,
            **method_fields(self.config),
            "model_dtype": dtype_name(self.model_dtype),
            "layers": dict(self.layers),
            "kept": sorted(self.kept),
            "aliases": dict(self.aliases),  # tied in the fine-tuned model: tied again on load
            "bytes": {"compressed": sum(spec["delta_bytes"] for spec in self.layers.values()),
                      "kept": sum(v.numel() * v.element_size() for v in self.kept.values())},
            "base_fingerprint": self.fingerprint,
            "model_config": self.model_config,
            "user": dict(self.metadata) if self.metadata is not None else None,
            **({"coverage": self.coverage} if self.coverage is not None else {}),
        }

    def write(self, out: str | os.PathLike, overwrite: bool = False) -> dict:
        """Write the artifact directory atomically; returns the document. ValueError if a kept
        tensor's name contains the separator, TypeError if the metadata is not JSON-able (both
        before anything is written)."""
        clash = [k for k in self.kept if SEP in k]
        if clash:
            raise ValueError(f"tensor names may not contain {SEP!r}: {few(clash)}")
        tensors = {**self.tensors, **{k: v.detach().contiguous() for k, v in self.kept.items()}}
        document = self.document()
        text = json.dumps(document, indent=2, sort_keys=False) + "\n"

        def fill(tmp: Path):
            (tmp / CONFIG_NAME).write_text(text)
            save_file(tensors, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "deltacome": FORMAT, "format_version": str(FORMAT_VERSION)})

        write_dir_atomic(Path(out), fill, overwrite)
        return document


def delta_size(delta_dir: str | os.PathLike) -> int:
    """Bytes on disk of the artifact (both files, safetensors header and JSON included)."""
    path = Path(delta_dir)
    read_delta_config(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# --- load ------------------------------------------------------------------------------------------


def _owner(model: torch.nn.Module, name: str):
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return None, leaf
    return owner, leaf


def get_tensor(model: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """The parameter or buffer `name` of `model`, or None if it has none."""
    owner, leaf = _owner(model, name)
    if owner is None:
        return None
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    return owner._buffers.get(leaf) if leaf in owner._buffers else None


def set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` (a parameter keeps its requires_grad where it can)."""
    owner, leaf = _owner(model, name)
    if owner is not None and leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad) and value.is_floating_point()
        )
    elif owner is not None and leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise BaseMismatchError(f"{name}: the base model has no such parameter or buffer")


def load_delta(base_model: torch.nn.Module, delta_dir: str | os.PathLike, verify: str = "full") -> torch.nn.Module:
    """Put the delta in `delta_dir` onto `base_model` (in place) and return it.

    verify: "full" hashes every byte of the base tensors the delta depends on, "sample" a fixed
    1 MiB per tensor (fast for large bases; see docs/artifact.md), "none" only checks names, shapes
    and dtypes. A mismatch raises `BaseMismatchError` naming what differs; a malformed artifact
    `DeltaFormatError`. Every check happens before anything changes: a failed load leaves the base
    as it was. The compressed layers wrap the base module's own weight (no copy when the dtypes agree).
    Config fields the fine-tune changed (RoPE scaling, norm epsilon, ...; the artifact's `model_config`)
    are applied to the model (`finetune_config.apply_finetune_config`); one that changes the structure
    raises `ConfigMismatchError`, before anything changes.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    path = Path(delta_dir)
    document = read_delta_config(path)
    layers: dict[str, dict] = document["layers"]
    kept: list[str] = document.get("kept", [])
    aliases: dict[str, str] = document.get("aliases", {})

    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        stored = set(f.keys())
        expected = stored_names(layers, with_base=False) | set(kept)
        if stored != expected:
            raise DeltaFormatError(
                f"{path / WEIGHTS_NAME}: tensors missing {few(sorted(expected - stored))}, "
                f"unexpected {few(sorted(stored - expected))}"
            )
        already = sorted(compressed_layers(base_model))
        if already:
            raise ValueError(
                f"the base model already holds compressed weights ({few(already)}); load the delta onto a plain base"
            )
        base_state, _ = unaliased(base_model.state_dict(keep_vars=False).items())
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        check_base(document["base_fingerprint"], base_state, model_type, verify, what=str(path))
        new = _build(base_model, f, layers, kept)
        for alias, target in aliases.items():
            if get_tensor(base_model, alias) is None:
                raise BaseMismatchError(f"{alias}: stored in the delta but the base model has no such tensor")
            if target not in new and get_tensor(base_model, target) is None:
                raise DeltaFormatError(f"{path / CONFIG_NAME}: alias {alias!r} names {target!r}, which is no tensor")

    # the fine-tune's config (fields that differ from the base's): checked before anything changes
    apply_config = apply_finetune_config(base_model, document.get("model_config"), where=str(path))
    # swap in: nothing can fail any more short of a programming error
    apply_config()
    for name, value in new.items():
        set_tensor(base_model, name, value)
    for alias, target in aliases.items():
        set_tensor(base_model, alias, get_tensor(base_model, target))
    notify_compressed(base_model, {k: document.get(k) for k in ("method", "alpha", "group_size", "allocation", "calibrated")})
    return base_model


def _build(base_model, f, layers: Mapping[str, dict], kept) -> dict[str, torch.Tensor]:
    """Every new tensor of a load, built before the model changes ({tensor name: value})."""
    new: dict[str, torch.Tensor] = {}
    for name, spec in layers.items():
        key = spec_key(name, spec)
        owner, _, leaf = key.rpartition(".")
        try:
            module = base_model.get_submodule(owner)
        except AttributeError:
            raise BaseMismatchError(f"{name}: the base model has no such module") from None
        w = module._parameters.get(leaf)
        if isinstance(w, DeltaTensor):
            raise ValueError(f"{name}: the base model already holds a compressed weight; load the delta onto a plain base")
        if not isinstance(w, torch.Tensor) or list(w.shape) != spec["shape"]:
            raise BaseMismatchError(f"{name}: weight {None if w is None else tuple(w.shape)}, the delta needs {tuple(spec['shape'])}")
        cls = check_spec(spec, name)
        inner = {n: f.get_tensor(f"{key}{SEP}{n}").to(w.device) for n in cls.tensor_data_names[1:]}
        inner["base_weight"] = w.detach()
        new[key] = torch.nn.Parameter(assemble(spec, inner, where=name), requires_grad=False)
    for name in kept:
        current = get_tensor(base_model, name)
        if current is None:
            raise BaseMismatchError(f"{name}: stored in the delta but the base model has no such tensor")
        new[name] = f.get_tensor(name).to(current.device)
    return new


class DeltaCoMeModel:
    """PEFT-style entry point: `DeltaCoMeModel.from_pretrained(base, delta_dir)` returns the base
    model (loaded from a path if needed) with the delta put on, as a plain transformers model."""

    @staticmethod
    def from_pretrained(base_model_or_path: Any, delta_dir: str | os.PathLike, verify: str = "full", **kwargs) -> torch.nn.Module:
        """`base_model_or_path`: an already loaded base `nn.Module` (modified in place) or a local
        directory / name for `AutoModelForCausalLM.from_pretrained(..., **kwargs)`; the base is then
        loaded in the dtype the fingerprint records unless `dtype=` is given."""
        if isinstance(base_model_or_path, torch.nn.Module):
            if kwargs:
                raise TypeError(f"loading options {sorted(kwargs)} only apply when the base is given as a path")
            return load_delta(base_model_or_path, delta_dir, verify=verify)
        document = read_delta_config(delta_dir)
        from transformers import AutoModelForCausalLM

        if "dtype" not in kwargs:
            dtypes = [e.get("dtype") for e in document["base_fingerprint"]["tensors"].values()]
            kwargs["dtype"] = parse_dtype(max(set(dtypes), key=dtypes.count)) if dtypes else "auto"
        base = AutoModelForCausalLM.from_pretrained(base_model_or_path, **kwargs)
        return load_delta(base, delta_dir, verify=verify)
