"""Stage 8 (integrations): the delta artifact — only what a fine-tune adds to its base, on disk.

`save_delta(model, out_dir, base=...)` writes a directory with

- `delta.safetensors`: every inner tensor of each compressed weight except `base_weight`, under
  `<module>.weight:<inner name>`, plus every other tensor of the fine-tuned model that differs from
  the base (embeddings, norms, lm_head, biases: the kept, non-linear deltas), under its own name;
- `delta_config.json`: format version, method / alpha (when known), the per-layer structure
  (`bits`, `counts`, `group_size`), the library version and a fingerprint of the base.

`load_delta(base_model, delta_dir)` (or `DeltaCoMeModel.from_pretrained(base_or_path, delta_dir)`)
checks the base against the fingerprint, then puts the delta onto it: each compressed layer becomes
a tensor subclass around the base module's own weight, the kept tensors replace the base's.
Only safetensors and JSON are read; nothing is unpickled.

The per-layer helpers here (`layer_spec`, `inner_layout`, `shell`, `assemble`) are also what the
Hugging Face quantizer (`deltacome_ao.hf`) uses to rebuild the same tensors from `config.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .allocate import FP16_BITS, SUPPORTED_BITS
from .bitdelta_tensor import BitDeltaTensor
from .config import BaseWeights, DeltaCoMeConfig, _few
from .mixed_precision_delta_tensor import MixedPrecisionDeltaTensor
from .packing import packed_nbytes

__all__ = [
    "save_delta",
    "load_delta",
    "delta_size",
    "read_delta_config",
    "DeltaCoMeModel",
    "BaseMismatchError",
    "DeltaFormatError",
    "compressed_layers",
    "layer_spec",
    "inner_layout",
    "shell",
    "assemble",
    "flatten_state_dict",
]

FORMAT = "deltacome-delta"
FORMAT_VERSION = 1
CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
SEP = ":"  # `<module>.weight:<inner>`; never part of a PyTorch parameter name
SAMPLE_CHUNK = 4096  # bytes per sampled chunk of the fast ("sample") content hash
SAMPLE_CHUNKS = 256
COMPRESSED = (MixedPrecisionDeltaTensor, BitDeltaTensor)
TENSOR_CLASSES = {cls.__name__: cls for cls in COMPRESSED}
INNER_NAMES = tuple(dict.fromkeys(n for cls in COMPRESSED for n in cls.tensor_data_names))
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}
# config.json entries that say nothing about the weights (ignored when comparing configs on load).
_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                 "quantization_config", "_commit_hash", "_attn_implementation_autoset", "use_cache"}


class DeltaFormatError(ValueError):
    """The artifact (or checkpoint) is not a valid deltacome delta of this version."""


class BaseMismatchError(ValueError):
    """The base model given to `load_delta` is not the one the delta was made against."""


# --- per-layer structure ---------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, where: str = "") -> torch.dtype:
    if name not in _DTYPES:
        raise DeltaFormatError(f"{where}unsupported dtype {name!r}")
    return _DTYPES[name]


def _weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def compressed_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module name: compressed weight} of every `MixedPrecisionDeltaTensor` / `BitDeltaTensor`."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), COMPRESSED)
    }


def layer_spec(weight: torch.Tensor) -> dict:
    """JSON-able structure of one compressed weight: everything needed to rebuild it from its
    inner tensors (and to know their shapes before reading them)."""
    spec = {
        "tensor": type(weight).__name__,
        "shape": list(weight.shape),
        "dtype": _dtype_name(weight.dtype),
        "delta_bytes": int(weight.delta_nbytes()),
    }
    if isinstance(weight, MixedPrecisionDeltaTensor):
        spec.update(bits=list(weight.bits), counts=list(weight.counts), group_size=int(weight.group_size))
    elif not isinstance(weight, BitDeltaTensor):
        raise TypeError(f"not a compressed weight: {type(weight).__name__}")
    return spec


def _check_spec(spec: Mapping, where: str):
    kind = spec.get("tensor")
    if kind not in TENSOR_CLASSES:
        raise DeltaFormatError(f"{where}: unknown tensor type {kind!r}; expected one of {sorted(TENSOR_CLASSES)}")
    shape = spec.get("shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise DeltaFormatError(f"{where}: bad shape {shape!r}")
    _dtype(spec.get("dtype", ""), f"{where}: ")
    if kind == "MixedPrecisionDeltaTensor":
        bits, counts, group = spec.get("bits"), spec.get("counts"), spec.get("group_size")
        if not (isinstance(bits, list) and isinstance(counts, list) and len(bits) == len(counts)):
            raise DeltaFormatError(f"{where}: bits and counts must be lists of the same length")
        if any(b not in SUPPORTED_BITS for b in bits) or any(not isinstance(c, int) or c < 1 for c in counts):
            raise DeltaFormatError(f"{where}: bad bands {list(zip(bits, counts))}")
        if not (isinstance(group, int) and group >= 1):
            raise DeltaFormatError(f"{where}: bad group_size {group!r}")


def inner_layout(spec: Mapping, dtype: Optional[torch.dtype] = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{inner tensor name: (shape, dtype)} of the weight described by `spec` (see docs/format.md),
    `base_weight` included (in `dtype`, default the spec's)."""
    _check_spec(spec, "layer")
    out_features, in_features = spec["shape"]
    base = ((out_features, in_features), dtype or _dtype(spec["dtype"]))
    if spec["tensor"] == "BitDeltaTensor":
        return {
            "base_weight": base,
            "sign_packed": ((packed_nbytes(1, out_features, in_features),), torch.uint8),
            "scale": ((1,), torch.float32),
        }
    bits, counts, group = spec["bits"], spec["counts"], spec["group_size"]
    quantized = sum(c for b, c in zip(bits, counts) if b != FP16_BITS)
    layout = {"base_weight": base}
    for factor, length in (("v", in_features), ("u", out_features)):
        groups = math.ceil(length / group)
        layout[f"{factor}_packed"] = ((sum(packed_nbytes(b, c, length) for b, c in zip(bits, counts)),), torch.uint8)
        layout[f"{factor}_scale"] = ((quantized, groups), torch.float16)
        layout[f"{factor}_zero"] = ((quantized, groups), torch.uint8)
    layout["s"] = ((sum(counts),), torch.float32)
    cls = TENSOR_CLASSES[spec["tensor"]]
    return {n: layout[n] for n in cls.tensor_data_names}


def _attributes(spec: Mapping) -> list:
    if spec["tensor"] == "MixedPrecisionDeltaTensor":
        return [tuple(spec["bits"]), tuple(spec["counts"]), spec["group_size"]]
    return []


def shell(spec: Mapping, device: Any = "meta", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised compressed weight of the right structure (every inner tensor `torch.empty`)."""
    layout = inner_layout(spec, dtype)
    cls = TENSOR_CLASSES[spec["tensor"]]
    inner = [torch.empty(shape, dtype=dt, device=device) for shape, dt in layout.values()]
    return cls(*inner, *_attributes(spec))


def assemble(spec: Mapping, tensors: Mapping[str, torch.Tensor], where: str = "layer",
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Build the compressed weight described by `spec` from its inner tensors, checking that exactly
    the expected tensors are there with the expected shapes and dtypes. `base_weight` is cast to
    `dtype` (default the spec's) — the only inner tensor whose dtype may differ from the layout."""
    layout = inner_layout(spec, dtype)
    missing, extra = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
    if missing or extra:
        raise DeltaFormatError(f"{where}: inner tensors missing {missing}, unexpected {extra}")
    inner = []
    for name, (shape, dt) in layout.items():
        t = tensors[name]
        if name == "base_weight":
            t = t.to(dt)
        if tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise DeltaFormatError(
                f"{where}: {name} is {tuple(t.shape)} {_dtype_name(t.dtype)}, the layer's structure "
                f"(bands {list(zip(spec.get('bits', []), spec.get('counts', [])))}) needs {tuple(shape)} {_dtype_name(dt)}"
            )
        inner.append(t.contiguous())
    return TENSOR_CLASSES[spec["tensor"]](*inner, *_attributes(spec))


def flatten_state_dict(state_dict: Mapping[str, torch.Tensor], skip_base: bool = False) -> dict[str, torch.Tensor]:
    """Plain-tensor state dict: each compressed weight `k` becomes `k:<inner>` entries (all of them,
    or all but `base_weight` with `skip_base`); other tensors stay as they are."""
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, COMPRESSED):
            for name in value.tensor_data_names:
                if not (skip_base and name == "base_weight"):
                    out[f"{key}{SEP}{name}"] = getattr(value, name).contiguous()
        else:
            out[key] = value
    return out


# --- fingerprint of the base -------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _full_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(_bytes(t).cpu().numpy().data)
    return h.hexdigest()


def _sample_hash(t: torch.Tensor) -> str:
    """sha256 over the whole tensor if it has at most SAMPLE_CHUNK * SAMPLE_CHUNKS bytes, else over
    SAMPLE_CHUNKS chunks of SAMPLE_CHUNK bytes spread evenly from the first byte to the last."""
    flat = _bytes(t)
    n = flat.numel()
    if n > SAMPLE_CHUNK * SAMPLE_CHUNKS:
        step = (n - SAMPLE_CHUNK) / (SAMPLE_CHUNKS - 1)
        flat = torch.cat([flat[round(k * step):round(k * step) + SAMPLE_CHUNK] for k in range(SAMPLE_CHUNKS)])
    h = hashlib.sha256()
    h.update(flat.cpu().numpy().data)
    return h.hexdigest()


def _alias_key(t: torch.Tensor):
    """Identity of the memory a tensor views (equal for tied weights), None if it has none."""
    if t.device.type == "meta" or not t.numel():
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _unaliased(items) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop later names of tensors that alias an earlier one (tied weights) -> (tensors, {alias: kept})."""
    seen, out, aliases = {}, {}, {}
    for name, t in items:
        key = _alias_key(t)
        if key is not None:
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        out[name] = t
    return out, aliases


def _entry(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": _full_hash(t), "sample_sha256": _sample_hash(t)}


def _fingerprint(tensors: Mapping[str, torch.Tensor], model_type: Optional[str], complete: bool) -> dict:
    return _fingerprint_of_entries({name: _entry(t) for name, t in tensors.items()}, model_type, complete)


def _fingerprint_of_entries(entries: Mapping[str, dict], model_type: Optional[str], complete: bool) -> dict:
    return {
        "model_type": model_type,
        "complete": complete,
        "hash": "sha256 of each tensor's raw bytes (sha256: all of them; sample_sha256: "
                f"{SAMPLE_CHUNKS} evenly spaced {SAMPLE_CHUNK}-byte chunks, all bytes if smaller)",
        "digest": _digest(entries),
        "tensors": dict(entries),
    }


def _digest(entries: Mapping[str, Mapping]) -> str:
    rows = sorted((n, e["shape"], e["dtype"], e["sha256"]) for n, e in entries.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _compare_base(fp: Mapping, tensors: Mapping[str, torch.Tensor], model_type: Optional[str], verify: str) -> list[str]:
    """What differs between the fingerprint and the given base tensors (empty: the right base)."""
    problems = []
    if fp.get("model_type") and model_type and fp["model_type"] != model_type:
        problems.append(f"model_type: the delta was made for a {fp['model_type']!r} base, this base is {model_type!r}")
    entries = fp["tensors"]
    missing = [n for n in entries if n not in tensors]
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the original base are missing: {_few(missing)}")
    if fp.get("complete"):
        extra = [n for n in tensors if n not in entries]
        if extra:
            problems.append(f"{len(extra)} tensor(s) the original base did not have: {_few(extra)}")
    shapes, dtypes, contents = [], [], []
    for name, e in entries.items():
        if name not in tensors:
            continue
        t = tensors[name]
        if list(t.shape) != e["shape"]:
            shapes.append(f"{name} {tuple(t.shape)} (expected {tuple(e['shape'])})")
        elif _dtype_name(t.dtype) != e["dtype"]:
            dtypes.append(f"{name} {_dtype_name(t.dtype)} (expected {e['dtype']})")
        elif verify != "none":
            digest = _full_hash(t) if verify == "full" else _sample_hash(t)
            if digest != e["sha256" if verify == "full" else "sample_sha256"]:
                contents.append(name)
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ: {_few(shapes)}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype(s) differ: {_few(dtypes)} (load the base in the dtype it had)")
    if contents:
        problems.append(f"{len(contents)} tensor(s) have other values ({verify} sha256): {_few(contents)}")
    return problems


# --- save ------------------------------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (dtype and shape included; NaN == NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a).cpu(), _bytes(b).cpu())


def _method_fields(config: Optional[DeltaCoMeConfig]) -> dict:
    if config is None:
        return {"method": None, "alpha": None, "group_size": None, "allocation": None, "calibrated": None}
    return {
        "method": config.method,
        "alpha": config.alpha,
        "group_size": config.group_size,
        "allocation": config.allocation,
        "calibrated": config.calibration is not None,
    }


def _model_config(model: torch.nn.Module) -> Optional[dict]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in _CONFIG_NOISE}


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
        directory, as for `DeltaCoMeConfig`). Then only the non-compressed tensors that differ from
        it are stored, the fingerprint covers every base tensor, and each compressed layer's
        `base_weight` is checked to be that base's weight. Without it every non-compressed tensor is
        stored and the fingerprint covers the base weights of the compressed layers only — exactly
        the base tensors the loaded model then depends on.
    config: the `DeltaCoMeConfig` used (recorded: method, alpha, group size, allocation).
    metadata: any JSON-serialisable mapping, stored under "user".
    """
    layers = compressed_layers(model)
    if not layers:
        raise ValueError("the model has no compressed layer; run quantize_(model, DeltaCoMeConfig(base=...)) first")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if isinstance(base, DeltaCoMeConfig):
        config, base = base, base.base
    weight_keys = {_weight_key(n): n for n in layers}
    state, model_aliases = _unaliased(
        (k, v) for k, v in model.state_dict(keep_vars=False).items() if k not in weight_keys
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, w in layers.items():
        for inner in w.tensor_data_names[1:]:
            tensors[f"{_weight_key(name)}{SEP}{inner}"] = getattr(w, inner).detach().contiguous()
    if base is None:
        kept = dict(state)
        fingerprint = _fingerprint(
            {k: layers[n].base_weight for k, n in weight_keys.items()},
            getattr(getattr(model, "config", None), "model_type", None), complete=False,
        )
    else:
        weights = base if isinstance(base, BaseWeights) else BaseWeights(base)
        missing = [k for k in weight_keys if k not in weights]
        if missing:
            raise BaseMismatchError(
                f"the base has no tensor {_few(missing)}; pass the base this model was compressed against"
            )
        # One base tensor at a time (a safetensors base is read lazily): fingerprint it, check the
        # compressed layer built on it, or compare it with the fine-tuned tensor of the same name.
        entries, kept, seen = {}, {}, {}
        for key in weights.keys():
            b = weights[key]
            alias = _alias_key(b)
            if alias is not None:
                if alias in seen:
                    continue
                seen[alias] = key
            entries[key] = _entry(b)
            if key in weight_keys:
                w = layers[weight_keys[key]].base_weight
                if tuple(b.shape) != tuple(w.shape) or not _same(b.to(w.dtype), w):
                    raise BaseMismatchError(
                        f"{key}: the compressed layer's base weight is not this base's weight; "
                        f"pass the base this model was compressed against"
                    )
            elif key in state and not _same(state[key], b):
                kept[key] = state[key]
        kept.update({k: v for k, v in state.items() if k not in entries and k not in kept})
        model_type = weights.model_type or getattr(getattr(model, "config", None), "model_type", None)
        fingerprint = _fingerprint_of_entries(entries, model_type, complete=True)
    _write_artifact(
        out, tensors, kept, layers={name: layer_spec(w) for name, w in layers.items()}, aliases=dict(model_aliases),
        fingerprint=fingerprint, config=config,
        model_dtype=next((p.dtype for p in model.parameters()), torch.float32), model_config=_model_config(model),
        metadata=metadata, overwrite=overwrite,
    )
    return out


def _write_artifact(out: Path, tensors: dict, kept: Mapping[str, torch.Tensor], *, layers: Mapping[str, dict],
                    aliases: Mapping[str, str], fingerprint: dict, config: Optional[DeltaCoMeConfig],
                    model_dtype: torch.dtype, model_config: Optional[dict], metadata: Optional[Mapping[str, Any]],
                    overwrite: bool) -> dict:
    """The end both writers share (`save_delta`, `streaming.compress_streaming`): `tensors` (the
    compressed layers' inner tensors) plus `kept`, and `delta_config.json` built from `layers`
    (`layer_spec` per layer, in module order), written atomically. Returns the document."""
    clash = [k for k in kept if SEP in k]
    if clash:
        raise ValueError(f"tensor names may not contain {SEP!r}: {_few(clash)}")
    tensors.update({k: v.detach().contiguous() for k, v in kept.items()})

    import deltacome_ao

    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": "deltacome_ao",
        "library_version": deltacome_ao.__version__,
        **_method_fields(config),
        "model_dtype": _dtype_name(model_dtype),
        "layers": dict(layers),
        "kept": sorted(kept),
        "aliases": dict(aliases),  # tied in the fine-tuned model: tied again on load
        "bytes": {"compressed": sum(spec["delta_bytes"] for spec in layers.values()),
                  "kept": sum(v.numel() * v.element_size() for v in kept.values())},
        "base_fingerprint": fingerprint,
        "model_config": model_config,
        "user": dict(metadata) if metadata is not None else None,
    }
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"  # fails here, before any write, if not JSON-able
    _atomic_write_dir(out, lambda tmp: _write(tmp, tensors, text), overwrite)
    return document


def _write(tmp: Path, tensors: dict, text: str):
    (tmp / CONFIG_NAME).write_text(text)
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "deltacome": FORMAT, "format_version": str(FORMAT_VERSION)})
    # safetensors may create its file 0600; give it the mode an ordinary file gets here (umask applied)
    os.chmod(tmp / WEIGHTS_NAME, (tmp / CONFIG_NAME).stat().st_mode & 0o777)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_dir(out: Path, write, overwrite: bool):
    """Fill a temporary sibling directory with `write(tmp)`, then rename it to `out`: a reader (or a
    crash) sees the old directory or the complete new one, never a partial one."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)  # not mkdtemp: the artifact directory gets the usual (umask) permissions
    old = None
    try:
        write(tmp)
        _fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "d")
        os.replace(tmp, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / "d").exists():
            os.replace(old / "d", out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def delta_size(delta_dir: str | os.PathLike) -> int:
    """Bytes on disk of the artifact (both files, safetensors header and JSON included)."""
    path = Path(delta_dir)
    read_delta_config(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# --- load ------------------------------------------------------------------------------------------


def read_delta_config(delta_dir: str | os.PathLike) -> dict:
    path = Path(delta_dir)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a delta artifact (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        document = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise DeltaFormatError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None
    if document.get("format") != FORMAT:
        raise DeltaFormatError(f"{path}: format {document.get('format')!r}, expected {FORMAT!r}")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"{path}: format_version {version!r}; this deltacome_ao reads versions up to {FORMAT_VERSION} (upgrade it)"
        )
    for name, spec in document.get("layers", {}).items():
        _check_spec(spec, name)
    return document


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor):
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad) and value.is_floating_point()
        )
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise BaseMismatchError(f"{name}: the base model has no such parameter or buffer")


def _get_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    if leaf in owner._buffers:
        return owner._buffers[leaf]
    raise AttributeError(name)


def load_delta(base_model: torch.nn.Module, delta_dir: str | os.PathLike, verify: str = "full") -> torch.nn.Module:
    """Put the delta in `delta_dir` onto `base_model` (in place) and return it.

    verify: "full" hashes every byte of the base tensors the delta depends on, "sample" a fixed
    1 MiB per tensor (fast for large bases; see docs/artifact.md), "none" only checks names, shapes
    and dtypes. A mismatch raises `BaseMismatchError` naming what differs, before anything changes.
    The compressed layers wrap the base module's own weight (no copy when the dtypes agree).
    """
    if verify not in ("full", "sample", "none"):
        raise ValueError(f"verify must be 'full', 'sample' or 'none', got {verify!r}")
    path = Path(delta_dir)
    document = read_delta_config(path)
    layers: dict[str, dict] = document["layers"]
    kept: list[str] = document.get("kept", [])
    aliases: dict[str, str] = document.get("aliases", {})

    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        stored = set(f.keys())
        expected = {
            f"{_weight_key(n)}{SEP}{inner}"
            for n, spec in layers.items()
            for inner in TENSOR_CLASSES[spec["tensor"]].tensor_data_names[1:]
        } | set(kept)
        if stored != expected:
            raise DeltaFormatError(
                f"{path / WEIGHTS_NAME}: tensors missing {_few(sorted(expected - stored))}, "
                f"unexpected {_few(sorted(stored - expected))}"
            )

        # 1. the base: every fingerprinted tensor, by the fingerprint's rules
        already = sorted(compressed_layers(base_model))
        if already:
            raise ValueError(
                f"the base model already holds compressed weights ({_few(already)}); load the delta onto a plain base"
            )
        base_state, _ = _unaliased(base_model.state_dict(keep_vars=False).items())
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        problems = _compare_base(document["base_fingerprint"], base_state, model_type, verify)
        if problems:
            raise BaseMismatchError(
                f"{path} was made against another base model:\n  - " + "\n  - ".join(problems)
            )

        # 2. build everything before touching the model
        new: dict[str, torch.Tensor] = {}
        for name, spec in layers.items():
            key = _weight_key(name)
            try:
                module = base_model.get_submodule(name)
            except AttributeError:
                raise BaseMismatchError(f"{name}: the base model has no such module") from None
            w = getattr(module, "weight", None)
            if isinstance(w, COMPRESSED):
                raise ValueError(f"{name}: the base model already holds a compressed weight; load the delta onto a plain base")
            if not isinstance(w, torch.Tensor) or list(w.shape) != spec["shape"]:
                raise BaseMismatchError(f"{name}: weight {None if w is None else tuple(w.shape)}, the delta needs {tuple(spec['shape'])}")
            inner = {n: f.get_tensor(f"{key}{SEP}{n}").to(w.device) for n in TENSOR_CLASSES[spec["tensor"]].tensor_data_names[1:]}
            inner["base_weight"] = w.detach()
            new[key] = torch.nn.Parameter(assemble(spec, inner, where=name), requires_grad=False)
        for name in kept:
            try:
                current = _get_tensor(base_model, name)
            except AttributeError:
                raise BaseMismatchError(f"{name}: stored in the delta but the base model has no such tensor") from None
            new[name] = f.get_tensor(name).to(current.device)
        for alias, target in aliases.items():
            try:
                _get_tensor(base_model, alias)
            except AttributeError:
                raise BaseMismatchError(f"{alias}: stored in the delta but the base model has no such tensor") from None

    # 3. swap in (nothing can fail any more short of a programming error)
    for name, value in new.items():
        _set_tensor(base_model, name, value)
    for alias, target in aliases.items():
        _set_tensor(base_model, alias, _get_tensor(base_model, target))
    _warn_config_differences(base_model, document.get("model_config"))
    return base_model


def _warn_config_differences(model: torch.nn.Module, stored: Optional[dict]):
    current = _model_config(model)
    if stored is None or current is None:
        return
    differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if differ:
        warnings.warn(
            f"the fine-tuned model's config differs from the base's in {_few(differ)}; the delta holds tensors "
            f"only, so the base's values are in effect (see delta_config.json 'model_config')",
            stacklevel=3,
        )


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
            dtypes = [e["dtype"] for e in document["base_fingerprint"]["tensors"].values()]
            kwargs["dtype"] = _dtype(max(set(dtypes), key=dtypes.count)) if dtypes else "auto"
        base = AutoModelForCausalLM.from_pretrained(base_model_or_path, **kwargs)
        return load_delta(base, delta_dir, verify=verify)
