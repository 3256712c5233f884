"""Checkpoint I/O shared by every integration: reading model tensors by name, and writing files and
directories atomically.

- `safetensors_files(dir)`: the safetensors files of a `save_pretrained` directory (index-aware).
- `BaseWeights`: read-only tensors by name from an `nn.Module`, a state dict or such a directory
  (lazily, one tensor at a time).
- `check_pair(...)`: the one "is this the right base for this fine-tune" check (model type, names,
  shapes, biases), used by `compress_` and by streaming compression.
- `write_dir_atomic(out, fill)`, `write_text_atomic(path, text)`: a reader (or a crash) sees the old
  content or the complete new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["INDEX_NAME", "safetensors_files", "open_safetensors", "BaseWeights", "CheckpointMismatchError", "check_pair", "few",
           "alias_key", "unaliased",
           "write_dir_atomic", "write_text_atomic", "fsync_dir"]

INDEX_NAME = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """The fine-tuned model and the base do not have the same architecture (names, shapes, model type)."""


def few(items: Iterable, k: int = 4) -> str:
    """The first `k` items for an error message, and how many more there are."""
    items = [str(i) for i in items]
    return ", ".join(items[:k]) + (f", ... (+{len(items) - k})" if len(items) > k else "")


@contextlib.contextmanager
def open_safetensors(path: Path):
    """`safe_open(path)` whose failures (a truncated or corrupt file, an unreadable tensor) are a
    ValueError naming the file, not safetensors' own exception type."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield _Checked(handle, path)
    except SafetensorError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({reason})") from None


class _Checked:
    """A safetensors handle whose reads raise ValueError naming the file and tensor."""

    def __init__(self, handle, path):
        self._handle, self._path = handle, path

    def __getattr__(self, name):
        method = getattr(self._handle, name)

        def call(*args):
            try:
                return method(*args)
            except SafetensorError as e:
                what = f"tensor {args[0]!r}" if args else name
                raise ValueError(f"{self._path}: {what} cannot be read ({e})") from None

        return call


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` directory: the shards its
    `model.safetensors.index.json` lists, else `model.safetensors`, else every `*.safetensors`
    file; [] when there is none. Raises ValueError for an unreadable index, FileNotFoundError for a
    listed shard that is missing."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            raise ValueError(f"{index}: shard names must be file names in the directory")
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shard(s) listed in {INDEX_NAME} are missing: {few(missing)}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    return sorted(model_dir.glob("*.safetensors"))


class BaseWeights:
    """Read-only access to a model's tensors by name, from an `nn.Module`, a state dict, or a local
    directory of (possibly sharded) safetensors files (`files`). A directory is read lazily, one
    tensor at a time. Copying (or deep-copying) returns the same object: it is never mutated, and a
    config holding it must not duplicate a model's weights."""

    def __init__(self, source: Any, role: str = "base"):
        self.model_type: str | None = None
        self.files: list[Path] = []
        self._files: dict[str, Path] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        if isinstance(source, torch.nn.Module):
            self._tensors = dict(source.state_dict(keep_vars=False))
            self.model_type = getattr(getattr(source, "config", None), "model_type", None)
        elif isinstance(source, dict):
            self._tensors = source
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{role} {str(source)!r} is not a directory; pass an nn.Module, a state dict or a local "
                    f"directory saved with save_pretrained"
                )
            self.files = safetensors_files(path)
            if not self.files:
                raise FileNotFoundError(f"{role} {path} holds no *.safetensors file; give a save_pretrained directory")
            for f in self.files:
                with open_safetensors(f) as handle:
                    for key in handle.keys():
                        self._files[key] = f
            config_file = path / "config.json"
            if config_file.is_file():
                try:
                    self.model_type = json.loads(config_file.read_text()).get("model_type")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                    raise ValueError(f"{config_file}: not a JSON config ({e})") from None
        else:
            raise TypeError(f"{role} must be an nn.Module, a state dict or a directory path, got {type(source).__name__}")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._files

    def keys(self) -> list[str]:
        return list(self._tensors) + list(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors[name]
        if name not in self._files:
            raise KeyError(name)
        with open_safetensors(self._files[name]) as handle:
            return handle.get_tensor(name)

    def aliases(self) -> dict[str, str]:
        """{later name: first name} of in-memory tensors that share memory (tied weights). Tensors
        read from files are never aliases (safetensors stores a tied tensor once)."""
        return unaliased(self._tensors.items())[1]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._tensors:
            return tuple(self._tensors[name].shape)
        with open_safetensors(self._files[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())


def alias_key(t: torch.Tensor):
    """Identity of the memory a tensor views (equal for tied weights), None if it has none. Only
    meaningful while every tensor compared is alive (a freed address can be reused)."""
    if t.device.type == "meta" or not t.numel():
        return None
    names = getattr(t, "tensor_data_names", None)
    if names is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        # a tensor subclass (a compressed weight) has no storage of its own: the identity of its inner tensors
        return (type(t).__name__, *(alias_key(getattr(t, n)) for n in names))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unaliased(items: Iterable) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop later names of tensors that alias an earlier one (tied weights) -> (tensors, {alias: kept})."""
    seen, out, aliases = {}, {}, {}
    for name, t in items:
        key = alias_key(t)
        if key is not None:
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        out[name] = t
    return out, aliases


def check_pair(base: BaseWeights, shapes: Mapping[str, tuple], compressed: Iterable[str], *,
               model_type: Optional[str] = None, strict: bool = False, ignore: Iterable[str] = ()) -> None:
    """Check a fine-tuned model against its base before any work; raise `CheckpointMismatchError`.

    shapes: {tensor name: shape} of the fine-tuned model (names relative to what is compressed).
    compressed: the weight names that will be compressed (each must be in the base, 2-D or a 3-D stack
        of experts, and have a bias exactly when the base has one).
    strict: the two must hold the same tensor names (else only shared names are compared).
    ignore: base names to leave out (e.g. tied aliases a checkpoint does not store).
    """
    ignore = set(ignore)
    base_keys = [k for k in base.keys() if k not in ignore]
    in_base = set(base_keys)
    if base.model_type and model_type and base.model_type != model_type:
        raise CheckpointMismatchError(
            f"the base is a {base.model_type!r} model but the fine-tuned model is {model_type!r}; "
            f"pass the base model this one was fine-tuned from"
        )
    if strict:
        only_ft = [k for k in shapes if k not in in_base]
        only_base = [k for k in base_keys if k not in shapes]
        if only_ft or only_base:
            parts = []
            if only_ft:
                parts.append(f"{len(only_ft)} only in the fine-tuned one: {few(only_ft)}")
            if only_base:
                parts.append(f"{len(only_base)} only in the base: {few(only_base)}")
            raise CheckpointMismatchError(
                "the checkpoints have different tensor names (" + "; ".join(parts) + "); pass the base this model "
                "was fine-tuned from, or strict=False to store fine-tuned-only tensors as they are"
            )
    compressed = list(compressed)
    missing = [k for k in compressed if k not in in_base]
    if missing:
        raise CheckpointMismatchError(
            f"the base has no tensor {few(missing)}; the base is missing weights or has another architecture "
            f"(names are relative to the model being compressed)"
        )
    for key, shape in shapes.items():
        if key in in_base and base.shape(key) != tuple(shape):
            base_shape = base.shape(key)
            vocab = ("embed" in key or "lm_head" in key) and tuple(shape[1:]) == tuple(base_shape[1:])
            hint = " (the vocabulary sizes differ)" if vocab else ""
            raise CheckpointMismatchError(
                f"{key}: fine-tuned shape {tuple(shape)} but base shape {base_shape}{hint}; "
                f"the base must have the fine-tuned model's architecture"
            )
    for key in compressed:
        if len(shapes[key]) not in (2, 3):
            raise CheckpointMismatchError(
                f"{key}: a compressed weight must be 2-D (or 3-D stacked experts), got shape {tuple(shapes[key])}")
        if not key.endswith(".weight"):
            continue
        bias = key[: -len("weight")] + "bias"
        if bias not in shapes and bias in in_base:
            raise CheckpointMismatchError(
                f"{key[: -len('.weight')] or 'module'}: the base has a bias but the fine-tuned layer has none; "
                f"the base has another architecture"
            )


# --- atomic writes -------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
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


def _file_mode(made_dir: Path) -> int:
    """The mode an ordinary new file gets here: that of a directory just made with `os.mkdir`
    (the umask applied) without the execute bits. Thread-safe, unlike reading the umask."""
    return made_dir.stat().st_mode & 0o666


def write_dir_atomic(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Fill a temporary sibling directory with `fill(tmp)`, then rename it to `out`: a reader (or a
    crash) sees the old directory or the complete new one, never a partial one. Files get the usual
    (umask) permissions and are fsynced. Raises FileExistsError if `out` exists and not `overwrite`
    (checked before and after filling; the old directory is only replaced once the new one is
    complete)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)  # not mkdtemp: the directory gets the usual (umask) permissions
    old = None
    try:
        fill(tmp)
        mode = _file_mode(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)  # some writers (safetensors) create 0600 files
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "d")
        os.replace(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / "d").exists():
            os.replace(old / "d", out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a synced file in a temporary sibling directory and a
    rename, so a reader never sees half a file (results JSON, generated docs, model cards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    try:
        f = tmp / path.name
        with open(f, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(f, _file_mode(tmp))
        os.replace(f, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
