"""The stored form of compressed weights: names, versions, layer specs, and the artifact's JSON.

Shared by the delta artifact (`artifact.py`), streaming compression and the Hugging Face checkpoint
(`hf.py`); docs/format.md and docs/artifact.md describe the bytes. A compressed weight at
`<module>.weight` is stored as its inner tensors `<module>.weight:<inner>` and described by its
layer spec (`DeltaTensor.spec()`: tensor class name, shape, dtype, delta bytes and the class's
attributes). The tensor class is looked up by name in the method registry (`methods.tensor_kinds`),
so a new kind is readable as soon as its method is registered.

Integrity (format version 2, docs/integrity.md): the artifact's `delta_config.json` records the
dtype, shape and sha256 of every stored tensor (`integrity`) and the sha256 of its own canonical
JSON (`document_sha256`); `check_document` validates every field, `TensorFile` reads safetensors so
that any failure is a `DeltaFormatError` naming the file and tensor, and `check_tensor` compares a
tensor with its record. Version 1 (no digests) is still read, with an `IntegrityWarning`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import few
from .delta_tensor import DTYPE_NAMES, DeltaSpecError, DeltaTensor, dtype_name, parse_dtype
from .fingerprint import fingerprint_problem, full_hash, is_sha256
from .methods import tensor_kind

__all__ = [
    "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "CONFIG_NAME", "WEIGHTS_NAME", "SEP", "DOCUMENT_DIGEST",
    "DeltaFormatError", "weight_key", "layer_key", "spec_key", "tensor_class", "check_spec", "layer_spec", "inner_layout", "shell", "assemble",
    "stored_names", "flatten_state_dict", "read_delta_config", "verify_artifact", "method_fields", "calibration_record", "model_config",
    "CONFIG_NOISE", "dtype_name", "parse_dtype", "TensorFile", "tensor_record", "check_tensor", "check_records",
    "document_digest", "document_text", "IntegrityWarning",
]

FORMAT = "deltacome-delta"
FORMAT_VERSION = 2  # 2: per-tensor sha256 and the document's own digest (1: neither; still read)
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
SEP = ":"  # `<module>.weight:<inner>`; never part of a PyTorch parameter name
DOCUMENT_DIGEST = "document_sha256"  # sha256 of the canonical JSON of every other field
# config.json entries that say nothing about the weights (ignored when comparing configs).
CONFIG_NOISE = frozenset({"_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype",
                          "torch_dtype", "quantization_config", "_commit_hash", "_attn_implementation_autoset",
                          "use_cache"})
# safetensors' dtype names -> ours
_STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                  "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# what reading a damaged safetensors file can raise (the Rust reader's error, I/O, torch on odd bytes)
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, KeyError,
                UnicodeDecodeError, MemoryError)


class DeltaFormatError(ValueError):
    """The artifact (or checkpoint) is not a valid deltacome delta of this version: a malformed or
    corrupted file, a field of the wrong type, a tensor whose bytes do not match their recorded sha256."""


class IntegrityWarning(UserWarning):
    """A stored form without content digests (format version 1) was loaded: its integrity is unchecked."""


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
    out = {
        "method": config.method,
        "alpha": config.alpha,
        "group_size": config.group_size,
        "allocation": config.allocation,
        "calibrated": config.calibration is not None,
    }
    if getattr(config, "method_options", None):  # only methods with settings of their own
        out["method_options"] = dict(config.method_options)
    calibration = calibration_record(getattr(config, "calibration", None))
    if calibration is not None:  # only calibrated deltas (older artifacts have no such field)
        out["calibration"] = calibration
    if config.allocation == "global":  # the model-level plan's settings
        out["global_allocation"] = {"cap": float(getattr(config, "global_cap", 4.0)),
                                    "sensitivity": getattr(config, "global_sensitivity", None)
                                    or ("fisher" if config.calibration is not None else "weight")}
    return out


def calibration_record(calibration: Any) -> Optional[dict]:
    """What an artifact records of `DeltaCoMeConfig.calibration`: None (data-free), {"source": "data"}
    (the user's sequences), or {"source": "self" | "base", samples, length, temperature, seed, ...}
    (sampled from the fine-tuned / base model, `self_calibration.SelfCalibration`)."""
    if calibration is None:
        return None
    if isinstance(calibration, str):
        calibration = {"self": {"source": "finetuned"}, "base": {"source": "base"}}.get(calibration, {"source": calibration})
        calibration = dict(calibration)
    elif dataclasses.is_dataclass(calibration) and not isinstance(calibration, type):
        calibration = {k: (list(map(list, v)) if k == "prompts" and v is not None else v)
                       for k, v in dataclasses.asdict(calibration).items()}
    else:
        return {"source": "data"}
    calibration["source"] = "self" if calibration.get("source") == "finetuned" else calibration.get("source")
    return calibration


def model_config(config: Any) -> Optional[dict]:
    """A transformers config as a dict without the entries that say nothing about the weights."""
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in CONFIG_NOISE}


# --- integrity: digests of the tensors and of the document --------------------------------------------


def tensor_record(t: torch.Tensor) -> dict:
    """What the stored form records of one tensor: dtype, shape and the sha256 of its bytes."""
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": full_hash(t)}


def record_problem(record: Any) -> Optional[str]:
    """Why `record` is not a well-formed `tensor_record` (None if it is)."""
    if not isinstance(record, Mapping):
        return f"must be an object {{dtype, shape, sha256}}, got {type(record).__name__}"
    if record.get("dtype") not in DTYPE_NAMES:
        return f"dtype {record.get('dtype')!r} is not a known dtype"
    shape = record.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return f"shape must be a list of non-negative integers, got {shape!r}"
    if not is_sha256(record.get("sha256")):
        return f"sha256 must be a sha256 hex digest, got {record.get('sha256')!r}"
    return None


def check_tensor(name: str, t: torch.Tensor, record: Mapping, where: Any) -> None:
    """Raise `DeltaFormatError` unless `t` has the dtype, shape and bytes `record` gives."""
    if dtype_name(t.dtype) != record["dtype"] or list(t.shape) != record["shape"]:
        raise DeltaFormatError(
            f"{where}: tensor {name!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, the recorded digest says "
            f"{record['dtype']} {tuple(record['shape'])} (the file is corrupted or was changed)"
        )
    if full_hash(t) != record["sha256"]:
        raise DeltaFormatError(
            f"{where}: tensor {name!r} does not match its recorded sha256 (the file is corrupted or was changed)"
        )


def check_record_table(records: Any, where: Any, field: str) -> None:
    """Validate the structure of a {stored name: tensor_record} table (DeltaFormatError naming the field)."""
    if not isinstance(records, Mapping):
        raise DeltaFormatError(f"{where}: field {field!r} must be an object {{tensor name: {{dtype, shape, sha256}}}}, "
                               f"got {type(records).__name__}")
    for name, record in records.items():
        problem = record_problem(record)
        if problem:
            raise DeltaFormatError(f"{where}: field {field}[{name!r}] {problem}")


def check_records(records: Any, expected: set[str], where: Any, field: str) -> dict:
    """Validate a {stored name: tensor_record} table that must cover exactly `expected`."""
    check_record_table(records, where, field)
    missing, extra = sorted(expected - set(records)), sorted(set(records) - expected)
    if missing or extra:
        raise DeltaFormatError(f"{where}: field {field!r} does not list the stored tensors: missing "
                               f"{_few(missing)}, unexpected {_few(extra)}")
    return dict(records)


def _canonical(document: Mapping) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def document_digest(document: Mapping) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of every field but `document_sha256`:
    formatting does not change it, any changed value does."""
    return hashlib.sha256(_canonical({k: v for k, v in document.items() if k != DOCUMENT_DIGEST})).hexdigest()


def document_text(document: Any) -> str:
    """The JSON text of a document as the stored forms write it: indented, with every object or list
    that holds only scalars and lists of scalars on one line (one line per layer spec, tensor record,
    fingerprint entry)."""

    def scalar(x) -> bool:
        return not isinstance(x, (dict, list)) or not x

    def leaf(v) -> bool:  # scalars, and lists of scalars
        values = v.values() if isinstance(v, dict) else v
        return all(scalar(x) or (isinstance(x, list) and all(map(scalar, x))) for x in values)

    def fmt(v, pad: str) -> str:
        if not isinstance(v, (dict, list)) or not v or leaf(v):
            return json.dumps(v, ensure_ascii=False)
        inner = pad + "  "
        if isinstance(v, dict):
            rows = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {fmt(x, inner)}" for k, x in v.items()]
            return "{\n" + ",\n".join(rows) + "\n" + pad + "}"
        return "[\n" + ",\n".join(inner + fmt(x, inner) for x in v) + "\n" + pad + "]"

    return fmt(document, "") + "\n"


def sort_header(path: str | os.PathLike) -> None:
    """Rewrite a just-written safetensors file's JSON header with sorted keys, in place and at the same
    length (padded with spaces, which the format allows), so that the same tensors and metadata give
    the same bytes: safetensors' writer emits `__metadata__` entries in hash-map order, which varies
    from run to run. A header that would not fit (it cannot: only the order changes) is left as it is."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        text = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def _few(items) -> str:
    return few(items) or "none"


# --- reading safetensors defensively ---------------------------------------------------------------------


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class TensorFile:
    """A safetensors file read defensively: a file that cannot be opened (missing, truncated, a bad
    header, bytes appended) or a tensor that cannot be read raises `DeltaFormatError` naming the file
    (and the tensor), never safetensors' or torch's own exception types. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cm = None
        self._f = None

    def __enter__(self) -> "TensorFile":
        try:
            self._cm = safe_open(str(self.path), framework="pt")
            self._f = self._cm.__enter__()
        except _READ_ERRORS as e:
            raise DeltaFormatError(f"{self.path}: not a readable safetensors file ({_reason(e)})") from None
        return self

    def __exit__(self, *exc) -> None:
        cm, self._cm, self._f = self._cm, None, None
        if cm is not None:
            try:
                cm.__exit__(None, None, None)
            except _READ_ERRORS:
                pass

    def keys(self) -> list[str]:
        try:
            return list(self._f.keys())
        except _READ_ERRORS as e:
            raise DeltaFormatError(f"{self.path}: cannot list the tensors ({_reason(e)})") from None

    def metadata(self) -> dict[str, str]:
        try:
            return dict(self._f.metadata() or {})
        except _READ_ERRORS as e:
            raise DeltaFormatError(f"{self.path}: cannot read the header metadata ({_reason(e)})") from None

    def layout(self, name: str) -> tuple[str, list[int]]:
        """(dtype name, shape) of a tensor, from the header alone."""
        try:
            piece = self._f.get_slice(name)
            stored, shape = piece.get_dtype(), list(piece.get_shape())
        except _READ_ERRORS as e:
            raise DeltaFormatError(f"{self.path}: tensor {name!r} cannot be read ({_reason(e)})") from None
        return _STORED_DTYPES.get(stored, stored), shape

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except _READ_ERRORS as e:
            raise DeltaFormatError(f"{self.path}: tensor {name!r} cannot be read ({_reason(e)})") from None


# --- the artifact's JSON document, validated field by field -----------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_field(document: Mapping, field: str, ok, expected: str, where, required: bool = False):
    if field not in document:
        if required:
            raise DeltaFormatError(f"{where}: field {field!r} is missing ({expected})")
        return None
    value = document[field]
    if not ok(value):
        raise DeltaFormatError(f"{where}: field {field!r} must be {expected}, got {_show(value)}")
    return value


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _names_ok(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) and n and SEP not in n for n in value) \
        and len(set(value)) == len(value)


def _number_ok(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_document(document: Any, where: Any, verify: str = "full") -> dict:
    """Validate every field of an artifact's `delta_config.json` (parsed); returns it.

    Raises `DeltaFormatError` naming the file and the field. `verify="none"` skips the document's
    digest (every field's type and structure is still checked)."""
    if not isinstance(document, dict):
        raise DeltaFormatError(f"{where}: not a JSON object")
    if document.get("format") != FORMAT:
        raise DeltaFormatError(f"{where}: field 'format' is {document.get('format')!r}, expected {FORMAT!r} "
                               f"(not a deltacome delta artifact)")
    version = document.get("format_version")
    if not _is_int(version) or version < 1:
        raise DeltaFormatError(f"{where}: field 'format_version' must be an integer >= 1, got {_show(version)}")
    if version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"{where}: format_version {version!r}; this deltacome_ao reads versions up to {FORMAT_VERSION} (upgrade it)"
        )
    if version >= 2:
        digest = _check_field(document, DOCUMENT_DIGEST, is_sha256, "a sha256 hex digest", where, required=True)
        if verify != "none" and digest != document_digest(document):
            raise DeltaFormatError(
                f"{where}: the document does not match its {DOCUMENT_DIGEST} (a field was changed or corrupted); "
                f"re-create the artifact, or load with verify='none' to skip the content checks"
            )
    for field in ("library", "library_version", "method", "allocation"):
        _check_field(document, field, lambda v: v is None or isinstance(v, str), "a string or null", where)
    _check_field(document, "alpha", _number_ok, "a number or null", where)
    _check_field(document, "group_size", lambda v: v is None or _is_int(v), "an integer or null", where)
    _check_field(document, "calibrated", lambda v: v is None or isinstance(v, bool), "true, false or null", where)
    _check_field(document, "model_dtype", lambda v: v in DTYPE_NAMES, f"a dtype name ({', '.join(DTYPE_NAMES)})", where)
    _check_field(document, "model_config", lambda v: v is None or isinstance(v, dict), "an object or null", where)
    _check_field(document, "user", lambda v: v is None or isinstance(v, dict), "an object or null", where)
    _check_field(document, "method_options", lambda v: isinstance(v, dict), "an object", where)
    _check_field(document, "calibration", lambda v: isinstance(v, dict) and isinstance(v.get("source"), str),
                 "an object with a 'source'", where)
    _check_field(document, "global_allocation", lambda v: isinstance(v, dict), "an object", where)
    for field in ("base_model_name_or_path", "base_revision"):
        _check_field(document, field, lambda v: v is None or isinstance(v, str), "a string or null", where)
    _check_field(document, "bytes", lambda v: isinstance(v, dict) and all(
        _is_int(v.get(k)) and v.get(k) >= 0 for k in ("compressed", "kept")),
        "an object {compressed: int, kept: int}", where)

    layers = _check_field(document, "layers", lambda v: isinstance(v, dict), "an object {module: layer spec}", where,
                          required=True)
    for name, spec in layers.items():
        if not name or SEP in name:
            raise DeltaFormatError(f"{where}: field 'layers' has a bad module name {name!r}")
        check_spec(spec, f"{where}: layers[{name!r}]")
    kept = _check_field(document, "kept", _names_ok, "a list of distinct tensor names", where, required=True)
    weights = {spec_key(n, spec) for n, spec in layers.items()}
    clash = sorted(weights & set(kept))
    if clash:
        raise DeltaFormatError(f"{where}: field 'kept' lists compressed weights {_few(clash)}")
    aliases = _check_field(document, "aliases", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and k and isinstance(t, str) and t for k, t in v.items()),
        "an object {tied name: stored name} of strings", where, required=True)
    for alias, target in aliases.items():
        if alias == target or alias in aliases.values() or target in aliases or alias in kept or alias in weights:
            raise DeltaFormatError(f"{where}: field 'aliases' entry {alias!r} -> {target!r} ties a tensor that is "
                                   f"stored or is itself an alias")
    problem = fingerprint_problem(document.get("base_fingerprint"))
    if problem:
        raise DeltaFormatError(f"{where}: field 'base_fingerprint' {problem}")
    if version >= 2:
        integrity = _check_field(document, "integrity", lambda v: isinstance(v, dict),
                                 "an object {tensors: {name: {dtype, shape, sha256}}}", where, required=True)
        check_records(integrity.get("tensors"), stored_names(layers, with_base=False) | set(kept), where,
                      "integrity.tensors")
    return document


def read_delta_config(delta_dir: str | os.PathLike, verify: str = "full") -> dict:
    """`delta_config.json` of an artifact directory, validated (`check_document`: every field, the
    document's digest) and checked against the header of `delta.safetensors` (which must be a
    readable, complete safetensors file holding exactly the expected tensors, with the recorded
    dtypes and shapes). Tensor bytes are not read (`verify_artifact`, `load_delta` hash them).

    Raises FileNotFoundError (not an artifact) or `DeltaFormatError` (anything malformed). A version 1
    artifact (no digests) gives an `IntegrityWarning`."""
    path = Path(delta_dir)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a delta artifact (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    where = path / CONFIG_NAME
    try:
        document = json.loads(where.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DeltaFormatError(f"{where}: not valid JSON ({_reason(e)})") from None
    except OSError as e:
        raise DeltaFormatError(f"{where}: cannot be read ({_reason(e)})") from None
    check_document(document, where, verify)
    _check_tensor_file(path / WEIGHTS_NAME, document)
    if document["format_version"] < 2:
        warnings.warn(f"{path}: a format version 1 artifact has no content digests, so its integrity is not "
                      f"checked; re-save it with this deltacome_ao to add them", IntegrityWarning, stacklevel=2)
    return document


def _expected_names(document: Mapping) -> set[str]:
    return stored_names(document["layers"], with_base=False) | set(document["kept"])


def _check_tensor_file(file: Path, document: Mapping) -> None:
    """The safetensors header agrees with the document: names, and (version 2) dtypes and shapes."""
    expected = _expected_names(document)
    with TensorFile(file) as f:
        stored = set(f.keys())
        if stored != expected:
            raise DeltaFormatError(f"{file}: tensors missing {_few(sorted(expected - stored))}, "
                                   f"unexpected {_few(sorted(stored - expected))}")
        meta = f.metadata()
        if meta.get("deltacome", FORMAT) != FORMAT:
            raise DeltaFormatError(f"{file}: header metadata 'deltacome' is {meta.get('deltacome')!r}, expected {FORMAT!r}")
        if meta.get("format_version", str(document["format_version"])) != str(document["format_version"]):
            raise DeltaFormatError(f"{file}: header metadata format_version {meta.get('format_version')!r}, "
                                   f"the document says {document['format_version']}")
        for module, spec in document["layers"].items():
            cls = check_spec(spec, module)
            for inner, (shape, dtype) in list(cls.inner_layout(spec).items())[1:]:
                stored_dtype, stored_shape = f.layout(f"{spec_key(module, spec)}{SEP}{inner}")
                if stored_dtype != dtype_name(dtype) or stored_shape != list(shape):
                    raise DeltaFormatError(
                        f"{file}: {module}: {inner} is {tuple(stored_shape)} {stored_dtype}, the layer's structure "
                        f"({cls.__name__} {cls.attributes_from_spec(spec)}) needs {tuple(shape)} {dtype_name(dtype)}")
        if document["format_version"] >= 2:
            records = document["integrity"]["tensors"]
            for name in sorted(stored):
                dtype, shape = f.layout(name)
                if dtype != records[name]["dtype"] or shape != records[name]["shape"]:
                    raise DeltaFormatError(
                        f"{file}: tensor {name!r} is {dtype} {tuple(shape)} in the header, the document records "
                        f"{records[name]['dtype']} {tuple(records[name]['shape'])} (the file is corrupted or was changed)")


def verify_artifact(delta_dir: str | os.PathLike) -> dict:
    """`read_delta_config` plus every tensor's bytes checked against its recorded sha256 (version 2);
    returns the document. Raises `DeltaFormatError` naming the first tensor that differs."""
    path = Path(delta_dir)
    document = read_delta_config(path)
    if document["format_version"] >= 2:
        records = document["integrity"]["tensors"]
        with TensorFile(path / WEIGHTS_NAME) as f:
            for name in sorted(records):
                check_tensor(name, f.get_tensor(name), records[name], path / WEIGHTS_NAME)
    return document
