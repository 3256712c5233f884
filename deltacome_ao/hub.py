"""The Hugging Face Hub side of a delta artifact: which base it names, where a delta comes from, and
its model card.

- `base_reference(base, name, revision)`: the base model's Hub id (or local path) and revision to
  record in `delta_config.json` (`base_model_name_or_path`, `base_revision`): an explicit value, else
  what the base says about itself (a transformers model's `config._name_or_path` / `_commit_hash`, a
  directory path — a Hub cache snapshot `.../models--org--name/snapshots/<sha>` gives both).
- `resolve_delta_dir(name_or_path, revision)`: a local artifact directory as it is; a string that is
  no local directory and looks like a Hub repo id (`org/name`) is fetched with
  `huggingface_hub.snapshot_download(..., allow_patterns=[the artifact files])`, which honours
  `HF_HUB_OFFLINE` and the local cache.
- `model_card(...)` / `card_text(...)`: the README.md written next to the artifact (YAML front matter
  the Hub reads: `base_model`, `base_model_relation: adapter`, `library_name`, tags).

Nothing here imports torch; `huggingface_hub` (a transformers dependency) is imported only to fetch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["CARD_NAME", "HUB_PATTERNS", "looks_like_repo_id", "snapshot_reference", "base_reference",
           "resolve_delta_dir", "card_text", "model_card"]

CARD_NAME = "README.md"
# the files of a delta artifact (format.CONFIG_NAME, format.WEIGHTS_NAME) and its card
HUB_PATTERNS = ("delta_config.json", "delta.safetensors", CARD_NAME)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})/?$")


def looks_like_repo_id(value: Any) -> bool:
    """`org/name` with the Hub's characters (no `--` or `..`, not ending in `.` or `-`). Only this
    two-part form counts: a bare word is far more often a mistyped local directory."""
    if not isinstance(value, str) or not _REPO_ID.match(value):
        return False
    return "--" not in value and ".." not in value and not value.endswith((".", "-")) and \
        not value.split("/")[0].endswith((".", "-"))


def snapshot_reference(path: str | os.PathLike) -> Optional[tuple[str, str]]:
    """(repo id, commit) when `path` is a Hub cache snapshot `.../models--org--name/snapshots/<sha>`."""
    m = _SNAPSHOT.search(Path(path).as_posix())
    if not m:
        return None
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def base_reference(base: Any, name: Optional[str] = None,
                   revision: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(base_model_name_or_path, base_revision) to record for `base` (an `nn.Module`, a directory path,
    a state dict, ...). Explicit `name` / `revision` win; else a Hub cache snapshot path gives both,
    a transformers model its `config._name_or_path` and `config._commit_hash` (set when it was loaded
    from the Hub), another directory its path. None when nothing is known."""
    found_name = found_revision = None
    if isinstance(base, (str, os.PathLike)):
        found_name = str(base)
    elif getattr(base, "files", None):  # checkpoint.BaseWeights over a directory
        found_name = str(Path(base.files[0]).parent)
    else:
        config = getattr(base, "config", None)
        if config is not None:
            found_name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
            found_revision = getattr(config, "_commit_hash", None) or None
    if found_name is not None:
        snap = snapshot_reference(found_name)
        if snap is not None:
            found_name, found_revision = snap[0], found_revision or snap[1]
    if name is not None:
        if found_name != name:
            found_revision = None  # the revision we found belongs to another name
        found_name = str(name)
    return found_name, (revision if revision is not None else found_revision)


def resolve_delta_dir(delta: str | os.PathLike, revision: Optional[str] = None, *,
                      cache_dir: Optional[str | os.PathLike] = None, token: Any = None,
                      local_files_only: Optional[bool] = None, patterns: Sequence[str] = HUB_PATTERNS,
                      what: str = "delta") -> Path:
    """The local directory of the delta `delta`: itself when it is a local directory (or anything
    that does not look like a Hub id: the caller's reader then reports what is missing), else the
    snapshot `huggingface_hub.snapshot_download` returns for the repo id at `revision`, fetching
    only the files matching `patterns` (the artifact's). `local_files_only` (default:
    `HF_HUB_OFFLINE`) uses the cache only.

    Raises FileNotFoundError when the Hub (or the offline cache) has no such repo."""
    if isinstance(delta, os.PathLike) or Path(delta).exists() or not looks_like_repo_id(str(delta)):
        return Path(delta)  # local (`revision` applies to Hub ids only)
    import huggingface_hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if local_files_only is None:
        local_files_only = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        path = snapshot_download(str(delta), revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only, allow_patterns=list(patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = "in the local Hub cache (offline)" if local_files_only else "on the Hub"
        raise FileNotFoundError(
            f"{str(delta)!r} is not a local directory, and no {what} {str(delta)!r}"
            f"{'' if revision is None else f' at revision {revision!r}'} was found {where}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return Path(path)


# --- model cards ---------------------------------------------------------------------------------


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
        return json.dumps(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def card_text(front_matter: Mapping[str, Any], body: str) -> str:
    """README.md text: YAML front matter (scalars and lists of scalars; None values left out) + body."""
    lines = ["---"]
    for key, value in front_matter.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_value(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n\n" + body.rstrip() + "\n"


def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def model_card(document: Mapping[str, Any], name: str, file_bytes: Optional[Mapping[str, int]] = None,
               tags: Sequence[str] = ()) -> str:
    """The model card of a delta artifact, from its `delta_config.json` document: front matter with
    `base_model` (only a Hub id: a local path is named in the text), `base_model_relation: adapter`,
    `library_name: deltacome_ao` and tags; the method, alpha, the measured bytes (tensors and files)
    and how to load it."""
    base = document.get("base_model_name_or_path")
    revision = document.get("base_revision")
    method, alpha = document.get("method"), document.get("alpha")
    nbytes = document.get("bytes") or {}
    layers = document.get("layers") or {}
    params = sum(int(s["shape"][0]) * int(s["shape"][1]) for s in layers.values())
    compressed, kept = int(nbytes.get("compressed", 0)), int(nbytes.get("kept", 0))
    front = {
        "base_model": base if looks_like_repo_id(base) else None,
        "base_model_relation": "adapter",
        "library_name": "deltacome_ao",
        "tags": ["deltacome", "delta-compression", *([f"method:{method}"] if method else []), *tags],
    }
    if base is None:
        base_text = "not recorded (pass `base_model_name_or_path=` to `save_delta`)"
    else:
        base_text = f"`{base}`" + (f" at revision `{revision}`" if revision else "")
    files = dict(file_bytes or {})
    rows = [
        f"| compressed layers | {len(layers)} ({params:,} parameters) |",
        f"| packed factors | {compressed:,} B ({8 * compressed / max(params, 1):.3f} bits/param, "
        f"{compressed / max(2 * params, 1):.4f} of fp16) |",
        f"| kept tensors (embeddings, norms, lm_head, ...) | {kept:,} B ({len(document.get('kept') or [])} tensors) |",
        *(f"| file `{f}` | {b:,} B ({_human(b)}) |" for f, b in files.items()),
    ]
    load_base = base if base is not None else "path/to/base"
    repo = name if looks_like_repo_id(name) else f"path/to/{name}"
    alpha_text = "not recorded" if alpha is None else f"{alpha:g} (delta bytes / fp16 bytes of each compressed matrix)"
    body = f"""# {name}

A **Delta-CoMe delta** made with [deltacome_ao](https://arxiv.org/abs/2406.08903): only what a
fine-tune adds to its base — each linear layer's delta `W_ft − W_base` as mixed-precision
singular vectors (8/3/2-bit under a byte budget), plus the non-linear tensors that differ from the
base. It is useless without its base model, which a fingerprint in `delta_config.json` checks on load.

| | |
|---|---|
| base model | {base_text} |
| method | {f"`{method}`" if method else "not recorded (pass `config=` to `save_delta`); layer kinds: " + ", ".join(sorted({str(spec.get("tensor", "?")) for spec in layers.values()}))} |
| alpha | {alpha_text} |
| group size | {document.get('group_size')} |
{chr(10).join(rows)}

## Use

```python
from deltacome_ao import DeltaCoMeModel

model = DeltaCoMeModel.from_pretrained("{load_base}", "{repo}")   # loads the base, checks it, puts the delta on
```

Many deltas over one base: `MultiDeltaModel(base).load_delta("name", "{repo}")`.
As a PEFT / vLLM LoRA adapter: `deltacome export-lora BASE {repo} OUT --vllm` (docs/lora.md).
"""
    return card_text(front, body)
