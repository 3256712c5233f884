"""`compress_(model, config)`: replace a fine-tuned model's weights by base + compressed delta.

The core entry point (torchao's `quantize_(model, DeltaCoMeConfig(...))` is a shortcut to it, see
`config.py`). It plans while holding the whole model, because delta compression needs every
module's name (to find the matching base weight) and must be all-or-nothing: `plan_compression`
checks the pair and compresses every selected layer without touching the model, and only then are
the new weights swapped in. Any error leaves the model exactly as it was.

What gets a compressed delta is decided by what the weights are, not by their names
(`matmul_layers`): every weight used as a matrix multiply —

    linear    an `nn.Linear` weight (out, in), subclasses included (Falcon's `x @ W.T` layers)
    conv1d    a transformers `Conv1D` weight, stored (in, out) (GPT-2): the (out, in) matrix is
              compressed and the stored weight is its transposed view
    experts   a stacked expert parameter (E, out, in) of a mixture-of-experts layer (transformers 5's
              `experts.gate_up_proj` / `down_proj`): one delta per expert, stacked into one weight
              (`DeltaTensor.stack`) served with one grouped call per layer
    embedding an `nn.Embedding` table (only with `DeltaCoMeConfig(embeddings=True)`)

— except the input and output embeddings (kept as the fine-tune has them, as in the paper, unless
`embeddings=True`). A recipe (`recipes/`) can narrow the selection by name. What is left uncompressed,
and why, is recorded (`coverage_report`).

A compressed layer is named by its module for a 2-D weight (`<module>.weight`, as before) and by its
parameter's full name for a stack of experts (`format.layer_key`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .budget import plan_global
from .calibrate import calibrated_weights
from .checkpoint import BaseWeights, check_pair, unaliased
from .delta_tensor import DeltaTensor
from .format import layer_key, method_fields
from .methods import handing_over_base
from .methods.mixed_precision import BudgetTooSmallError
from .recipes import recipe_for
from .self_calibration import as_self_calibration, self_calibration_samples

__all__ = ["compress_", "plan_compression", "resolve_calibration", "select_layers", "walk_modules", "compressed_layers", "delta_report",
           "Layer", "matmul_layers", "compress_layer", "coverage_report", "uncompressed_reason", "coverage_summary",
           "on_compressed", "notify_compressed", "REASONS", "skipped_by_selection", "swap_in", "record_skipped",
           "config_fields", "is_conv1d"]

# Why a changed tensor keeps the fine-tuned values (coverage_report / delta_config.json "coverage").
REASONS = {
    "embedding": "input / position embedding (kept as in the paper; DeltaCoMeConfig(embeddings=True) compresses it)",
    "lm_head": "output embedding (kept as in the paper; DeltaCoMeConfig(embeddings=True) compresses it)",
    "norm": "normalisation scale (1-D)",
    "bias": "bias (1-D)",
    "router": "MoE router (not an nn.Linear: routing is kept exact)",
    "convolution": "convolution kernel (not a matmul)",
    "vector": "a 1-D parameter (e.g. CLIP's class embedding)",
    "buffer": "buffer",
    "recipe": "a matmul weight the recipe does not select",
    "filter": "a matmul weight filter_fn excludes",
    "budget": "alpha leaves no room for one singular vector of this matrix",
    "unstackable": "stacked experts of a method that cannot stack them (DeltaTensor.stack)",
    "experts_layout": ("flattened stacked experts: a 2-D (E·rows, cols) parameter viewed per expert in the forward "
                       "(DBRX's experts.mlp.w1 / v1 / w2); this layout is not supported yet, kept dense"),
    "other": "not a matmul weight",
}


@dataclass(frozen=True)
class Layer:
    """One weight that gets a compressed delta: `name` (the layer's name, `format.layer_key`), the module
    holding it, the parameter's name there, and its form ("linear", "conv1d", "experts", "embedding")."""

    name: str
    module: torch.nn.Module
    param: str = "weight"
    form: str = "linear"

    @property
    def key(self) -> str:
        """The state-dict key of the weight."""
        return layer_key(self.name, 3 if self.form == "experts" else 2) if self.name else self.param

    @property
    def in_out(self) -> bool:
        """The weight is stored (in, out) (Conv1D, transposed expert stacks)."""
        return self.form == "conv1d" or (self.form == "experts" and bool(getattr(self.module, "is_transposed", False)))


def is_conv1d(module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def _expert_params(module) -> list[str]:
    """The stacked expert parameters (E, a, b) of a mixture-of-experts module (E = `num_experts`)."""
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == experts]


def _layers_of(module: torch.nn.Module, name: str, embeddings: bool) -> list[Layer]:
    if isinstance(module, torch.nn.Linear):
        return [Layer(name, module, "weight", "linear")]
    if is_conv1d(module):
        return [Layer(name, module, "weight", "conv1d")]
    if isinstance(module, torch.nn.Embedding) and embeddings:
        return [Layer(name, module, "weight", "embedding")]
    return [Layer(f"{name}.{p}" if name else p, module, p, "experts") for p in _expert_params(module)]


def _holds_matmul(module: torch.nn.Module, name: str = "") -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or is_conv1d(module) or bool(_expert_params(module))


def _default_filter(module: torch.nn.Module, name: str) -> bool:
    return _holds_matmul(module, name)


def walk_modules(root: torch.nn.Module, filter_fn: Callable) -> list[tuple[str, torch.nn.Module]]:
    """The modules `filter_fn(module, name)` selects, in module order, not descending into a match
    (torchao's walk)."""
    out = []

    def visit(module, name):
        if filter_fn(module, name):
            out.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, "")
    return out


def _output_embedding(root: torch.nn.Module):
    get = getattr(root, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _is_embedding_layer(root, layer: Layer) -> bool:
    """An input/position embedding table or the output embedding (lm_head)."""
    return (isinstance(layer.module, torch.nn.Embedding) or layer.module is _output_embedding(root)
            or layer.name.rpartition(".")[2] == "lm_head")


def matmul_layers(root: torch.nn.Module, filter_fn: Optional[Callable] = None, embeddings: bool = False) -> list[Layer]:
    """Every weight of `root` used as a matrix multiply, in module order (see the module docstring),
    among the modules `filter_fn(module, name)` selects (default: all); the input and output embeddings
    only with `embeddings`. A parameter shared by several modules (tied weights) is listed once."""
    seen, out = set(), []
    for name, module in walk_modules(root, filter_fn or _default_filter):
        for layer in _layers_of(module, name, True):
            p = getattr(module, layer.param)
            if id(p) in seen or (not embeddings and _is_embedding_layer(root, layer)):
                continue
            seen.add(id(p))
            out.append(layer)
    return out


def _as_layer(target) -> Layer:
    if isinstance(target, Layer):
        return target
    name, module = target
    layers = _layers_of(module, name, True)
    if len(layers) != 1:
        raise ValueError(f"{name or 'module'} ({type(module).__name__}) holds {len(layers)} matmul weights; "
                         f"pass Layer objects (compress.matmul_layers)")
    return layers[0]


def select_layers(root: torch.nn.Module, config: Any, filter_fn: Optional[Callable] = None) -> list[Layer]:
    """The layers `compress_` compresses: the matmul weights (`matmul_layers`) of the modules `filter_fn`
    selects that the recipe selects (`config.recipe`, else by `config.model_type`), or the root itself
    when it is the only match (a bare linear layer). ValueError if none."""
    embeddings = bool(getattr(config, "embeddings", False))
    visited = walk_modules(root, filter_fn or _default_filter)
    if len(visited) == 1 and visited[0][0] == "" and _layers_of(root, "", True):
        return [_as_layer(("", root))]
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    recipe = config.recipe or recipe_for(model_type)
    candidates = matmul_layers(root, filter_fn, embeddings)
    targets = [layer for layer in candidates if recipe.selects(layer.name)]
    if not candidates:
        first = f"{visited[0][0]!r} ({type(visited[0][1]).__name__})" if visited else "none"
        raise ValueError(
            f"the filter selects no matmul weight (first module it selects: {first}); the walk does not "
            f"descend into a module the filter selects (torchao's rule), so select the layers themselves, "
            f"e.g. filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and 'mlp' in name"
        )
    if not targets:
        first = visited[0][0] if visited else None
        raise ValueError(
            f"recipe {recipe.name!r} selects none of the {len(candidates)} matmul weights the filter visits "
            f"(first module: {first!r}); pass recipe= for this model"
        )
    return targets


def skipped_by_selection(root, config, filter_fn, targets: list[Layer]) -> dict[str, str]:
    """{state-dict key: reason} of the matmul weights `select_layers` left out."""
    chosen = {t.key for t in targets}
    everything = matmul_layers(root, None, bool(getattr(config, "embeddings", False)))
    filtered = {t.key for t in matmul_layers(root, filter_fn, bool(getattr(config, "embeddings", False)))}
    return {layer.key: ("recipe" if layer.key in filtered else "filter") for layer in everything if layer.key not in chosen}


# --- compressing one layer ---------------------------------------------------------------------------


def compress_layer(layer: Layer, finetuned: torch.Tensor, base: torch.Tensor, config: Any,
                   hessian: Optional[torch.Tensor] = None) -> DeltaTensor:
    """The compressed weight of one layer from its fine-tuned and base tensors (as the module stores
    them). Conv1D and (E, in, out) stacks are compressed in the (out, in) orientation and returned as
    the transposed view; a stack is compressed expert by expert and stacked. Raises
    `NotImplementedError` when the method's kind cannot transpose or stack."""
    name = layer.name or "weight"
    if layer.form == "experts":
        mats_ft = finetuned.transpose(-2, -1) if layer.in_out else finetuned
        mats_base = base.transpose(-2, -1) if layer.in_out else base
        each = handing_over_base(config)  # `stack` copies the experts' base weights into one tensor
        weights = [each.compress(mats_ft[e], mats_base[e].contiguous(), f"{name}[{e}]")
                   for e in range(finetuned.shape[0])]
        stacked = type(weights[0]).stack(weights)
        return (stacked.transposed() if layer.in_out else stacked).with_contiguous_parts()
    if layer.form == "conv1d":
        base_t = base.t()
        base_in = base_t.contiguous()
        # a fresh (out, in) copy needs no second one inside the compressed weight
        w = (handing_over_base(config) if base_in is not base_t else config).compress(
            finetuned.t(), base_in, name, hessian=hessian)
        return w.transposed().with_contiguous_parts()
    return config.compress(finetuned, base, name, hessian=hessian)


def resolve_calibration(root: torch.nn.Module, config: Any) -> Any:
    """`config`, or a copy whose `calibration` holds the sequences a "self" / "base" / `SelfCalibration`
    calibration samples from `root` (the fine-tuned model) or from the base weights."""
    spec = as_self_calibration(getattr(config, "calibration", None))
    if spec is None:
        return config
    samples = self_calibration_samples(root, spec, config.base)
    resolved = copy.copy(config)
    object.__setattr__(resolved, "calibration", samples)
    return resolved


def plan_compression(root: torch.nn.Module, config: Any, targets: Iterable, device: Any = None,
                     skipped: Optional[dict] = None, plan: Optional[dict] = None) -> dict[int, dict[str, DeltaTensor]]:
    """Compress every target of `root` without touching it -> {id(module): {param: compressed weight}}.

    `targets`: `Layer`s (or (name, module) pairs of single-weight modules), e.g. from `select_layers`.
    `device`: where the compression runs and the weights end up (default: each weight's own device).
    `skipped`: filled with {state-dict key: reason} of targets left dense — a matrix too small for one
    singular vector at this alpha (when others are not: if every target is, the error is raised), or
    stacked experts of a method that cannot stack them.
    `plan`: with allocation "global", filled with {"plan": `budget.GlobalPlan`} (the model-level plan,
    made first over every target). A "self" calibration is sampled from `root` first.
    Raises `CheckpointMismatchError` (base and fine-tune differ in architecture) or ValueError.
    """
    if device is not None and torch.device(device).type == "meta":
        raise ValueError("device='meta': compression needs the weights' values (an SVD of each delta); pass a "
                         "real device (e.g. 'cpu', 'cuda'), or None to compress where the weights are")
    targets = [_as_layer(t) for t in targets]
    for layer in targets:
        if isinstance(getattr(layer.module, layer.param), DeltaTensor):
            raise ValueError(f"{layer.name or 'module'}: the weight is already a "
                             f"{type(getattr(layer.module, layer.param)).__name__}; compress the original fine-tuned model")
    keys = [layer.key for layer in targets]
    shapes = {k: tuple(v.shape) for k, v in root.state_dict().items()}
    check_pair(config.base, shapes, keys, model_type=getattr(getattr(root, "config", None), "model_type", None))
    skipped = {} if skipped is None else skipped
    errors: list = []

    def compress_or_skip(layer, finetuned, base, config, hessian=None):
        """`compress_layer`, or None (the layer stays dense, the reason recorded)."""
        try:
            return compress_layer(layer, finetuned, base, config, hessian=hessian)
        except BudgetTooSmallError as e:
            errors.append(e)
            skipped[layer.key] = "budget"
        except NotImplementedError:
            if layer.form != "experts":
                raise
            skipped[layer.key] = "unstackable"
        return None

    config = resolve_calibration(root, config)
    if config.allocation == "global":
        config, made = plan_global(root, targets, config, device, calibration=config.calibration,
                                   sensitivity=config.global_sensitivity, cap=config.global_cap)
        if plan is not None:
            plan["plan"] = made
    if config.calibration is not None:
        weights = calibrated_weights(root, targets, config, compress_or_skip)
    else:
        weights = {}
        bar = tqdm(targets, desc=f"{config.method} delta", disable=not config.progress, unit="layer")
        for layer in bar:
            finetuned = getattr(layer.module, layer.param).detach()
            if device is not None:
                finetuned = finetuned.to(device)
            stored = config.base[layer.key]
            base = stored.to(device=finetuned.device, dtype=finetuned.dtype)
            # the compressed weight copies the caller's base tensor (the caller may change it later),
            # but may hold a cast made here as it is
            weights[(id(layer.module), layer.param)] = compress_or_skip(
                layer, finetuned, base, handing_over_base(config) if base is not stored else config)
    weights = {k: w for k, w in weights.items() if w is not None}
    if errors and not weights:
        raise errors[0]
    out: dict[int, dict[str, DeltaTensor]] = {}
    for (module_id, param), w in weights.items():
        out.setdefault(module_id, {})[param] = w.to(device) if device is not None else w
    return out


# --- after compression: hooks (the HF integration attaches its save_pretrained support) -------------------

_HOOKS: list[Callable] = []


def on_compressed(fn: Callable) -> Callable:
    """Register `fn(model, fields)`, called on every model `compress_`, `quantize_` or `load_delta` leaves
    with compressed weights (`fields`: method, alpha, ... when known). `deltacome_ao.hf` registers the one
    that makes `model.save_pretrained(dir)` write a loadable checkpoint."""
    if fn not in _HOOKS:
        _HOOKS.append(fn)
    return fn


def notify_compressed(model: torch.nn.Module, fields: Optional[Mapping] = None) -> None:
    for fn in list(_HOOKS):
        fn(model, dict(fields or {}))


def compress_(model: torch.nn.Module, config: Any, filter_fn: Optional[Callable] = None,
              device: Any = None) -> torch.nn.Module:
    """Compress the delta of every selected matmul weight of `model` against `config.base`, in place.

    model: the fine-tuned model (an HF causal LM, any module tree, or a bare `nn.Linear`).
    config: a `DeltaCoMeConfig` (base, alpha, method, recipe, calibration, embeddings, ...).
    filter_fn: `(module, name) -> bool` narrowing the candidates (default every module holding a matmul
        weight: `nn.Linear`, `Conv1D`, stacked experts).
    device: run the compression there and leave the model there (as torchao's `quantize_`).

    All or nothing: on any error the model is unchanged. What was left uncompressed and why:
    `coverage_report(model, base)`. Returns `model`.
    """
    targets = select_layers(model, config, filter_fn)
    skipped = skipped_by_selection(model, config, filter_fn, targets)
    plan: dict = {}
    weights = plan_compression(model, config, targets, device, skipped, plan)
    if device is not None:
        model.to(device)
    swap_in(model, weights)
    record_skipped(model, skipped)
    if plan:
        object.__setattr__(model, "deltacome_plan", plan["plan"])  # the global allocation's plan, for reports
    notify_compressed(model, config_fields(config))
    return model


def swap_in(model: torch.nn.Module, weights: Mapping[int, Mapping[str, DeltaTensor]]) -> None:
    """Put planned weights ({id(module): {param: weight}}) into `model`'s modules; a parameter shared
    with other modules (tied weights) is replaced there too, so the tie holds."""
    replaced = {}  # id(old parameter) -> (old parameter, kept alive so that its id is not reused, new one)
    for module in list(model.modules()):
        for param, w in weights.get(id(module), {}).items():
            old = module._parameters[param]
            replaced[id(old)] = (old, torch.nn.Parameter(w, requires_grad=False))
    for module in model.modules():
        for param, p in list(module._parameters.items()):
            if p is not None and id(p) in replaced and replaced[id(p)][0] is p:
                module._parameters[param] = replaced[id(p)][1]


def record_skipped(model: torch.nn.Module, skipped: Mapping[str, str]) -> None:
    """Remember why matmul weights were left dense (read by `coverage_report` and `save_delta`)."""
    object.__setattr__(model, "deltacome_skipped", dict(skipped))


def config_fields(config: Any) -> dict:
    """How `config` compressed a model, for the `on_compressed` hooks: the fields an artifact records
    (`format.method_fields`: method, alpha, ..., calibration, global_allocation); {} without a config."""
    if config is None:
        return {}
    return method_fields(config)


def compressed_layers(model: torch.nn.Module) -> dict[str, DeltaTensor]:
    """{layer name: compressed weight} of every parameter that is a `DeltaTensor`: the module's name for
    a 2-D `weight`, the parameter's full name for a stack of experts (`format.layer_key`). A weight shared
    by several modules (tied) is listed under its first module."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        for param, w in module._parameters.items():
            if not isinstance(w, DeltaTensor) or id(w) in seen:
                continue
            seen.add(id(w))
            if w.dim() == 3:
                out[f"{name}.{param}" if name else param] = w
            elif param == "weight":
                out[name] = w
    return out


def delta_report(model: torch.nn.Module, base: Any = None) -> list[dict]:
    """Per compressed layer: name, shape, kind (tensor class), structure (`describe()`, e.g. the
    bands "8b×2 3b×32 2b×20"), bands as [[bits, count], ...] when the kind has bands, delta bytes,
    bits per parameter, `"compressed": True`.

    With `base` (the model the fine-tune started from), also one row per tensor the fine-tune changed
    that is *not* compressed: name, shape, `"compressed": False`, `reason` (`REASONS`), `params` and
    `kept_bytes` (what it costs the artifact). The compressed share: `coverage_report(model, base)`."""
    rows = []
    for name, w in compressed_layers(model).items():
        bands = getattr(w, "bands", None)
        rows.append({
            "name": name,
            "shape": list(w.shape),
            "tensor": type(w).__name__,
            "structure": w.describe(),
            "bands": [[b.bits, b.count] for b in bands] if bands is not None else None,
            "delta_bytes": w.delta_nbytes(),
            "bits_per_param": w.bits_per_param(),
            "compressed": True,
        })
    if base is not None:
        state = model.state_dict(keep_vars=True)
        for key, entry in coverage_report(model, base)["uncompressed"].items():
            t = state.get(key)
            rows.append({
                "name": key, "shape": list(t.shape) if t is not None else None, "tensor": None,
                "structure": f"dense ({entry['reason']})", "bands": None, "delta_bytes": 0, "bits_per_param": None,
                "compressed": False, "reason": entry["reason"], "params": entry["params"],
                "kept_bytes": t.numel() * t.element_size() if t is not None else None,
            })
    return rows


# --- coverage: what a fine-tune changed, and what of it is compressed ---------------------------------------


def uncompressed_reason(root: torch.nn.Module, key: str, skipped: Optional[Mapping[str, str]] = None) -> str:
    """Why the tensor `key` of `root` keeps its fine-tuned values (a key of `REASONS`)."""
    if skipped and key in skipped:
        return skipped[key]
    owner_name, _, leaf = key.rpartition(".")
    try:
        owner = root.get_submodule(owner_name) if owner_name else root
    except AttributeError:
        return "other"
    if leaf in owner._buffers:
        return "buffer"
    if isinstance(owner, torch.nn.Embedding):
        return "embedding"
    if owner is _output_embedding(root) or owner_name.rpartition(".")[2] == "lm_head":
        return "lm_head"
    t = owner._parameters.get(leaf)
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if isinstance(owner, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "convolution"
    if t is not None and t.dim() <= 1 and "norm" in (type(owner).__name__ + owner_name).lower():
        return "norm"
    if _layers_of(owner, owner_name, True):
        return "recipe"
    if t is not None and t.dim() == 2 and ("router" in type(owner).__name__.lower() or owner_name.endswith("gate")):
        return "router"
    if t is not None and t.dim() <= 1:
        return "vector"
    if t is not None and t.dim() == 2 and _flattened_experts(root, owner_name, t):
        return "experts_layout"
    return "other"


_EXPERT_COUNTS = ("num_experts", "moe_num_experts", "num_local_experts", "n_routed_experts")


def _flattened_experts(root: torch.nn.Module, owner_name: str, t: torch.Tensor) -> bool:
    """A 2-D parameter that stacks E experts along its first dimension, (E·rows, cols), of a module (or
    its parent) that declares E experts: DBRX's `ffn.experts.mlp.w1` (E·ffn, hidden)."""
    names = [owner_name, owner_name.rpartition(".")[0]] if owner_name else [""]
    for name in names:
        try:
            module = root.get_submodule(name) if name else root
        except AttributeError:
            continue
        for attr in _EXPERT_COUNTS:
            e = getattr(module, attr, None)
            if isinstance(e, int) and not isinstance(e, bool) and e > 1 and t.shape[0] % e == 0 and t.shape[0] > e:
                return True
    return False


def coverage_summary(changed: Mapping[str, int], compressed: Mapping[str, int], reasons: Mapping[str, str],
                     embedding_keys: Iterable[str] = ()) -> dict:
    """The coverage document: `changed` {key: params} of every tensor the fine-tune changed (compressed
    ones included), `compressed` {key: params} of the compressed ones, `reasons` {key: reason} of the rest,
    `embedding_keys` the input / output embeddings (reported apart: the share excludes them)."""
    embedding_keys = set(embedding_keys) | {k for k, r in reasons.items() if r in ("embedding", "lm_head")}
    total = sum(changed.values())
    done = sum(compressed.values())
    outside = sum(n for k, n in changed.items() if k not in embedding_keys)
    done_outside = sum(n for k, n in compressed.items() if k not in embedding_keys)
    uncompressed = {k: {"params": int(changed[k]), "reason": reasons.get(k, "other")}
                    for k in changed if k not in compressed}
    by_reason: dict[str, int] = {}
    for entry in uncompressed.values():
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + entry["params"]
    return {
        "changed_params": int(total),
        "compressed_params": int(done),
        "share": done / total if total else 1.0,
        "embedding_params": int(sum(n for k, n in changed.items() if k in embedding_keys)),
        "embedding_params_compressed": int(sum(n for k, n in compressed.items() if k in embedding_keys)),
        "share_outside_embeddings": done_outside / outside if outside else 1.0,
        "uncompressed_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "uncompressed": uncompressed,
    }


def coverage_report(model: torch.nn.Module, base: Any) -> dict:
    """Which tensors the fine-tune changed (against `base`: `nn.Module`, state dict or safetensors
    directory), which of them are compressed, and why the others are not (`REASONS`): see
    `coverage_summary` for the fields (`share_outside_embeddings` is the headline number)."""
    weights = base if isinstance(base, BaseWeights) else BaseWeights(base)
    layers = compressed_layers(model)
    keys = {layer_key(n, w.dim()): w for n, w in layers.items()}
    state, _ = unaliased(model.state_dict(keep_vars=True).items())
    state = {k: v for k, v in state.items() if k not in keys}
    changed = {k: w.numel() for k, w in keys.items()}
    for key, value in state.items():
        if key not in weights:
            changed[key] = value.numel()
            continue
        b = weights[key]
        if tuple(b.shape) != tuple(value.shape) or not torch.equal(b.to(value.dtype), value.detach()):
            changed[key] = value.numel()
    skipped = getattr(model, "deltacome_skipped", None)
    reasons = {k: uncompressed_reason(model, k, skipped) for k in changed if k not in keys}
    embedding_keys = {k for k, w in keys.items() if _is_embedding_key(model, k)}
    return coverage_summary(changed, {k: w.numel() for k, w in keys.items()}, reasons, embedding_keys)


def _is_embedding_key(root, key: str) -> bool:
    owner_name = key.rpartition(".")[0]
    try:
        owner = root.get_submodule(owner_name) if owner_name else root
    except AttributeError:
        return False
    return isinstance(owner, torch.nn.Embedding) or owner is _output_embedding(root) or owner_name.endswith("lm_head")
