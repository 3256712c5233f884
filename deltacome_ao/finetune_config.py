"""A fine-tune's own config on a base model: the fields that differ are applied, not just warned about.

A delta artifact stores the fine-tuned model's config (`delta_config.json` "model_config"). A
fine-tune may change fields without changing any shape — RoPE scaling (`rope_parameters`), the norm
epsilon, logit soft-capping, the activation, a sliding window — and then the base's values would give
other outputs than the fine-tune's. Such fields are mostly read when the modules are built (RoPE
frequencies are a buffer computed in `__init__`, the epsilon and scaling are plain attributes), so
setting them on the config is not enough. `apply_finetune_config` rebuilds the module tree from the
fine-tune's config with every parameter on the meta device (cheap: no weight is allocated, buffers
such as the RoPE frequencies are computed for real) and moves the rebuilt modules' derived state —
plain attributes, non-persistent buffers, parameter-free submodules such as activations — onto the
model in place. The weights are untouched. What cannot be applied is refused before anything changes:
a field that changes the structure (a parameter's shape, a module's class, tied embeddings).

Fields that change no output (`NEUTRAL`: special token ids, output flags, ...) are set on the config
without a rebuild. `MultiDeltaModel` cannot give one batch row another config than the others, so it
refuses a delta whose config differs in any other field (`differing_fields`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Mapping, Optional

import torch

from .checkpoint import few
from .format import model_config

__all__ = ["NEUTRAL", "differing_fields", "apply_finetune_config", "ConfigMismatchError"]

# Config fields that change no logits: generation bookkeeping, output flags, labels, init-only values.
NEUTRAL = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "task_specific_params",
    "problem_type", "tokenizer_class", "prefix", "finetuning_task", "initializer_range", "chunk_size_feed_forward",
    "is_encoder_decoder", "tf_legacy_loss", "torchscript", "pruned_heads", "_name_or_path",
})
_STRUCTURAL = frozenset({"tie_word_embeddings", "model_type"})
_MODULE_STATE = frozenset(torch.nn.Module().__dict__) | {"training"}


class ConfigMismatchError(ValueError):
    """The fine-tune's config differs from the base's in a way that cannot be applied to the base model."""


def differing_fields(model: torch.nn.Module, stored: Optional[Mapping]) -> dict[str, tuple[Any, Any]]:
    """{field: (base value, fine-tune value)} of the config fields (`format.model_config`) that differ."""
    current = model_config(getattr(model, "config", None))
    if stored is None or current is None:
        return {}
    missing = object()
    out = {}
    for key in sorted(set(stored) | set(current)):
        a, b = current.get(key, missing), stored.get(key, missing)
        if b is missing:
            continue  # a field the fine-tune's transformers did not write: nothing to apply
        if a != b:
            out[key] = (None if a is missing else a, b)
    return out


def _set_fields(config, stored: Mapping, keys) -> None:
    """Set `keys` of `stored` on `config` (a transformers config), recursing into sub-configs."""
    from transformers import PretrainedConfig

    for key in keys:
        value = stored[key]
        current = getattr(config, key, None)
        if isinstance(current, PretrainedConfig) and isinstance(value, Mapping):
            sub = model_config(current) or {}
            _set_fields(current, value, [k for k in value if sub.get(k) != value[k]])
        else:
            setattr(config, key, copy.deepcopy(value))


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with every parameter on the meta device and every buffer for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _stateless(module: torch.nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(
        n not in m._non_persistent_buffers_set for m in module.modules() for n in m._buffers)


def _simple(v) -> bool:  # noqa: D103
    if isinstance(v, (bool, int, float, str, type(None))):
        return True
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return False


def _differs(a, b) -> bool:
    from transformers import PretrainedConfig

    if isinstance(a, PretrainedConfig) or isinstance(b, PretrainedConfig):
        return isinstance(a, PretrainedConfig) and isinstance(b, PretrainedConfig) and a.to_dict() != b.to_dict()
    if _simple(a) and _simple(b):
        return a != b
    if callable(a) and callable(b) and not isinstance(a, torch.nn.Module):
        return getattr(a, "__name__", None) != getattr(b, "__name__", None)
    return False


def _plan(model: torch.nn.Module, a: torch.nn.Module, b: torch.nn.Module, name: str, steps: list, problems: list) -> None:
    """What moves onto `model` from `b` (built from the fine-tune's config): what differs between `a`
    (built from the base's config) and `b`, at the same place of the three trees."""
    where = name or "model"
    if type(a) is not type(b) or type(model) is not type(a):
        if _stateless(a) and _stateless(b) and _stateless(model):
            steps.append(("module", model, name, b))
        else:
            problems.append(f"{where}: {type(a).__name__} becomes {type(b).__name__}")
        return
    shapes = [{k: tuple(v.shape) for k, v in m.named_parameters(recurse=False)} for m in (model, a, b)]
    if not shapes[0] == shapes[1] == shapes[2]:
        problems.append(f"{where}: parameters {shapes[1]} become {shapes[2]}")
        return
    for key, value in b.__dict__.items():
        if key not in _MODULE_STATE and key in a.__dict__ and _differs(a.__dict__[key], value):
            steps.append(("attr", model, key, value))
    for key in b._non_persistent_buffers_set:
        va, vb = a._buffers.get(key), b._buffers.get(key)
        if vb is not None and (va is None or va.shape != vb.shape or not torch.equal(va, vb)):
            steps.append(("buffer", model, key, vb))
    if not set(model._modules) == set(a._modules) == set(b._modules):
        problems.append(f"{where}: submodules {sorted(a._modules)} become {sorted(b._modules)}")
        return
    for key, child in b._modules.items():
        if child is None or a._modules[key] is None or model._modules[key] is None:
            continue
        _plan(model._modules[key], a._modules[key], child, f"{name}.{key}" if name else key, steps, problems)


def apply_finetune_config(model: torch.nn.Module, stored: Optional[Mapping], where: str = "") -> Callable[[], None]:
    """Check that the fine-tune's config `stored` (a `format.model_config` dict) can be applied to
    `model` and return the function that applies it (in place; call it once the load cannot fail any
    more). Raises `ConfigMismatchError` naming the fields and what they would change when it cannot."""
    differ = differing_fields(model, stored)
    if not differ:
        return lambda: None
    prefix = f"{where}: " if where else ""
    structural = sorted(set(differ) & _STRUCTURAL)
    if structural:
        raise ConfigMismatchError(
            f"{prefix}the fine-tune's config differs from the base's in {few(structural)}, which changes the model's "
            f"structure; load the delta onto a base of the fine-tune's architecture"
        )
    config = copy.deepcopy(model.config)
    try:
        _set_fields(config, stored, differ)
    except Exception as e:  # a value the config class refuses (transformers' strict config fields)
        raise ConfigMismatchError(f"{prefix}the fine-tune's config has a value the model's config refuses "
                                  f"({few(differ)}): {type(e).__name__}: {e}") from None
    if set(differ) <= NEUTRAL:
        return lambda: setattr(model, "config", config) if hasattr(model, "config") else None
    try:
        with _parameters_on_meta(), torch.device("cpu"):
            as_base = type(model)(copy.deepcopy(model.config))
            as_finetune = type(model)(config)
    except Exception as e:  # a config transformers refuses to build a model from
        raise ConfigMismatchError(f"{prefix}cannot build the model from the fine-tune's config ({few(differ)}): {e}") from None
    steps, problems = [], []
    _plan(model, as_base, as_finetune, "", steps, problems)
    if problems:
        raise ConfigMismatchError(
            f"{prefix}the fine-tune's config differs from the base's in {few(differ)}, which changes the model's "
            f"structure ({few(problems, 2)}); load the delta onto a base of the fine-tune's architecture"
        )

    def apply():
        for kind, owner, key, value in steps:
            if kind == "attr":
                owner.__dict__[key] = value
            elif kind == "buffer":
                old = owner._buffers.get(key)
                owner._buffers[key] = value if old is None else value.to(device=old.device, dtype=old.dtype)
            else:  # a parameter-free submodule (an activation, a rotary embedding of another class)
                parent, _, leaf = key.rpartition(".")
                holder = model.get_submodule(parent) if parent else model
                device = next((b.device for b in owner.buffers()), None)
                holder._modules[leaf] = value.to(device) if device is not None else value
        model.__dict__["config"] = config

    return apply
