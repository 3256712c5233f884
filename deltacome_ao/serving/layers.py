"""Multi-delta layers: one base module, many deltas, each batch row routed to its own.

`MultiDeltaLinear` replaces an `nn.Linear` (subclasses included) or a transformers `Conv1D` (whose
weight is stored (in, out)): it holds the base weight (and bias) once and a registry of deltas. Its forward computes `x W_baseᵀ` for every row in one matmul, then adds each active
delta's term on its rows: deltas stored as packed low-rank factors go through one
`deltacome::segmented_delta_linear` call for all of them (Punica SGMV / vLLM multi-LoRA style; the
Triton kernel on CUDA), other kinds through their own `DeltaTensor.delta_term`. `MultiDeltaEmbedding`
and `MultiDeltaModule` serve the kept (dense) tensors of a delta — an embedding table, or the
parameters of a leaf module such as a norm — per row, by running the module's own forward with the
delta's tensors (a shallow copy of the module holding them, `with_tensors`): an embedding subclass with a forward of its own
(Gemma's scaled embedding) gives every row what that model alone gives.

All three share `MultiDeltaLayer`: a copy-on-write registry (id -> `DeltaEntry`) that forwards read
as one consistent snapshot, `add_delta` / `remove` / `delta_ids` / `delta_nbytes`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import types
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..compress import is_conv1d
from ..delta_tensor import DeltaTensor
from ..factors import PackedFactors, low_rank_term
from ..fingerprint import BaseMismatchError
from ..ops import segmented_delta
from .routing import Routing, UnknownDeltaError, UnsupportedDeltaError, current_routing, resolve_routing

__all__ = ["DeltaEntry", "MultiDeltaLayer", "MultiDeltaLinear", "MultiDeltaEmbedding", "MultiDeltaModule",
           "wrap_module", "wrapper_class", "is_unit", "is_moe_block"]


@dataclass(frozen=True)
class DeltaEntry:
    """What one delta does to one layer: a compressed delta added to the base output (`delta`, with
    its `factors` when low-rank, and their fp32 dequantized `cache` when kept), and/or dense
    replacements of the layer's own tensors (`dense`: {"weight": ..., "bias": ...} or a leaf
    module's parameters). All empty: the layer is the base for this delta."""

    name: str
    delta: Optional[DeltaTensor] = None
    factors: Optional[PackedFactors] = None
    cache: Optional[tuple] = None
    dense: Optional[Mapping[str, torch.Tensor]] = None

    def nbytes(self) -> int:
        n = self.delta.delta_nbytes() if self.delta is not None else 0
        for t in (*(self.cache or ()), *(self.dense or {}).values()):
            n += t.delta_nbytes() if isinstance(t, DeltaTensor) else t.numel() * t.element_size()
        return n

    def changes(self) -> bool:
        return self.delta is not None or bool(self.dense)

    def replacements(self) -> Optional[Mapping[str, torch.Tensor]]:
        """The module tensors this delta replaces: its dense ones, or its compressed `weight` (a table)."""
        if self.dense:
            return self.dense
        return {"weight": self.delta} if self.delta is not None else None


class _Registry:
    """Copy-on-write: `entries` (id -> DeltaEntry) and `names` are replaced, never mutated, under
    `lock`, so a forward reads one consistent snapshot."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[int, DeltaEntry] = {}
        self.names: dict[str, int] = {}
        self._next = itertools.count()

    def add(self, entry: DeltaEntry, delta_id: Optional[int]) -> int:
        with self.lock:
            if entry.name in self.names:
                raise ValueError(f"a delta named {entry.name!r} is already registered; remove it first")
            if delta_id is None:
                delta_id = next(self._next)
                while delta_id in self.entries:
                    delta_id = next(self._next)
            elif delta_id < 0 or delta_id in self.entries:
                raise ValueError(f"delta id {delta_id} is negative or already used")
            self.entries = {**self.entries, delta_id: entry}
            self.names = {**self.names, entry.name: delta_id}
            return delta_id

    def remove(self, name: str) -> int:
        with self.lock:
            if name not in self.names:
                raise UnknownDeltaError(f"no delta named {name!r}; loaded: {sorted(self.names)}")
            delta_id = self.names[name]
            self.names = {k: v for k, v in self.names.items() if k != name}
            self.entries = {k: v for k, v in self.entries.items() if k != delta_id}
            return delta_id


class MultiDeltaLayer(torch.nn.Module):
    """Shared part of the multi-delta layers: the delta registry and its queries."""

    def __init__(self):
        super().__init__()
        self._registry = _Registry()

    def add_delta(self, name: str, delta: Optional[DeltaTensor] = None, dense: Optional[Mapping[str, torch.Tensor]] = None,
                  *, delta_id: Optional[int] = None) -> int:
        """Register delta `name` here (a compressed `delta` and/or `dense` replacements of this
        layer's tensors; neither = this layer is the base for it); returns its id."""
        return self._registry.add(self._entry(name, delta, dict(dense or {})), delta_id)

    def _entry(self, name, delta, dense) -> DeltaEntry:
        raise NotImplementedError

    @classmethod
    def serves(cls, module: torch.nn.Module, leaf: str) -> bool:
        """Whether a delta's dense replacement of `module.<leaf>` can be served per row here."""
        raise NotImplementedError

    def remove(self, name: str) -> int:
        return self._registry.remove(name)

    def delta_ids(self) -> dict[str, int]:
        return dict(self._registry.names)

    def delta_nbytes(self, name: Optional[str] = None) -> int:
        """Bytes held for delta `name` here (all deltas when None): packed delta, caches, dense copies."""
        entries, names = self._registry.entries, self._registry.names
        ids = [names[name]] if name is not None else list(entries)
        return sum(entries[i].nbytes() for i in ids)

    def _snapshot(self, r: Optional[Routing]) -> dict[int, DeltaEntry]:
        entries = self._registry.entries  # one read: a consistent snapshot
        if r is not None:
            missing = [d for d in r.active() if d not in entries]
            if missing:
                raise UnknownDeltaError(f"{type(self).__name__}: delta id(s) {missing} are not loaded here; "
                                        f"loaded ids: {sorted(entries)}")
        return entries

    def _deltas_repr(self) -> str:
        return f"deltas={sorted(self._registry.names)}"


class MultiDeltaLinear(MultiDeltaLayer):
    """An `nn.Linear` serving the base and many deltas at once (see the module docstring).

    `weight` / `bias` are the base module's own parameters (same names, so state dicts and base
    fingerprints are unchanged). `add(name, tensor)` registers a compressed weight built on this base
    weight (or `weight=` / `bias=` dense replacements, or nothing: a delta that leaves this layer as
    the base) and returns its id; `remove(name)`. Forward: `layer(x, delta_ids)` with `x` (B, ..., in)
    and `delta_ids` (B,) (-1 = base), or `layer(x)` inside `routing(...)` / `MultiDeltaModel.route(...)`;
    without either, base only.

    cache_dequantized: keep V̂ and Ûᵀ of low-rank deltas dequantized in fp32 (4·r·(in+out) bytes per
    delta and layer, ~14x the packed size at alpha = 1/16) instead of unpacking each active delta's
    factors once per forward (the default; transient memory only).
    """

    def __init__(self, linear: torch.nn.Module, cache_dequantized: bool = False):
        super().__init__()
        if isinstance(linear.weight, DeltaTensor):
            raise ValueError("wrap a plain nn.Linear (the base), not a compressed one")
        self.weight = linear.weight
        self.bias = linear.bias
        # transformers' Conv1D stores its weight (in, out) and computes x W + b
        self.in_out = not isinstance(linear, torch.nn.Linear)
        self.out_features, self.in_features = linear.weight.shape[::-1] if self.in_out else linear.weight.shape
        self.cache_dequantized = cache_dequantized

    @classmethod
    def serves(cls, module, leaf):
        return leaf in ("weight", "bias")

    def add(self, name: str, tensor: Optional[DeltaTensor] = None, *, weight=None, bias=None,
            delta_id: Optional[int] = None, check_base: bool = True) -> int:
        """Register `tensor` (a compressed weight of this layer's shape; `check_base`: built on this
        exact base weight) and/or dense `weight` / `bias` replacements under `name`; returns its id."""
        if tensor is not None and check_base and not torch.equal(tensor.base_weight.to(self.weight.dtype),
                                                                  self.weight.detach()):
            raise BaseMismatchError(f"{name}: the delta was made against another base weight")
        dense = {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}
        return self.add_delta(name, tensor, dense, delta_id=delta_id)

    def _entry(self, name, delta, dense):
        factors = cache = None
        if delta is not None:
            if not isinstance(delta, DeltaTensor):
                raise UnsupportedDeltaError(f"{name}: not a compressed weight: {type(delta).__name__}")
            if tuple(delta.shape) != tuple(self.weight.shape):
                raise ValueError(f"{name}: delta shape {tuple(delta.shape)}, layer {tuple(self.weight.shape)}")
            delta = delta.to(self.weight.device)
            if self.in_out:  # served in F.linear's orientation
                delta = delta.transposed()
            factors = delta.low_rank_factors()
            if factors is not None and self.cache_dequantized:
                cache = factors.dequantize()
        for leaf, value in dense.items():
            want = tuple(self.weight.shape) if leaf == "weight" else (self.out_features,)
            if leaf not in ("weight", "bias") or tuple(value.shape) != want:
                raise ValueError(f"{name}: replacement {leaf} {tuple(value.shape)}, layer {leaf} {want}")
            dense[leaf] = value.detach().to(self.weight.device, self.weight.dtype)
        return DeltaEntry(name, delta, factors, cache, dense or None)

    def forward(self, x: torch.Tensor, delta_ids=None) -> torch.Tensor:
        r = resolve_routing(delta_ids, x.shape[0]) if x.dim() > 1 else None
        entries = self._snapshot(r)
        groups = [(entries[d], rows) for d, rows in (r.groups_on(x.device) if r is not None else [])
                  if entries[d].changes()]
        y = F.linear(x, self._linear_weight(self.weight).to(x.dtype))
        if not groups:
            return y if self.bias is None else y + self.bias
        for e, rows in groups:
            if e.dense and "weight" in e.dense:
                y.index_copy_(0, rows, F.linear(x.index_select(0, rows), self._linear_weight(e.dense["weight"]).to(x.dtype)))
        packed = [(rows, e.factors) for e, rows in groups if e.factors is not None and e.cache is None]
        if packed:
            y = segmented_delta(y, x, packed)
        for e, rows in groups:
            if e.cache is not None:
                v, ut = e.cache
                yg = (y.index_select(0, rows).float() + low_rank_term(x.index_select(0, rows), v, ut, e.factors.s))
                y.index_copy_(0, rows, yg.to(y.dtype))
            elif e.delta is not None and e.factors is None:
                yg = y.index_select(0, rows).float() + e.delta.delta_term(x.index_select(0, rows))
                y.index_copy_(0, rows, yg.to(y.dtype))
        return y + self._bias_rows(x, y, groups)

    def _linear_weight(self, w):
        return w.t() if self.in_out else w

    def _bias_rows(self, x, y, groups):
        biased = [(e, rows) for e, rows in groups if e.dense and "bias" in e.dense]
        if not biased:
            return 0 if self.bias is None else self.bias
        base_bias = self.bias if self.bias is not None else y.new_zeros(self.out_features)
        per_row = base_bias.to(y.dtype).expand(x.shape[0], self.out_features).clone()
        for e, rows in biased:
            per_row[rows] = e.dense["bias"].to(y.dtype)
        return per_row.reshape(x.shape[0], *([1] * (y.dim() - 2)), self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._deltas_repr()}")


class MultiDeltaModule(MultiDeltaLayer):
    """Any other module whose parameters deltas replace: a leaf (RMSNorm, LayerNorm, ...) or a module with
    parameters of its own *and* children (CLIP's vision embeddings: a class embedding next to the patch
    convolution and the position table), served as one unit with its whole subtree. The base module runs
    on every row, then each such delta's rows run through it again with the delta's parameters
    (`with_tensors`: a shallow copy holding them, nested names for the subtree's; the module itself is never
    modified, so concurrent forwards stay right), so whatever the module computes, a
    row gets what the delta's model alone gives. Needs a forward whose first argument and output are
    batch-first tensors (an input with batch size 1, e.g. position ids, is shared by every row). The
    module's parameters, buffers and children are registered here under their own names (state dicts and
    base fingerprints are unchanged); the module itself is not a submodule."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_inner", module)
        for n, p in module.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in module.named_buffers(recurse=False):
            self.register_buffer(n, b, persistent=n not in module._non_persistent_buffers_set)
        for n, child in module.named_children():
            self.add_module(n, child)
        self._tied = tied_names(module)  # tied tensors of the module: a replacement reaches each of their names

    @classmethod
    def serves(cls, module, leaf):
        return leaf in dict(module.named_parameters())

    def add(self, name: str, params: Optional[Mapping[str, torch.Tensor]] = None, *, delta_id: Optional[int] = None) -> int:
        return self.add_delta(name, None, params, delta_id=delta_id)

    def _entry(self, name, delta, dense):
        own = dict(self._inner.named_parameters())
        if delta is not None:
            raise UnsupportedDeltaError(f"{name}: {type(self._inner).__name__} serves parameter replacements only")
        for leaf, value in dense.items():
            if leaf not in own or own[leaf].shape != value.shape:
                raise ValueError(f"{name}: {leaf} {tuple(value.shape)} does not match {type(self._inner).__name__}'s parameters "
                                 f"{ {k: tuple(v.shape) for k, v in own.items()} }")
            dense[leaf] = value.detach().to(own[leaf].device, own[leaf].dtype)
        return DeltaEntry(name, dense=dense or None)

    def forward(self, *args, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            # called with keyword arguments only (gpt-oss's attention, whose sinks a delta changes): the rows
            # cannot be cut; fine while no routed row's delta changes this module
            self._refuse_if_replaced(current_routing(), "is called without a batch-first tensor as its first "
                                     "positional argument")
            return self._inner(*args, **kwargs)
        return self._per_row(args[0], args[1:], kwargs, None)

    def _refuse_if_replaced(self, r, why: str) -> None:
        """UnsupportedDeltaError naming the module and the deltas if a routed row's delta replaces its tensors."""
        if r is None:
            return
        entries = self._snapshot(r)
        names = sorted(entries[d].name for d in r.active() if entries[d].replacements())
        if names:
            raise UnsupportedDeltaError(
                f"{type(self._inner).__name__} {why}, so the rows of delta(s) {names}, which change its parameters, "
                f"cannot be served per row next to other rows; serve such a delta alone (load_delta / "
                f"DeltaCoMeModel.from_pretrained)"
            )

    def _per_row(self, x: torch.Tensor, args, kwargs, delta_ids):
        r = current_routing() if delta_ids is None else resolve_routing(delta_ids, x.shape[0])
        if r is not None and x.dim() > 1 and x.shape[0] == 1 and r.batch > 1:
            # an input shared by every row (position ids (1, S): GPT-2's, CLIP's learned positions): the
            # base output as it is when no row's delta changes this module, else one row per batch row
            entries = self._snapshot(r)
            if not any(entries[d].replacements() for d in r.active()):
                return self._inner(x, *args, **kwargs)
            x = x.expand(r.batch, *x.shape[1:])
        r = resolve_routing(r, x.shape[0]) if x.dim() > 1 and r is not None else None
        entries = self._snapshot(r)
        if r is not None and any(_is_cache(v) for v in (*args, *kwargs.values())):
            # a module that updates a KV cache (an attention unit) would update it once per delta group
            self._refuse_if_replaced(r, "takes a KV cache")
        y = self._inner(x, *args, **kwargs)
        if r is None:
            return y
        groups = [(d, rows, entries[d].replacements()) for d, rows in r.groups_on(x.device)]
        if not any(params for _, _, params in groups):
            return y
        if not isinstance(y, torch.Tensor):
            self._refuse_if_replaced(r, f"returns a {type(y).__name__}, not one batch-first tensor")
        if y.dim() > 0 and y.shape[0] == 1 and r.batch > 1:
            # an output shared by every row (BioGPT's learned positions: (1, S) position ids next to a
            # (B, S) mask): one copy per row, then each delta's rows replaced
            y = y.expand(r.batch, *y.shape[1:])
        for d, rows, params in groups:
            if params:
                # other batch-first tensor inputs (OPT's / BioGPT's position ids next to the attention mask)
                # are cut to the group's rows too, so the module sees one consistent sub-batch
                group_args = tuple(_batch_rows(a, rows, x.shape[0]) for a in args)
                group_kwargs = {k: _batch_rows(v, rows, x.shape[0]) for k, v in kwargs.items()}
                yg = _with_tensors(self._inner, _tied(params, self._tied))(x.index_select(0, rows), *group_args,
                                                                          **group_kwargs)
                if yg.dim() > 0 and yg.shape[0] == 1 and rows.numel() > 1:
                    yg = yg.expand(rows.numel(), *yg.shape[1:])
                y = y.index_copy(0, rows, yg)
        return y

    def extra_repr(self) -> str:
        return f"{type(self._inner).__name__}, {self._deltas_repr()}"


class MultiDeltaEmbedding(MultiDeltaModule):
    """An `nn.Embedding` (subclasses included) whose rows may use a delta's own table (a kept
    `embed_tokens.weight`, or a compressed one): the module's own forward for every row (its scale,
    e.g. Gemma's `× √hidden`, included), then each such delta's rows through the same forward with the
    delta's table."""

    def __init__(self, embedding: torch.nn.Embedding):
        if embedding.max_norm is not None:
            raise UnsupportedDeltaError("embeddings with max_norm are not supported")
        super().__init__(embedding)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        try:
            parameters = inspect.signature(embedding.forward).parameters.values()
            self._single_argument = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                                        for p in parameters) <= 1
        except (TypeError, ValueError):
            self._single_argument = True

    @classmethod
    def serves(cls, module, leaf):
        return leaf == "weight"

    def add(self, name: str, weight: Optional[torch.Tensor] = None, *, delta_id: Optional[int] = None) -> int:
        return self.add_delta(name, None, {"weight": weight} if weight is not None else None, delta_id=delta_id)

    def _entry(self, name, delta, dense):
        if set(dense) - {"weight"} or (delta is not None and dense):
            raise UnsupportedDeltaError(f"{name}: an embedding serves one replacement table (dense or compressed)")
        if delta is not None:  # a compressed table (DeltaCoMeConfig(embeddings=True))
            if not isinstance(delta, DeltaTensor) or tuple(delta.shape) != tuple(self.weight.shape):
                raise ValueError(f"{name}: compressed table {tuple(delta.shape)}, embedding {tuple(self.weight.shape)}")
            return DeltaEntry(name, delta=delta.to(self.weight.device))
        if "weight" in dense and dense["weight"].shape != self.weight.shape:
            raise ValueError(f"{name}: replacement table {tuple(dense['weight'].shape)}, embedding {tuple(self.weight.shape)}")
        return super()._entry(name, None, dense)

    def forward(self, input_ids: torch.Tensor, *args, delta_ids=None, **kwargs) -> torch.Tensor:
        # extra arguments go to the embedding's own forward when it takes them (BioGPT's / OPT's learned
        # positions: (attention_mask, past_key_values_length, position_ids=...)); for a forward of one
        # argument (nn.Embedding, Gemma's scaled one) a second positional argument is the routing, as before
        if args and self._single_argument:
            if delta_ids is not None or len(args) > 1:
                raise TypeError(f"{type(self._inner).__name__}.forward takes one argument; pass delta_ids once")
            (delta_ids,), args = args, ()
        return self._per_row(input_ids, args, kwargs, delta_ids)

    def extra_repr(self) -> str:
        return f"{type(self._inner).__name__}({self.num_embeddings}, {self.embedding_dim}), {self._deltas_repr()}"


def with_tensors(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A shallow copy of `module` that holds `tensors` (parameter / buffer names, nested ones with dots)
    in place of its own; everything else (other tensors, submodules, hooks) is shared. Unlike
    `torch.func.functional_call`, which swaps the tensors on the module for the call, `module` is never
    modified, so forwards of other threads on it see the base tensors. A tensor the module holds under
    several names (tied: a submodule used twice, one parameter registered twice) is replaced under all of
    them, as functional_call's `tie_weights` does. KeyError for a name the module does not have."""
    return _with_tensors(module, _tied(tensors, tied_names(module)))


def tied_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """{name: the other names of that tensor} for each parameter / buffer `module` holds under several names
    (tied); usually empty. `MultiDeltaModule` keeps it, so its forwards do not walk the module each call."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    names: dict[int, list] = {}
    for n, t in named:
        names.setdefault(id(t), []).append(n)
    return {n: tuple(a for a in names[id(t)] if a != n) for n, t in named if len(names[id(t)]) > 1}


def _tied(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, tuple]) -> Mapping[str, torch.Tensor]:
    """`tensors` plus, for each name with other names of the same tensor in `aliases`, those names."""
    if not aliases or not any(name in aliases for name in tensors):
        return tensors
    out = dict(tensors)
    for name, value in tensors.items():
        for alias in aliases.get(name, ()):
            out.setdefault(alias, value)
    return out


def _with_tensors(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    # copy.copy's shallow copy, without pickling hooks: a parametrized module (torch.nn.utils.parametrize,
    # weight_norm) refuses __reduce_ex__ but is copied this way as any other
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    for key, value in module.__dict__.items():
        # what the instance holds bound to itself runs on the copy: accelerate's hooks (device_map dispatch)
        # replace `forward` by partial(new_forward, module) calling the bound `_old_forward`; Module.compile's
        # compiled call is bound to the module, so the copy runs eagerly
        if isinstance(value, types.MethodType) and value.__self__ is module:
            clone.__dict__[key] = types.MethodType(value.__func__, clone)
        elif isinstance(value, functools.partial) and value.args and value.args[0] is module:
            clone.__dict__[key] = functools.partial(value.func, clone, *value.args[1:], **value.keywords)
        elif key == "_compiled_call_impl" and value is not None:
            clone.__dict__[key] = None
    own, nested = {}, {}
    for name, value in tensors.items():
        head, dot, rest = name.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            own[name] = value
    if own:
        parameters, buffers = dict(module._parameters), dict(module._buffers)
        for name, value in own.items():
            if name in parameters:
                parameters[name] = value
            elif name in buffers:
                buffers[name] = value
            else:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        clone._parameters, clone._buffers = parameters, buffers
    if nested:
        children = dict(module._modules)
        for head, sub in nested.items():
            if children.get(head) is None:
                raise KeyError(f"{type(module).__name__} has no submodule {head!r}")
            children[head] = _with_tensors(children[head], sub)
        clone._modules = children
    return clone


def _is_cache(value) -> bool:
    """A transformers KV cache (duck-typed: `update` and `get_seq_length`)."""
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


def _batch_rows(value, rows: torch.Tensor, batch: int):
    """`value` cut to `rows` when it is a batch-first tensor of the full batch (2-D or more, `batch` rows:
    position ids, masks); anything else (ints, 1-D cache positions, shared (1, ...) inputs) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, rows.to(value.device))
    return value


def wrapper_class(module: torch.nn.Module) -> Optional[type]:
    """The multi-delta layer class that serves `module` (an embedding, a linear layer or another leaf
    module), or None when none can."""
    if isinstance(module, MultiDeltaLayer):
        return type(module)
    if isinstance(module, torch.nn.Embedding):
        return MultiDeltaEmbedding
    if isinstance(module, torch.nn.Linear) or is_conv1d(module):
        return MultiDeltaLinear
    if next(module.children(), None) is None or is_unit(module) or is_moe_block(module):
        return MultiDeltaModule
    return None


def is_moe_block(module: torch.nn.Module) -> bool:
    """A mixture-of-experts block (its `experts` child stacks the experts): served per row as one unit,
    its compressed experts included (batch-first outside; inside, the tokens are regrouped by expert)."""
    experts = getattr(module, "experts", None)
    return isinstance(experts, torch.nn.Module) and isinstance(getattr(experts, "num_experts", None), int)


def is_unit(module: torch.nn.Module) -> bool:
    """A module with parameters of its own and children: served per row as one unit with its subtree."""
    return next(module.children(), None) is not None and next(module.parameters(recurse=False), None) is not None


def wrap_module(module: torch.nn.Module, cache_dequantized: bool = False) -> MultiDeltaLayer:
    """`module` wrapped in its multi-delta layer (itself if it is one); UnsupportedDeltaError if none."""
    cls = wrapper_class(module)
    if cls is None:
        raise UnsupportedDeltaError(f"{type(module).__name__} has submodules and no parameters of its own; "
                                    f"serve its submodules")
    if isinstance(module, MultiDeltaLayer):
        return module
    return cls(module, cache_dequantized) if cls is MultiDeltaLinear else cls(module)
