"""The base fingerprint: which base a delta was made against, and the check that a base is that one.

A fingerprint records, for every base tensor, its shape, dtype, the sha256 of all its bytes and a
sampled sha256 (`SAMPLE_CHUNKS` chunks of `SAMPLE_CHUNK` bytes, for fast checks of large bases);
`check_base` compares a base with it at the chosen `verify` level and raises `BaseMismatchError`
naming everything that differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping, Optional

import torch

from .checkpoint import few
from .delta_tensor import DTYPE_NAMES, dtype_name

__all__ = ["SAMPLE_CHUNK", "SAMPLE_CHUNKS", "VERIFY_LEVELS", "BaseMismatchError", "raw_bytes", "same", "full_hash",
           "sample_hash", "tensor_entry", "fingerprint", "fingerprint_problem", "is_sha256", "compare_base",
           "check_base"]

SAMPLE_CHUNK = 4096  # bytes per sampled chunk of the fast ("sample") content hash
SAMPLE_CHUNKS = 256
VERIFY_LEVELS = ("full", "sample", "none")


class BaseMismatchError(ValueError):
    """The base model given is not the one the delta was made against."""


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (dtype and shape included; NaN == NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a).cpu(), raw_bytes(b).cpu())


def full_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(raw_bytes(t).cpu().numpy().data)
    return h.hexdigest()


def sample_hash(t: torch.Tensor) -> str:
    """sha256 over the whole tensor if it has at most SAMPLE_CHUNK * SAMPLE_CHUNKS bytes, else over
    SAMPLE_CHUNKS chunks of SAMPLE_CHUNK bytes spread evenly from the first byte to the last."""
    flat = raw_bytes(t)
    n = flat.numel()
    if n > SAMPLE_CHUNK * SAMPLE_CHUNKS:
        step = (n - SAMPLE_CHUNK) / (SAMPLE_CHUNKS - 1)
        flat = torch.cat([flat[round(k * step):round(k * step) + SAMPLE_CHUNK] for k in range(SAMPLE_CHUNKS)])
    h = hashlib.sha256()
    h.update(flat.cpu().numpy().data)
    return h.hexdigest()


def tensor_entry(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": full_hash(t), "sample_sha256": sample_hash(t)}


def _digest(entries: Mapping[str, Mapping]) -> str:
    rows = sorted((n, e["shape"], e["dtype"], e["sha256"]) for n, e in entries.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def fingerprint(entries: Mapping[str, dict], model_type: Optional[str], complete: bool) -> dict:
    """The fingerprint document of `entries` ({name: `tensor_entry`}); `complete`: it covers every
    base tensor (then a base with extra tensors is another base)."""
    return {
        "model_type": model_type,
        "complete": complete,
        "hash": "sha256 of each tensor's raw bytes (sha256: all of them; sample_sha256: "
                f"{SAMPLE_CHUNKS} evenly spaced {SAMPLE_CHUNK}-byte chunks, all bytes if smaller)",
        "digest": _digest(entries),
        "tensors": dict(entries),
    }


def is_sha256(value) -> bool:
    """A sha256 hex digest (64 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def fingerprint_problem(fp) -> Optional[str]:
    """Why `fp` is not a well-formed fingerprint document (None if it is): every field's type, every
    tensor entry (shape: list of ints, dtype: a known name, sha256 / sample_sha256: hex digests) and
    the `digest` over the entries. The readers raise it as their format error, naming the file."""
    if not isinstance(fp, Mapping):
        return f"must be an object, got {type(fp).__name__}"
    tensors = fp.get("tensors")
    if not isinstance(tensors, Mapping):
        return f"'tensors' must be an object {{name: {{shape, dtype, sha256, sample_sha256}}}}, got {type(tensors).__name__}"
    for name, e in tensors.items():
        if not isinstance(e, Mapping):
            return f"tensors[{name!r}] must be an object, got {type(e).__name__}"
        if not _is_shape(e.get("shape")):
            return f"tensors[{name!r}].shape must be a list of non-negative integers, got {e.get('shape')!r}"
        if e.get("dtype") not in DTYPE_NAMES:
            return f"tensors[{name!r}].dtype {e.get('dtype')!r} is not a known dtype ({', '.join(DTYPE_NAMES)})"
        for field in ("sha256", "sample_sha256"):
            if not is_sha256(e.get(field)):
                return f"tensors[{name!r}].{field} must be a sha256 hex digest, got {e.get(field)!r}"
    if not isinstance(fp.get("complete", False), bool):
        return f"'complete' must be true or false, got {fp.get('complete')!r}"
    if fp.get("model_type") is not None and not isinstance(fp.get("model_type"), str):
        return f"'model_type' must be a string or null, got {fp.get('model_type')!r}"
    if "digest" in fp and fp["digest"] != _digest(tensors):
        return "'digest' does not match its tensor entries (the fingerprint was changed or corrupted)"
    return None


def compare_base(fp: Mapping, tensors: Mapping[str, torch.Tensor], model_type: Optional[str], verify: str) -> list[str]:
    """What differs between the fingerprint and the given base tensors (empty: the right base)."""
    problems = []
    if fp.get("model_type") and model_type and fp["model_type"] != model_type:
        problems.append(f"model_type: the delta was made for a {fp['model_type']!r} base, this base is {model_type!r}")
    entries = fp["tensors"]
    missing = [n for n in entries if n not in tensors]
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the original base are missing: {few(missing)}")
    if fp.get("complete"):
        extra = [n for n in tensors if n not in entries]
        if extra:
            problems.append(f"{len(extra)} tensor(s) the original base did not have: {few(extra)}")
    shapes, dtypes, contents = [], [], []
    for name, e in entries.items():
        if name not in tensors:
            continue
        t = tensors[name]
        if list(t.shape) != e["shape"]:
            shapes.append(f"{name} {tuple(t.shape)} (expected {tuple(e['shape'])})")
        elif dtype_name(t.dtype) != e["dtype"]:
            dtypes.append(f"{name} {dtype_name(t.dtype)} (expected {e['dtype']})")
        elif verify != "none":
            digest = full_hash(t) if verify == "full" else sample_hash(t)
            if digest != e["sha256" if verify == "full" else "sample_sha256"]:
                contents.append(name)
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ: {few(shapes)}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype(s) differ: {few(dtypes)} (load the base in the dtype it had)")
    if contents:
        problems.append(f"{len(contents)} tensor(s) have other values ({verify} sha256): {few(contents)}")
    return problems


def check_base(fp: Mapping, tensors: Mapping[str, torch.Tensor], model_type: Optional[str], verify: str,
               what: str = "the delta") -> None:
    """Raise `BaseMismatchError` listing every difference between the base and the fingerprint."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    problems = compare_base(fp, tensors, model_type, verify)
    if problems:
        raise BaseMismatchError(f"{what} was made against another base model:\n  - " + "\n  - ".join(problems))
