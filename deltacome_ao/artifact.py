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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file

from .checkpoint import BaseWeights, few, unaliased, write_dir_atomic
from .compress import compressed_layers, coverage_summary, notify_compressed, on_compressed, uncompressed_reason
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
    DOCUMENT_DIGEST,
    FORMAT,
    FORMAT_VERSION,
    SEP,
    WEIGHTS_NAME,
    DeltaFormatError,
    TensorFile,
    assemble,
    check_spec,
    check_tensor,
    document_digest,
    document_text,
    flatten_state_dict,
    inner_layout,
    layer_key,
    layer_spec,
    method_fields,
    model_config,
    read_delta_config,
    shell,
    sort_header,
    spec_key,
    tensor_record,
    verify_artifact,
)
from .finetune_config import apply_finetune_config
from .hub import CARD_NAME, base_reference, model_card, resolve_delta_dir
from .restore import LoadRecord, remember, unload
from .version import __version__

__all__ = [
    "save_delta",
    "load_delta",
    "delta_size",
    "DeltaArtifact",
    "get_tensor",
    "set_tensor",
    "read_delta_config",
    "verify_artifact",
    "DeltaCoMeModel",
    "unload",
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
    base_model_name_or_path: Optional[str] = None,
    base_revision: Optional[str] = None,
    model_card: bool = True,
) -> Path:
    """Write the delta of the compressed `model` to `out_dir` (atomically) and return its path.

    base: the base the model was compressed against (`nn.Module`, state dict or safetensors
        directory, as for `DeltaCoMeConfig`; or the config itself). Then only the non-compressed
        tensors that differ from it are stored, the fingerprint covers every base tensor, and each
        compressed layer's `base_weight` is checked to be that base's weight. Without it every
        non-compressed tensor is stored and the fingerprint covers the base weights of the
        compressed layers only — exactly the base tensors the loaded model then depends on.
    config: the `DeltaCoMeConfig` used (recorded: method, alpha, group size, allocation, calibration);
        by default what `compress_` / `quantize_` / `load_delta` recorded on the model.
    metadata: any JSON-serialisable mapping, stored under "user".
    base_model_name_or_path, base_revision: the base's Hub id (or path) and revision, recorded in
        delta_config.json and the model card; by default what `base` says about itself
        (`hub.base_reference`: a transformers model's `config._name_or_path` / `_commit_hash`, a
        directory's path), None when unknown.
    model_card: also write README.md, a Hub model card (base_model, method, alpha, measured bytes).

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
    base_name, base_revision = base_reference(base, base_model_name_or_path, base_revision)
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
        base_model_name_or_path=base_name, base_revision=base_revision, card=model_card,
        coverage=_coverage(model, layers, kept) if base is not None else None,
        fields=None if config is not None else model.__dict__.get(_FIELDS),
    ).write(out, overwrite)
    return out


_FIELDS = "_deltacome_fields"


@on_compressed
def _remember_fields(model: torch.nn.Module, fields: dict) -> None:
    """How `compress_` / `quantize_` / `load_delta` made the model's compressed weights (method, alpha,
    group size, allocation, calibration, ...), kept on the model so that `save_delta` without `config=`
    records them too."""
    if fields:
        model.__dict__[_FIELDS] = dict(fields)


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
    base_model_name_or_path: Optional[str] = None  # the base's Hub id or path (hub.base_reference)
    base_revision: Optional[str] = None
    card: bool = True  # also write README.md (hub.model_card)
    coverage: Optional[dict] = None
    fields: Optional[Mapping[str, Any]] = None  # how the delta was made, when there is no `config`

    def document(self) -> dict:
        """The `delta_config.json` content: the fields below, the dtype, shape and sha256 of every
        stored tensor (`integrity`), and last the sha256 of all of it (`document_sha256`). Raises
        TypeError if the metadata is not JSON-able."""
        tensors = {**self.tensors, **self.kept}
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library": "deltacome_ao",
            "library_version": __version__,
            **(method_fields(self.config) if self.config is not None or not self.fields
               else {**method_fields(None), **self.fields}),
            "model_dtype": dtype_name(self.model_dtype),
            "layers": dict(self.layers),
            "kept": sorted(self.kept),
            "aliases": dict(self.aliases),  # tied in the fine-tuned model: tied again on load
            "bytes": {"compressed": sum(spec["delta_bytes"] for spec in self.layers.values()),
                      "kept": sum(v.numel() * v.element_size() for v in self.kept.values())},
            "base_fingerprint": self.fingerprint,
            "model_config": self.model_config,
            "user": dict(self.metadata) if self.metadata is not None else None,
            "integrity": {"tensors": {name: tensor_record(t) for name, t in sorted(tensors.items())}},
            # optional (absent in artifacts written before them): which base, for people and the Hub
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_revision": self.base_revision,
            **({"coverage": self.coverage} if self.coverage is not None else {}),
        }
        # the digest is over what a reader parses (JSON turns tuples into lists, keys into strings)
        document = json.loads(json.dumps(document, allow_nan=True))
        document[DOCUMENT_DIGEST] = document_digest(document)
        return document

    def write(self, out: str | os.PathLike, overwrite: bool = False) -> dict:
        """Write the artifact directory atomically; returns the document. ValueError if a kept
        tensor's name contains the separator, TypeError if the metadata is not JSON-able (both
        before anything is written)."""
        clash = [k for k in self.kept if SEP in k]
        if clash:
            raise ValueError(f"tensor names may not contain {SEP!r}: {few(clash)}")
        tensors = {**self.tensors, **{k: v.detach().contiguous() for k, v in self.kept.items()}}
        document = self.document()
        text = document_text(document)

        def fill(tmp: Path):
            (tmp / CONFIG_NAME).write_text(text)
            save_file(tensors, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "deltacome": FORMAT, "format_version": str(FORMAT_VERSION)})
            sort_header(tmp / WEIGHTS_NAME)  # same delta, same bytes
            if self.card:
                sizes = {n: (tmp / n).stat().st_size for n in (WEIGHTS_NAME, CONFIG_NAME)}
                (tmp / CARD_NAME).write_text(model_card(document, Path(out).name, sizes), encoding="utf-8")

        write_dir_atomic(Path(out), fill, overwrite)
        return document


def delta_size(delta_dir: str | os.PathLike) -> int:
    """Bytes on disk of the artifact directory (safetensors header, JSON and model card included)."""
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


def load_delta(base_model: torch.nn.Module, delta_dir: str | os.PathLike, verify: str = "full", *,
               revision: Optional[str] = None, keep_originals: bool = True) -> torch.nn.Module:
    """Put the delta in `delta_dir` onto `base_model` (in place) and return it.

    delta_dir: a local artifact directory, or a Hub repo id `org/name` (fetched at `revision` with
    `huggingface_hub.snapshot_download`, cache and `HF_HUB_OFFLINE` honoured; `hub.resolve_delta_dir`).
    keep_originals: keep the objects the load replaces, so that `unload(model)` returns the base
    bit-exactly (`restore.py`; costs the size of the replaced kept tensors).

    verify: how much is hashed. "full": every byte of the base tensors the delta depends on (against
    the fingerprint) and every stored tensor of the artifact (against its recorded sha256), plus the
    document's own digest; "sample": the base by a fixed 1 MiB per tensor (fast for large bases; see
    docs/artifact.md), the artifact fully; "none": no hashing at all (names, shapes, dtypes and every
    field's type are still checked). A wrong base raises `BaseMismatchError` naming what differs; a
    malformed or corrupted artifact `DeltaFormatError` naming the file, field or tensor.

    Every check (format, digests, base, every tensor's shape and dtype, aliases, devices) happens
    before anything changes: a failed load leaves the base as it was. The compressed layers wrap
    the base module's own weight (never a copy) and take the base's dtype; a kept tensor stored in
    another floating dtype than the base's is cast to it (with one warning).
    Config fields the fine-tune changed (RoPE scaling, norm epsilon, ...; the artifact's `model_config`)
    are applied to the model (`finetune_config.apply_finetune_config`); one that changes the structure
    raises `ConfigMismatchError`, before anything changes.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    path = resolve_delta_dir(delta_dir, revision)
    document = read_delta_config(path, verify=verify)
    layers: dict[str, dict] = document["layers"]
    aliases: dict[str, str] = document["aliases"]
    records = document["integrity"]["tensors"] if document["format_version"] >= 2 and verify != "none" else None

    already = sorted(compressed_layers(base_model))
    if already:
        raise ValueError(
            f"the base model already holds compressed weights ({few(already)}); load the delta onto a plain base"
        )
    full_state = base_model.state_dict(keep_vars=False)
    on_meta = [k for k, v in full_state.items() if v.device.type == "meta"]
    if on_meta:
        raise BaseMismatchError(
            f"the base model has {len(on_meta)} tensor(s) on the meta device ({few(on_meta)}): they hold no data; "
            f"load the base's weights first (e.g. from_pretrained without device 'meta')"
        )
    base_state, _ = unaliased(full_state.items())
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    check_base(document["base_fingerprint"], base_state, model_type, verify, what=str(path))
    with TensorFile(path / WEIGHTS_NAME) as f:
        new, cast = _build(base_model, f, layers, document["kept"], records)
    for alias, target in aliases.items():
        current = get_tensor(base_model, alias)
        if current is None:
            raise BaseMismatchError(f"{alias}: tied in the delta but the base model has no such tensor")
        value = new[target] if target in new else get_tensor(base_model, target)
        if value is None:
            raise DeltaFormatError(f"{path / CONFIG_NAME}: field 'aliases' ties {alias!r} to {target!r}, which is no "
                                   f"tensor of the delta or the base")
        if tuple(value.shape) != tuple(current.shape):
            raise BaseMismatchError(f"{alias}: tied in the delta to {target!r} of shape {tuple(value.shape)}, but the "
                                    f"base model's {alias} has shape {tuple(current.shape)}")

    # the fine-tune's config (fields that differ from the base's): checked before anything changes
    apply_config = apply_finetune_config(base_model, document.get("model_config"), where=str(path))
    if keep_originals:
        originals = {n: get_tensor(base_model, n) for n in [*new, *aliases]}
        remember(base_model, LoadRecord(str(path), originals, document["base_fingerprint"]))
    # swap in: every value is built and checked; nothing below can fail short of a programming error
    apply_config()
    for name, value in new.items():
        set_tensor(base_model, name, value)
    for alias, target in aliases.items():
        set_tensor(base_model, alias, get_tensor(base_model, target))
    if cast:
        warnings.warn(
            f"{path} stores {len(cast)} tensor(s) in another dtype than the base's ({few(cast)}); they were cast to "
            f"the base's dtype (the fine-tune and the base had different dtypes when it was compressed)",
            stacklevel=2,
        )
    notify_compressed(base_model, {k: document.get(k) for k in ("method", "alpha", "group_size", "allocation", "calibrated")})
    return base_model


def _build(base_model, f: TensorFile, layers: Mapping[str, dict], kept, records) -> tuple[dict, list]:
    """Every new tensor of a load, built and checked before the model changes: ({tensor name:
    value}, names cast to the base's dtype). `records`: {stored name: tensor_record} to check the
    bytes against (None: not checked)."""

    def read(name: str) -> torch.Tensor:
        t = f.get_tensor(name)
        if records is not None:
            check_tensor(name, t, records[name], f.path)
        return t

    new: dict[str, torch.Tensor] = {}
    cast: list[str] = []
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
        if not w.is_floating_point():
            raise BaseMismatchError(f"{name}: the base weight is {w.dtype}, a compressed layer needs a floating-point one")
        cls = check_spec(spec, name)
        inner = {n: read(f"{key}{SEP}{n}") for n in cls.tensor_data_names[1:]}
        inner = {n: t.to(w.device) for n, t in inner.items()}
        inner["base_weight"] = w.detach()
        if w.dtype != parse_dtype(spec["dtype"]):
            cast.append(key)
        new[key] = torch.nn.Parameter(assemble(spec, inner, where=name, dtype=w.dtype), requires_grad=False)
    for name in kept:
        current = get_tensor(base_model, name)
        if current is None:
            raise BaseMismatchError(f"{name}: stored in the delta but the base model has no such tensor")
        t = read(name)
        if tuple(t.shape) != tuple(current.shape):
            raise BaseMismatchError(f"{name}: the delta stores a {tuple(t.shape)} tensor, the base model's is "
                                    f"{tuple(current.shape)}")
        if t.dtype != current.dtype:
            if not (t.is_floating_point() and current.is_floating_point()):
                raise BaseMismatchError(f"{name}: the delta stores {dtype_name(t.dtype)}, the base model holds "
                                        f"{dtype_name(current.dtype)}")
            cast.append(name)
        new[name] = t.to(device=current.device, dtype=current.dtype)
    return new, cast


class DeltaCoMeModel:
    """PEFT-style entry point: `DeltaCoMeModel.from_pretrained(base, delta_dir)` returns the base
    model (loaded from a path if needed) with the delta put on, as a plain transformers model;
    `DeltaCoMeModel.unload(model)` takes it off again (`restore.unload`)."""

    unload = staticmethod(unload)

    @staticmethod
    def from_pretrained(base_model_or_path: Any, delta_dir: str | os.PathLike, verify: str = "full", *,
                        revision: Optional[str] = None, base_revision: Optional[str] = None,
                        **kwargs) -> torch.nn.Module:
        """`base_model_or_path`: an already loaded base `nn.Module` (modified in place), a local
        directory / Hub id for `AutoModelForCausalLM.from_pretrained(..., revision=base_revision,
        **kwargs)` (loaded in the dtype the fingerprint records unless `dtype=` is given), or None:
        the base the artifact records (`base_model_name_or_path` at its `base_revision`).
        `delta_dir`: a local artifact or a Hub repo id `org/name` at `revision` (as PEFT's
        `PeftModel.from_pretrained(base, adapter_id, revision=...)`)."""
        if isinstance(base_model_or_path, torch.nn.Module):
            if kwargs or base_revision is not None:
                raise TypeError(f"loading options {sorted(kwargs) or ['base_revision']} only apply when the base is "
                                f"given as a path")
            return load_delta(base_model_or_path, delta_dir, verify=verify, revision=revision)
        delta_dir = resolve_delta_dir(delta_dir, revision)
        document = read_delta_config(delta_dir, verify=verify)
        if base_model_or_path is None:
            base_model_or_path = document.get("base_model_name_or_path")
            if not base_model_or_path:
                raise ValueError(f"{delta_dir} records no base model; pass the base (a model, directory or Hub id)")
            base_revision = base_revision or document.get("base_revision")
        if base_revision is not None:
            kwargs["revision"] = base_revision
        from transformers import AutoModelForCausalLM

        if "dtype" not in kwargs:
            dtypes = [e.get("dtype") for e in document["base_fingerprint"]["tensors"].values()]
            kwargs["dtype"] = parse_dtype(max(set(dtypes), key=dtypes.count)) if dtypes else "auto"
        base = AutoModelForCausalLM.from_pretrained(base_model_or_path, **kwargs)
        return load_delta(base, delta_dir, verify=verify)
