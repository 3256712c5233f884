"""An Optimum-style surface: `DeltaCoMeModelForCausalLM`, the compressed base, and `optimum-cli deltacome`.

    from deltacome_ao.optimum import DeltaCoMeModelForCausalLM

    qmodel = DeltaCoMeModelForCausalLM.quantize(finetuned, base=base, alpha=1 / 16)
    qmodel.generate(input_ids, max_new_tokens=8)     # attribute access, calls and generate reach the model
    qmodel.save_pretrained("ckpt")                   # deltacome_ao.hf.save_pretrained
    qmodel = DeltaCoMeModelForCausalLM.from_pretrained("ckpt")   # AutoModelForCausalLM + our quantizer

The API shape follows optimum-quanto's `QuantizedModelForCausalLM` (a `quantize` classmethod that
converts the model in place and wraps it, `save_pretrained`, `from_pretrained`); the storage is our
`quant_method="deltacome"` checkpoint (`docs/artifact.md`), so a plain
`AutoModelForCausalLM.from_pretrained("ckpt")` loads the same files.

Compressed base (`quantize_base_`, or `quantize(..., base_quantization=Int8WeightOnlyConfig())`):
the delta is computed against the original base (what the fine-tune started from); then the base
weight inside each `MixedPrecisionDeltaTensor` is replaced by a torchao-quantized copy of itself
(`DeltaTensor.with_base`), so `F.linear` runs the base term through torchao's own
linear and only the delta through the kind's own delta term. See `docs/optimum.md`.

`optimum-cli deltacome ...`: `REGISTER_COMMANDS` is what optimum-cli reads from a module in the
`optimum.commands.register` namespace package (see `docs/optimum.md` for how it is installed).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Optional

import torch
from torchao import quantize_

from .compress import compress_, compressed_layers
from .config import DeltaCoMeConfig
from .delta_tensor import is_plain

__all__ = ["DeltaCoMeModelForCausalLM", "quantize_base_", "has_quantized_base", "REGISTER_COMMANDS"]


def quantize_base_(model: torch.nn.Module, base_config: Any = None) -> torch.nn.Module:
    """Quantize, in place, the base weight inside every compressed weight of `model` with the torchao
    config `base_config` (default `Int8WeightOnlyConfig()`); the deltas stay as they are (computed
    against the original base). All or nothing; ValueError if there is nothing to do. Returns `model`."""
    if base_config is None:
        from torchao.quantization import Int8WeightOnlyConfig

        base_config = Int8WeightOnlyConfig()
    layers = [(n, model.get_submodule(n)) for n, w in compressed_layers(model).items() if w.dim() == 2]
    layers = [(n, m) for n, m in layers if isinstance(m, torch.nn.Linear)]  # Conv1D / expert stacks: base stays
    if not layers:
        raise ValueError("the model has no compressed layer; run compress_(model, DeltaCoMeConfig(base=...)) first")
    new = {}
    for name, module in layers:  # quantize every base first: an error leaves the model untouched
        w = module.weight
        if not is_plain(w.base_weight):
            raise ValueError(f"{name}: the base weight is already a {type(w.base_weight).__name__}")
        holder = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(w.base_weight.detach(), requires_grad=False)
        quantize_(holder, copy.deepcopy(base_config))
        if is_plain(holder.weight):
            raise ValueError(f"{type(base_config).__name__} left {name}'s base weight unquantized")
        new[name] = w.with_base(holder.weight.detach())
    for name, module in layers:
        module.weight = torch.nn.Parameter(new[name], requires_grad=False)
    return model


def has_quantized_base(model: torch.nn.Module) -> bool:
    return any(not is_plain(w.base_weight) for w in compressed_layers(model).values())


class DeltaCoMeModelForCausalLM:
    """A causal LM whose linear layers hold Delta-CoMe compressed weights, optimum-quanto style.

    Attribute access, `__call__`, `forward` and `generate` go to the wrapped transformers model
    (`.model` would be the model's own submodule, so the wrapped model is `wrapped`)."""

    def __init__(self, model: torch.nn.Module, config: Optional[DeltaCoMeConfig] = None):
        object.__setattr__(self, "_wrapped", model)
        object.__setattr__(self, "_config", config)

    @property
    def wrapped(self) -> torch.nn.Module:
        return self._wrapped

    @classmethod
    def quantize(
        cls,
        model: torch.nn.Module,
        base: Any = None,
        alpha: float = 1 / 16,
        base_quantization: Any = None,
        **config,
    ) -> "DeltaCoMeModelForCausalLM":
        """Compress `model` (the fine-tuned one, converted in place) against `base` and wrap it.

        `**config`: any other `DeltaCoMeConfig` field (`method`, `group_size`, `allocation`,
        `calibration`, ...). `base_quantization`: a torchao config (e.g. `Int8WeightOnlyConfig()`)
        applied afterwards to the base term of every layer (`quantize_base_`)."""
        if isinstance(model, cls):
            raise ValueError("the model is already a DeltaCoMeModelForCausalLM; quantize the original fine-tuned model")
        if base is None:
            raise ValueError("quantize needs base=: the model the fine-tune started from (module, state dict or directory)")
        cfg = DeltaCoMeConfig(base=base, alpha=alpha, **config)
        with torch.no_grad():
            compress_(model, cfg)
            if base_quantization is not None:
                quantize_base_(model, base_quantization)
        return cls(model, cfg)

    def save_pretrained(self, save_directory, **kwargs):
        """Write a standalone `quant_method="deltacome"` checkpoint (`deltacome_ao.hf.save_pretrained`)."""
        if has_quantized_base(self._wrapped):
            raise NotImplementedError(
                "saving a model whose base weights are torchao-quantized is not supported: the deltacome "
                "checkpoint stores plain base weights; save before quantize_base_ (or without base_quantization) "
                "and apply quantize_base_ after loading"
            )
        from .hf import save_pretrained

        return save_pretrained(self._wrapped, save_directory, config=self._config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DeltaCoMeModelForCausalLM":
        """Load a checkpoint written by `save_pretrained` (transformers' `AutoModelForCausalLM`, with
        our registered quantizer); refuses checkpoints that are not deltacome-compressed."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from . import hf  # noqa: F401  (registers quant_method "deltacome")

        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path)
        qc = getattr(config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method != hf.QUANT_METHOD:
            raise ValueError(
                f"{pretrained_model_name_or_path}: not a deltacome checkpoint (quantization_config.quant_method "
                f"{method!r}); write one with DeltaCoMeModelForCausalLM.save_pretrained"
            )
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        return cls(model.eval())

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._wrapped.forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._wrapped.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def __setattr__(self, name, value):
        setattr(self._wrapped, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._wrapped!r})"


# --- optimum-cli --------------------------------------------------------------------------------------


def _cli_command():
    from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

    class DeltaCoMeCommand(BaseOptimumCLICommand):
        """`optimum-cli deltacome ARGS...` == `deltacome ARGS...` (`deltacome_ao.cli`)."""

        COMMAND = CommandInfo(name="deltacome", help="Delta-CoMe delta compression (the `deltacome` command)")

        @staticmethod
        def parse_args(parser: argparse.ArgumentParser):
            parser.description = "Runs `deltacome ARGS...`: compress / inspect / eval / merge (docs/cli.md)."
            parser.epilog = "See `optimum-cli deltacome COMMAND --help` for each command."
            parser.add_argument("deltacome_args", nargs=argparse.REMAINDER, metavar="COMMAND ...")

        def run(self):
            from .cli import main

            main.main(args=list(self.args.deltacome_args), prog_name="optimum-cli deltacome")

    return DeltaCoMeCommand


try:
    DeltaCoMeCommand = _cli_command()
    REGISTER_COMMANDS = [DeltaCoMeCommand]
except ImportError:  # optimum is not installed: no optimum-cli plugin
    DeltaCoMeCommand = None
    REGISTER_COMMANDS = []
