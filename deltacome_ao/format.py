"""The stored form of compressed weights: names, versions, layer specs, and the artifact's JSON.

Shared by the delta artifact (`artifact.py`), streaming compression and the Hugging Face checkpoint
(`hf.py`); docs/format.md and docs/artifact.md describe the bytes. A compressed weight at
`<module>.weight` is stored as its inner tensors `<module>.weight:<inner>` and described by its
layer spec (`DeltaTensor.spec()`: tensor class name, shape, dtype, delta bytes and the class's
attributes). The tensor class is looked up by name in the method registry (`methods.tensor_kinds`),
so a new kind is readable as soon as its method is registered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .delta_tensor import DeltaSpecError, DeltaTensor, dtype_name, parse_dtype
from .methods import tensor_kind

__all__ = [
    "FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "SEP", "DeltaFormatError", "weight_key", "layer_key",
    "spec_key",
    "tensor_class", "check_spec", "layer_spec", "inner_layout", "shell", "assemble", "stored_names",
    "flatten_state_dict", "read_delta_config", "method_fields", "model_config", "CONFIG_NOISE", "dtype_name",
    "parse_dtype",
]

FORMAT = "deltacome-delta"
FORMAT_VERSION = 1
CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
SEP = ":"  # `<module>.weight:<inner>`; never part of a PyTorch parameter name
# config.json entries that say nothing about the weights (ignored when comparing configs).
CONFIG_NOISE = frozenset({"_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype",
                          "torch_dtype", "quantization_config", "_commit_hash", "_attn_implementation_autoset",
                          "use_cache"})


class DeltaFormatError(ValueError):
    """The artifact (or checkpoint) is not a valid deltacome delta of this version."""


def weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def layer_key(name: str, ndim: int = 2) -> str:
    """The state-dict key of compressed layer `name`: `<module>.weight` for a 2-D weight (the layer is
    named by its module), the name itself for a 3-D stack of expert matrices (named by its parameter,
    e.g. `model.layers.0.mlp.experts.gate_up_proj`). `ndim`: the layer spec's `len(shape)`."""
    return name if ndim == 3 else weight_key(name)


def spec_key(name: str, spec: Mapping) -> str:
    """`layer_key` of a layer described by its spec."""
    shape = spec.get("shape") if isinstance(spec, Mapping) else None
    return layer_key(name, len(shape) if isinstance(shape, list) else 2)


def tensor_class(spec: Any, where: str = "layer") -> type[DeltaTensor]:
    """The registered `DeltaTensor` class a layer spec names; `DeltaFormatError` otherwise."""
    if not isinstance(spec, Mapping):
        raise DeltaFormatError(f"{where}: a layer spec must be a JSON object, got {type(spec).__name__}")
    try:
        return tensor_kind(spec.get("tensor"))
    except KeyError as e:
        raise DeltaFormatError(f"{where}: {e.args[0]}") from None


def check_spec(spec: Any, where: str = "layer") -> type[DeltaTensor]:
    """Validate a layer spec; returns its tensor class. Raises `DeltaFormatError`."""
    cls = tensor_class(spec, where)
    try:
        cls.check_spec(spec, where)
    except DeltaSpecError as e:
        raise DeltaFormatError(str(e)) from None
    return cls


def layer_spec(weight: torch.Tensor) -> dict:
    """JSON-able structure of one compressed weight (`DeltaTensor.spec`)."""
    if not isinstance(weight, DeltaTensor):
        raise TypeError(f"not a compressed weight: {type(weight).__name__}")
    return weight.spec()


def inner_layout(spec: Mapping, dtype: Optional[torch.dtype] = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{inner tensor name: (shape, dtype)} of the weight `spec` describes, `base_weight` included."""
    return check_spec(spec).inner_layout(spec, dtype)


def shell(spec: Mapping, device: Any = "meta", dtype: Optional[torch.dtype] = None) -> DeltaTensor:
    """An uninitialised compressed weight of the structure `spec` describes."""
    return check_spec(spec).shell(spec, device, dtype)


def assemble(spec: Mapping, tensors: Mapping[str, torch.Tensor], where: str = "layer",
             dtype: Optional[torch.dtype] = None) -> DeltaTensor:
    """The compressed weight `spec` describes, from its inner tensors (checked; `DeltaFormatError`)."""
    cls = check_spec(spec, where)
    try:
        return cls.from_parts(spec, tensors, where, dtype)
    except DeltaSpecError as e:
        raise DeltaFormatError(str(e)) from None


def stored_names(layers: Mapping[str, Mapping], with_base: bool) -> set[str]:
    """The `<module>.weight:<inner>` names the layers' inner tensors are stored under."""
    out = set()
    for name, spec in layers.items():
        inner = check_spec(spec, name).tensor_data_names
        out |= {f"{spec_key(name, spec)}{SEP}{n}" for n in (inner if with_base else inner[1:])}
    return out


def flatten_state_dict(state_dict: Mapping[str, torch.Tensor], skip_base: bool = False) -> dict[str, torch.Tensor]:
    """Plain-tensor state dict: each compressed weight `k` becomes `k:<inner>` entries (all of them,
    or all but `base_weight` with `skip_base`); other tensors stay as they are."""
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, DeltaTensor):
            for name in value.tensor_data_names:
                if not (skip_base and name == "base_weight"):
                    out[f"{key}{SEP}{name}"] = getattr(value, name).contiguous()
        else:
            out[key] = value
    return out


def method_fields(config: Any) -> dict:
    """How a delta was made, for the JSON documents: method, alpha, group size, allocation, calibrated."""
    if config is None:
        return {"method": None, "alpha": None, "group_size": None, "allocation": None, "calibrated": None}
    return {
        "method": config.method,
        "alpha": config.alpha,
        "group_size": config.group_size,
        "allocation": config.allocation,
        "calibrated": config.calibration is not None,
    }


def model_config(config: Any) -> Optional[dict]:
    """A transformers config as a dict without the entries that say nothing about the weights."""
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in CONFIG_NOISE}


def read_delta_config(delta_dir: str | os.PathLike) -> dict:
    """`delta_config.json` of an artifact directory, validated (format, version, layer specs).

    Raises FileNotFoundError (not an artifact) or `DeltaFormatError` (anything malformed)."""
    path = Path(delta_dir)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a delta artifact (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        document = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaFormatError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise DeltaFormatError(f"{path / CONFIG_NAME}: not a JSON object")
    if document.get("format") != FORMAT:
        raise DeltaFormatError(f"{path}: format {document.get('format')!r}, expected {FORMAT!r}")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"{path}: format_version {version!r}; this deltacome_ao reads versions up to {FORMAT_VERSION} (upgrade it)"
        )
    layers = document.get("layers", {})
    if not isinstance(layers, dict):
        raise DeltaFormatError(f"{path / CONFIG_NAME}: 'layers' must be an object")
    for name, spec in layers.items():
        check_spec(spec, name)
    return document
