"""Stage 9 (integrations): serve a deltacome checkpoint with vLLM, tensor parallelism included.

Installed with the `vllm` extra, this module is a vLLM general plugin (entry point
`vllm.general_plugins: deltacome = deltacome_ao.vllm_plugin:register`, which vLLM calls in every
process, TP workers included). `register()` adds the quantization method "deltacome" — the
`quant_method` of the `quantization_config` that `deltacome_ao.hf.save_pretrained` writes into
`config.json` — so `vllm serve DIR` / `LLM(model=DIR)` on such a directory needs no flag:

- `DeltaCoMeVllmConfig` reads `quantization_config.modules` (the layer spec of every compressed
  matrix) and gives each vLLM linear layer whose matrices are listed a `DeltaCoMeLinearMethod`
  (a fused layer — `qkv_proj`, `gate_up_proj` — has one sub-matrix per checkpoint matrix, found
  through the model's `packed_modules_mapping`); every other layer stays vLLM's own.
- `DeltaCoMeLinearMethod.create_weights` registers the layer's dense `weight` (where vLLM's own
  loader puts the rank's slice of each base weight, `weight:base_weight` being routed there) and one
  placeholder per stored inner tensor, `weight:<inner>`, the names the checkpoint stores them under;
  their loader hands each tensor to `tensor_parallel.LayerShards`, which cuts every sub-matrix to the
  rank's slice exactly as soon as it is complete (column-parallel: output rows, Û's rows; row-parallel:
  input columns, V̂'s columns; the engine's all-reduce sums the partial outputs unchanged).
- `apply` runs each sub-matrix's compressed weight through its own `F.linear` — for Delta-CoMe the op
  `deltacome::delta_linear` (Triton kernel on CUDA, the C kernel on CPU) — and concatenates fused outputs.

docs/vllm.md: how to serve, what is measured, and what multi-delta serving inside vLLM would need.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from .factors import low_rank_term
from .hf import GUARD_TEXT
from .format import FORMAT_VERSION, SEP, DeltaFormatError, check_spec
from .tensor_parallel import LayerShards

__all__ = ["QUANT_METHOD", "DeltaCoMeVllmConfig", "DeltaCoMeLinearMethod", "register", "cache_factors"]

QUANT_METHOD = "deltacome"


class DeltaCoMeVllmConfig(QuantizationConfig):
    """vLLM's view of a deltacome checkpoint's `quantization_config` (see the module docstring)."""

    def __init__(self, modules: dict[str, dict], format_version: int = FORMAT_VERSION):
        super().__init__()
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise DeltaFormatError(f"quantization_config format_version {format_version!r}; this deltacome_ao reads "
                                   f"versions up to {FORMAT_VERSION} (upgrade it)")
        for name, spec in modules.items():
            check_spec(spec, name)
        self.modules = {name: dict(spec) for name, spec in modules.items()}

    def __repr__(self) -> str:
        return f"DeltaCoMeVllmConfig({len(self.modules)} compressed matrices)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the reference path runs anywhere; the Triton kernels need sm_70+

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DeltaCoMeVllmConfig":
        if config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise DeltaFormatError(f"quant_method {config.get('quant_method')!r} is not {QUANT_METHOD!r}")
        modules = config.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise DeltaFormatError("quantization_config lists no compressed module ('modules')")
        return cls(modules, config.get("format_version", FORMAT_VERSION))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Models whose vLLM module names differ from the checkpoint's (prefix renames)."""
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def sub_matrices(self, prefix: str) -> list[str]:
        """Checkpoint names of the matrices a vLLM layer `prefix` holds (several for a fused layer)."""
        parent, _, last = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(last)
        if not subs:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in subs]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self.sub_matrices(prefix)
        if not any(n in self.modules for n in names):
            return UnquantizedLinearMethod()
        return DeltaCoMeLinearMethod(self, names)


def _load_inner(layer: torch.nn.Module, inner: str, param: Parameter, loaded_weight: torch.Tensor,
                loaded_shard_id=None) -> None:
    """Weight loader of the placeholder `weight:<inner>`: base weights go to vLLM's own loader of the
    dense `weight` (it cuts the rank's slice), delta tensors to the layer's `LayerShards`."""
    if loaded_shard_id is None:
        loaded_shard_id = getattr(loaded_weight, "shard_id", None)
    if inner == "base_weight":
        loader = layer.weight.weight_loader
        if loaded_shard_id is None:
            loader(layer.weight, loaded_weight)
        else:
            loader(layer.weight, loaded_weight, loaded_shard_id)
        return
    layer.deltacome_shards.add(inner, loaded_shard_id, loaded_weight, device=layer.weight.device)


def _load_weight(loader, param: Parameter, loaded_weight: torch.Tensor, *args) -> None:
    """vLLM's loader of the dense `weight`, except for the checkpoint's guard tensor (docs/integrity.md):
    `save_pretrained` stores it under one compressed layer's `<module>.weight` so that a loader that does
    not know the format fails; here it is checked and dropped (its layer's base arrives as
    `weight:base_weight`)."""
    if loaded_weight.dtype == torch.uint8 and loaded_weight.dim() == 1:
        if bytes(loaded_weight.tolist()) != GUARD_TEXT.encode():
            raise DeltaFormatError("a 1-D uint8 tensor stored under a compressed layer's `.weight` is not the "
                                   "deltacome guard tensor: the checkpoint is corrupt")
        return
    loader(param, loaded_weight, *args)


class DeltaCoMeLinearMethod(LinearMethodBase):
    """A vLLM linear layer (maybe fused) whose matrices are stored compressed (module docstring)."""

    def __init__(self, config: DeltaCoMeVllmConfig, names: list[str]):
        self.config = config
        self.names = names

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.pop("weight_loader")
        shards = LayerShards(self.names, self.config.modules, output_partition_sizes, input_size_per_partition,
                             getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1), params_dtype)
        weight = Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                           requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0,
                                  "weight_loader": functools.partial(_load_weight, weight_loader)})
        set_weight_attrs(weight, extra_weight_attrs)
        layer.register_parameter("weight", weight)
        layer.deltacome_shards = shards
        for inner in shards.inner_names:
            placeholder = Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            set_weight_attrs(placeholder, {"weight_loader": functools.partial(_load_inner, layer, inner)})
            layer.register_parameter(f"weight{SEP}{inner}", placeholder)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards: Optional[LayerShards] = getattr(layer, "deltacome_shards", None)
        if shards is None:  # already processed
            return
        weights = shards.local_weights(layer.weight.data)
        for inner in shards.inner_names:
            del layer._parameters[f"weight{SEP}{inner}"]
        layer.deltacome_layout = tuple((s.offset, s.local_out) for s in shards.subs)
        cache = cache_factors()
        cached = []
        for j, w in enumerate(weights):
            factors = w.low_rank_factors() if w is not None and cache else None
            if factors is not None:  # CPU speed option: fp32 factors once, the reference arithmetic per call
                v, ut = factors.dequantize()
                for name, t in (("v", v), ("ut", ut), ("s", factors.s)):
                    layer.register_buffer(f"deltacome_{j}_{name}", t.contiguous(), persistent=False)
            elif w is not None:
                layer.register_parameter(f"deltacome_{j}", Parameter(w, requires_grad=False))
            cached.append(factors is not None)
        layer.deltacome_cached = tuple(cached)
        del layer.deltacome_shards

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        layout = layer.deltacome_layout
        if len(layout) == 1 and not layer.deltacome_cached[0]:
            return torch.nn.functional.linear(x, layer.deltacome_0, bias)
        outs = []
        for j, (offset, size) in enumerate(layout):
            if layer.deltacome_cached[j]:
                # exactly `deltacome::delta_linear`'s reference arithmetic, from the cached fp32 factors
                y = torch.nn.functional.linear(x, layer.weight.narrow(0, offset, size).to(x.dtype)).float()
                delta = low_rank_term(x, getattr(layer, f"deltacome_{j}_v"), getattr(layer, f"deltacome_{j}_ut"),
                                      getattr(layer, f"deltacome_{j}_s"))
                outs.append((y + delta).to(x.dtype))
                continue
            w = getattr(layer, f"deltacome_{j}", None)
            outs.append(torch.nn.functional.linear(x, w if w is not None else layer.weight.narrow(0, offset, size)))
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return y if bias is None else y + bias


def cache_factors() -> bool:
    """`DELTACOME_VLLM_CACHE_FACTORS=1`: keep each rank's factors dequantized (fp32) instead of
    decoding the packed codes at every call — faster on CPU (≈ 1.4× on the zoo model in vLLM,
    docs/vllm.md), for 4·r·(in + out) bytes per matrix. CUDA's kernels read the packed codes directly: leave it off."""
    return os.environ.get("DELTACOME_VLLM_CACHE_FACTORS", "").lower() in ("1", "true", "yes")


def register() -> None:
    """The `vllm.general_plugins` entry point: add quant method "deltacome" (idempotent)."""
    register_quantization_config(QUANT_METHOD)(DeltaCoMeVllmConfig)
