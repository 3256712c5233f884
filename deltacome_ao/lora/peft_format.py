"""The PEFT LoRA adapter format (what PEFT 0.21 writes and reads, and what vLLM's LoRA loader accepts).

A LoRA adapter directory holds

- `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha` (scaling = lora_alpha / r, or
  lora_alpha / √r with `use_rslora`), `target_modules`, `rank_pattern` / `alpha_pattern` (per-module
  r and alpha, keys matched as `(.*\\.)?<key>$`), `modules_to_save`, `lora_bias`, `fan_in_fan_out`,
  `base_model_name_or_path`, `revision`, ...;
- `adapter_model.safetensors`, keys `base_model.model.<module>.` +
  `lora_A.weight` (r, in) and `lora_B.weight` (out, r) of a linear layer (`lora_B.bias` (out,) with
  `lora_bias`), `lora_embedding_A` (r, vocab) and `lora_embedding_B` (hidden, r) of an embedding
  (ΔE = (B A)ᵀ), or `<param>` of a module in `modules_to_save` (its whole new value).

A linear layer's delta is `scaling · B A` (out, in) — transposed when `fan_in_fan_out` (GPT-2's
Conv1D stores weights as (in, out)).

vLLM's loader (vllm/lora: `PEFTHelper`, `LoRAModel.from_local_checkpoint`, `parse_fine_tuned_lora_name`)
reads the same files with more constraints, which `vllm_problems` checks: no `modules_to_save`, no
DoRA, no LoRA bias (deprecated there), `r` ≤ the server's `--max-lora-rank` (at most 512), one `r`
and `lora_alpha` for every module (no `rank_pattern` / `alpha_pattern`: vLLM reads neither), every
key `base_model.model.<module>.lora_{A,B}.weight` or `.lora_embedding_{A,B}` whose module's last name
component is a LoRA-capable layer (a linear layer, or the model's `embed_tokens` / `lm_head`), and
fp16 / bf16 weights (vLLM computes LoRA in the model's half dtype; fp32 files are cast on load).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from safetensors import safe_open

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX", "VLLM_MAX_RANK", "VLLM_DTYPES", "LoraModuleDelta",
           "LoraAdapter", "read_adapter", "lora_keys", "adapter_config", "vllm_problems", "AdapterFormatError"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
VLLM_MAX_RANK = 512  # the largest --max-lora-rank vLLM accepts
VLLM_DTYPES = (torch.float16, torch.bfloat16)


class AdapterFormatError(ValueError):
    """Not a PEFT LoRA adapter this library can read (or write for the target asked for)."""


def lora_keys(module: str, embedding: bool = False) -> tuple[str, str]:
    """The safetensors keys of a module's A and B factors."""
    if embedding:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(*, r: int, target_modules: list[str], base_model_name_or_path: Optional[str] = None,
                   revision: Optional[str] = None, rank_pattern: Optional[Mapping[str, int]] = None,
                   modules_to_save: Optional[list[str]] = None, lora_bias: bool = False) -> dict:
    """An `adapter_config.json` with scaling 1 for every module: `lora_alpha = r` and, per module
    of another rank, `alpha_pattern` = `rank_pattern`."""
    rank_pattern = dict(rank_pattern or {})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": int(r),
        "lora_alpha": int(r),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(target_modules),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": bool(lora_bias),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


@dataclass
class LoraModuleDelta:
    """One module of an adapter: its kind ("linear" / "embedding"), the factors as stored and the
    scaling, so that the module's weight delta (the module's own weight layout) is `delta()`."""

    module: str
    kind: str
    a: torch.Tensor  # linear: (r, in); embedding: (r, vocab)
    b: torch.Tensor  # linear: (out, r); embedding: (hidden, r)
    scaling: float
    fan_in_fan_out: bool = False
    bias: Optional[torch.Tensor] = None  # lora_B.bias (added after scaling: scaling · bias)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (rows, r), right (r, cols)) in fp32 with left @ right = the delta of the module's
        weight as the module stores it: linear (out, in) — (in, out) with fan_in_fan_out — and
        embedding (vocab, hidden). The scaling is folded into `left`."""
        a, b = self.a.float(), self.b.float() * self.scaling
        if self.kind == "embedding":
            return a.T * self.scaling, self.b.float().T  # ΔE = Aᵀ Bᵀ
        if self.fan_in_fan_out:
            return a.T, b.T
        return b, a

    def delta(self) -> torch.Tensor:
        left, right = self.factors()
        return left @ right


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk (`read_adapter`)."""

    path: Path
    config: dict
    modules: dict = field(default_factory=dict)  # {module: LoraModuleDelta}
    saved: dict = field(default_factory=dict)  # {tensor name: tensor} of modules_to_save
    nbytes: int = 0  # tensor bytes in adapter_model.safetensors
    dtypes: tuple = ()

    def __iter__(self) -> Iterator[LoraModuleDelta]:
        return iter(self.modules.values())


def _scaling(config: Mapping, module: str) -> tuple[int, float]:
    """(r, scaling) PEFT uses for `module` (rank_pattern / alpha_pattern keys match `(.*\\.)?key$`)."""
    import re

    def pattern(table: Mapping, default):
        for key, value in (table or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = int(pattern(config.get("rank_pattern"), config["r"]))
    alpha = float(pattern(config.get("alpha_pattern"), config.get("lora_alpha", r)))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def read_adapter(adapter_dir: str | os.PathLike) -> LoraAdapter:
    """Read `adapter_config.json` + `adapter_model.safetensors` of a PEFT LoRA adapter.

    Raises FileNotFoundError (missing files) or `AdapterFormatError` (another PEFT method, DoRA,
    unknown keys, factors of the wrong shapes)."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterFormatError(f"{path}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                                 f"only LoRA adapters can be compressed")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{path}: a DoRA adapter (use_dora) is not a low-rank weight delta; merge it first")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterFormatError(f"{path}: bad r {config.get('r')!r}")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    dtypes, nbytes = set(), 0
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            nbytes += t.numel() * t.element_size()
            dtypes.add(t.dtype)
            if not key.startswith(PREFIX):
                raise AdapterFormatError(f"{path / ADAPTER_WEIGHTS}: key {key!r} does not start with {PREFIX!r}")
            name = key[len(PREFIX):]
            for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                                 (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if name.endswith(suffix):
                    parts.setdefault(name[: -len(suffix)], {})[role] = t
                    break
            else:
                if ".lora_" in name or "lora_magnitude" in name:
                    raise AdapterFormatError(f"{path / ADAPTER_WEIGHTS}: unsupported LoRA tensor {key!r}")
                if ".base_layer." in name:  # PEFT also saves a targeted embedding's base weight: unchanged
                    continue
                saved[name] = t  # a module in modules_to_save (its new value)
    modules = {}
    for module, p in sorted(parts.items()):
        embedding = "eA" in p or "eB" in p
        a, b = (p.get("eA"), p.get("eB")) if embedding else (p.get("A"), p.get("B"))
        if a is None or b is None:
            raise AdapterFormatError(f"{path / ADAPTER_WEIGHTS}: {module} has only one of its two LoRA factors")
        r, scaling = _scaling(config, module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{path / ADAPTER_WEIGHTS}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                                     f"are not (r, in) and (out, r)")
        if a.shape[0] != r:
            raise AdapterFormatError(f"{path}: {module} has rank {a.shape[0]} but the config says r={r}")
        modules[module] = LoraModuleDelta(module, "embedding" if embedding else "linear", a, b, scaling,
                                          fan_in_fan_out=fan_in_fan_out and not embedding, bias=p.get("bias"))
    return LoraAdapter(path, config, modules, saved, nbytes, tuple(sorted(str(d) for d in dtypes)))


def vllm_problems(adapter_dir: str | os.PathLike, max_lora_rank: int = VLLM_MAX_RANK,
                  lora_modules: Optional[set[str]] = None) -> list[str]:
    """What vLLM's LoRA loader would refuse (or silently mis-serve) in this adapter; [] = none.

    `lora_modules`: the LoRA-capable module names of the served model (last name component); None
    accepts any. Checks the constraints listed in the module docstring."""
    path = Path(adapter_dir)
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (vLLM serves LORA)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            problems.append(f"adapter_config.json lacks {key!r} (required by vLLM's PEFTHelper)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (vLLM only supports modules_to_save being None)")
    if config.get("use_dora"):
        problems.append("use_dora (vLLM does not support DoRA)")
    if config.get("lora_bias") or config.get("bias") not in (None, "none"):
        problems.append("LoRA bias (lora_bias / bias != 'none'; deprecated in vLLM)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern / alpha_pattern (vLLM uses one r and lora_alpha for every module)")
    r = config.get("r")
    if isinstance(r, int) and r > max_lora_rank:
        problems.append(f"r={r} > max_lora_rank={max_lora_rank}")
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            ok = key.startswith(PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A",
                                                          ".lora_embedding_B"))
            if not ok:
                problems.append(f"tensor {key!r} is not a LoRA factor vLLM reads")
                continue
            module = key[len(PREFIX):].rsplit(".lora_", 1)[0]
            leaf = module.rsplit(".", 1)[-1]
            if lora_modules is not None and leaf not in lora_modules:
                problems.append(f"{module}: {leaf!r} is not a LoRA-capable module of the model")
            t = f.get_slice(key)
            dtype = t.get_dtype()
            if dtype not in ("F16", "BF16"):
                problems.append(f"{key} is {dtype} (vLLM serves LoRA in fp16 / bf16)")
            shape = t.get_shape()
            rank_dim = shape[0] if key.endswith(("lora_A.weight", "lora_embedding_A")) else shape[1]
            if isinstance(r, int) and rank_dim != r:
                problems.append(f"{key} has rank {rank_dim}, config r={r} (vLLM scales every module by lora_alpha / r)")
    return problems
