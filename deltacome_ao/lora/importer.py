"""`compress_lora`: a PEFT LoRA adapter compressed into a delta artifact.

Each LoRA target's weight delta is `ΔW = scaling · B A` (rank r; `scaling = lora_alpha / r`, or
`lora_alpha / √r` with rsLoRA; transposed with `fan_in_fan_out`). For a linear layer compressed by
a singular-vector method (deltacome / single / lowrank), the rank-r product is re-decomposed exactly
by QR of B and Aᵀ and an r × r SVD (`decompose.product_svd`: the dense (out, in) delta is never
formed), then allocated and quantized as any delta — the budget `alpha` refers to the dense
matrix, and a rank-r delta never gets more than r vectors. Other methods (BitDelta) get the dense
delta, one layer at a time. What is not a linear layer's delta — an embedding LoRA, a Conv1D
(`fan_in_fan_out`) target, `modules_to_save`, `lora_bias` — becomes a kept tensor (the base's
tensor plus the adapter's change, stored dense), as a full fine-tune's embeddings are.

The result is a normal delta artifact (base fingerprint from the base) that `load_delta`,
`DeltaCoMeModel.from_pretrained` and `MultiDeltaModel.load_delta` read.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..artifact import delta_size, save_delta, set_tensor
from ..config import DeltaCoMeConfig
from ..decompose import product_svd
from ..delta_tensor import dtype_name
from ..fingerprint import BaseMismatchError
from ..hub import base_reference, looks_like_repo_id, resolve_delta_dir
from ..methods.mixed_precision import MixedPrecisionDeltaTensor, compress_factors, svd_options
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter

__all__ = ["compress_lora"]


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _load_base(base: Any, adapter_config: Mapping, revision: Optional[str]) -> torch.nn.Module:
    if isinstance(base, torch.nn.Module):
        return base
    if base is None:
        base = adapter_config.get("base_model_name_or_path")
        revision = revision or adapter_config.get("revision")
        if not base:
            raise ValueError("the adapter records no base_model_name_or_path; pass the base")
    from transformers import AutoModelForCausalLM

    kwargs = {"revision": revision} if revision else {}
    return AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", **kwargs).eval()


def _frob2(left: torch.Tensor, right: torch.Tensor) -> float:
    left, right = left.double(), right.double()
    return float(torch.trace((left.T @ left) @ (right @ right.T)).clamp_min(0))


def compress_lora(
    base: Any,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    alpha: float = 1 / 16,
    method: str = "deltacome",
    group_size: int = 128,
    allocation: str = "paper",
    svd: str = "auto",
    revision: Optional[str] = None,
    base_revision: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> dict:
    """Compress the PEFT LoRA adapter `adapter` (a directory or Hub id at `revision`) of `base`
    into the delta artifact `out_dir`; returns a report (sizes, per-module ranks and errors).

    base: the base model (`nn.Module`, not modified), a directory / Hub id (at `base_revision`), or
        None: the adapter's `base_model_name_or_path`. alpha, method, group_size, allocation, svd:
        as `DeltaCoMeConfig` (alpha: delta bytes / fp16 bytes of each dense matrix).
    Raises `BaseMismatchError` when a target module is missing or has another shape,
    `peft_format.AdapterFormatError` for adapters that are not plain LoRA (e.g. DoRA)."""
    adapter_dir = resolve_delta_dir(adapter, revision, patterns=(ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"),
                                    what="LoRA adapter")
    lora = read_adapter(adapter_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    base_model = _load_base(base, lora.config, base_revision)
    config = DeltaCoMeConfig(base=base_model, alpha=alpha, method=method, group_size=group_size,
                             allocation=allocation, svd=svd, progress=False)
    model = _structural_copy(base_model)
    by_svd = config.method in ("deltacome", "single", "lowrank")
    report_modules, dense = {}, {}
    with torch.no_grad():
        for m in lora:
            try:
                module = model.get_submodule(m.module)
            except AttributeError:
                raise BaseMismatchError(f"{m.module}: the adapter targets a module the base does not have") from None
            w = getattr(module, "weight", None)
            left, right = m.factors()
            if not isinstance(w, torch.Tensor) or (left.shape[0], right.shape[1]) != tuple(w.shape):
                raise BaseMismatchError(f"{m.module}: the adapter's delta is {(left.shape[0], right.shape[1])}, the "
                                        f"base weight {None if w is None else tuple(w.shape)}")
            if isinstance(module, torch.nn.Linear) and m.kind == "linear" and not m.fan_in_fan_out:
                if by_svd:
                    factors = compress_factors(None, svd_options(config), m.module, svd=product_svd(left, right),
                                               device=w.device)
                    new = MixedPrecisionDeltaTensor.from_factors(w.detach(), factors)
                else:
                    new = config.compress(w.detach().float() + left @ right, w.detach(), m.module)
                module.weight = torch.nn.Parameter(new, requires_grad=False)
                f = new.low_rank_factors()
                if f is not None:
                    v, ut = f.dequantize()
                    err2 = _frob2(torch.cat([left, -(ut.T * f.s.float())], 1), torch.cat([right, v], 0))
                else:
                    err2 = float((left @ right - new.delta_weight()).double().pow(2).sum())
                norm2 = _frob2(left, right)
                report_modules[m.module] = {"lora_rank": m.rank, "structure": new.describe(),
                                            "delta_bytes": new.delta_nbytes(),
                                            "rel_error": (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0}
            else:  # an embedding, a Conv1D (fan_in_fan_out) or another layer: its new weight, dense
                set_tensor(model, f"{m.module}.weight", (w.detach().float() + left @ right).to(w.dtype))
                dense[f"{m.module}.weight"] = m.kind if m.kind == "embedding" else type(module).__name__
            if m.bias is not None and torch.any(m.bias):
                b = getattr(module, "bias", None)
                if b is None:
                    raise BaseMismatchError(f"{m.module}: the adapter has a LoRA bias (lora_bias) but the base layer "
                                            f"has no bias to add it to")
                set_tensor(model, f"{m.module}.bias", (b.detach().float() + m.scaling * m.bias.float()).to(b.dtype))
                dense[f"{m.module}.bias"] = "lora_bias"
        for name, t in lora.saved.items():  # modules_to_save: the module's whole new tensors
            old = dict(model.named_parameters()).get(name)
            if old is None:
                old = dict(model.named_buffers()).get(name)
            if old is None:
                raise BaseMismatchError(f"{name}: in the adapter's modules_to_save but not in the base")
            set_tensor(model, name, t.to(old.dtype))
            dense[name] = "modules_to_save"
    # the base's name: given > the base's own Hub id > what the adapter records > the base's path
    base_name, base_rev = base_reference(base_model, base_model_name_or_path, base_revision)
    recorded = lora.config.get("base_model_name_or_path")
    if base_model_name_or_path is None and recorded and not looks_like_repo_id(base_name):
        base_name, base_rev = recorded, base_revision or lora.config.get("revision")
    user = {"source": "peft-lora", "adapter": str(adapter), "lora_r": lora.config.get("r"),
            "lora_alpha": lora.config.get("lora_alpha"), "use_rslora": bool(lora.config.get("use_rslora")),
            **(dict(metadata) if metadata else {})}
    save_delta(model, out, base=base_model, config=config, metadata=user, overwrite=overwrite,
               base_model_name_or_path=base_name, base_revision=base_rev)
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    compressed = sum(r["delta_bytes"] for r in report_modules.values())
    return {
        "adapter": str(adapter_dir),
        "out": str(out),
        "adapter_tensor_bytes": lora.nbytes,
        "adapter_dtypes": list(lora.dtypes),
        "adapter_file_bytes": adapter_file.stat().st_size,
        "artifact_bytes": delta_size(out),
        "compressed_bytes": compressed,
        "kept": dense,
        "modules": report_modules,
        "method": method,
        "alpha": alpha,
        "model_dtype": dtype_name(next((p.dtype for p in base_model.parameters()), torch.float32)),
    }
