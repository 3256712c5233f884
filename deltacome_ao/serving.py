"""Multi-tenant serving: one base model, many Delta-CoMe deltas, mixed in one batch.

`MultiDeltaLinear` replaces an `nn.Linear`: it holds the base weight (and bias) once and a registry
of deltas (the packed factors of one `MixedPrecisionDeltaTensor` per delta). Its forward computes
`x W_baseᵀ` for every row in one matmul, then, with the rows grouped by delta (Punica SGMV /
vLLM multi-LoRA style: rows sorted by delta id once per step, each active delta's factors read
once per step), adds `((x_g V̂ᵀ) · s) Ûᵀ` on each group's rows.

`MultiDeltaModel` wraps a Hugging Face causal LM: `load_delta(name, dir)` reads an artifact written
by `deltacome_ao.artifact.save_delta` (through `artifact.load_delta` itself, on a throw-away module
tree that shares the base's tensors, so the format and fingerprint checks are the artifact's own),
replaces every linear layer a delta touches with a `MultiDeltaLinear`, and routes each batch row to
its delta: `model(input_ids, delta_ids=[...])`, `model.generate(input_ids, delta_ids=[...], ...)`.

Kept (non-linear) tensors of a delta — those that differ from the base — are served per row when
they are the weight of an `nn.Embedding` (per-row gather from the delta's own table), the weight /
bias of an `nn.Linear` (e.g. `lm_head`: the delta's rows use the delta's dense copy), or parameters
of any other leaf module with a batch-first forward, such as the RMSNorm / LayerNorm weights every
full fine-tune changes (`MultiDeltaModule`: the delta's rows run through the module again with the
delta's parameters). Buffers and parameters of modules with children are refused with
`UnsupportedDeltaError`. See docs/serving.md.

The grouped low-rank step is `segmented_delta_reference` (torch, any device); a segmented kernel
for a device type is plugged in with `register_segmented_backend` (the Triton kernel `deltacome_ao.kernels.segmented` is registered for CUDA).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from . import artifact
from .mixed_precision_delta_tensor import MixedPrecisionDeltaTensor
from .ops import dequantize_factors, low_rank_term

__all__ = [
    "MultiDeltaLinear",
    "MultiDeltaEmbedding",
    "MultiDeltaModule",
    "MultiDeltaModel",
    "DeltaFactors",
    "Routing",
    "routing",
    "current_routing",
    "segmented_delta_reference",
    "register_segmented_backend",
    "UnknownDeltaError",
    "DeltaInUseError",
    "UnsupportedDeltaError",
    "BASE",
]

BASE = -1  # delta id of rows that use the base model only


class UnknownDeltaError(LookupError):
    """A row asks for a delta id / name that is not loaded."""


class DeltaInUseError(RuntimeError):
    """A delta cannot be removed while a forward or generate routed to it is running."""


class UnsupportedDeltaError(ValueError):
    """The delta changes something that cannot be served per row (see docs/serving.md)."""


# --- routing (row -> delta) ----------------------------------------------------------------------


class Routing:
    """The row -> delta mapping of one batch, grouped once for every layer of the step.

    `ids` (B,) int64 on CPU, `BASE` (-1) = base only. `groups`: [(delta id, row indices)] for
    every delta id used, rows in ascending order (a stable sort of the ids: the segment table a
    segmented kernel would take). The row indices are cached per device.
    """

    def __init__(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() and int(ids.min()) < BASE:
            raise UnknownDeltaError(f"delta ids must be >= {BASE} ({BASE} = base only), got {ids.tolist()}")
        self.ids = ids
        order = torch.argsort(ids, stable=True)
        uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
        self.groups: list[tuple[int, torch.Tensor]] = []
        start = 0
        for d, c in zip(uniq.tolist(), counts.tolist()):
            if d != BASE:
                self.groups.append((d, order[start:start + c]))
            start += c
        self._on: dict = {}

    @property
    def batch(self) -> int:
        return self.ids.numel()

    def active(self) -> list[int]:
        return [d for d, _ in self.groups]

    def groups_on(self, device) -> list[tuple[int, torch.Tensor]]:
        device = torch.device(device)
        if device.type == "cpu":
            return self.groups
        if device not in self._on:
            self._on[device] = [(d, rows.to(device)) for d, rows in self.groups]
        return self._on[device]


_ROUTING: contextvars.ContextVar[Optional[Routing]] = contextvars.ContextVar("deltacome_routing", default=None)


def current_routing() -> Optional[Routing]:
    return _ROUTING.get()


@contextlib.contextmanager
def routing(delta_ids):
    """Route every `MultiDeltaLinear` / `MultiDeltaEmbedding` called inside the block (in this thread
    / context) with per-row `delta_ids` (a (B,) int tensor or list, -1 = base, or a `Routing`).
    Layer-level only: `MultiDeltaModel.route` also validates and pins the deltas."""
    r = delta_ids if isinstance(delta_ids, Routing) else Routing(delta_ids)
    token = _ROUTING.set(r)
    try:
        yield r
    finally:
        _ROUTING.reset(token)


def _resolve(delta_ids, rows: int) -> Optional[Routing]:
    r = current_routing() if delta_ids is None else (delta_ids if isinstance(delta_ids, Routing) else Routing(delta_ids))
    if r is not None and r.batch != rows:
        raise ValueError(f"the routing has {r.batch} delta ids but the input has {rows} rows (dim 0)")
    return r


# --- one layer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaFactors:
    """The packed factors of one `MixedPrecisionDeltaTensor` (no base weight), plus, when cached,
    the dequantized `v` (r, in) and `ut` (r, out) in fp32."""

    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    u_packed: torch.Tensor
    u_scale: torch.Tensor
    u_zero: torch.Tensor
    s: torch.Tensor
    bits: tuple
    counts: tuple
    group_size: int
    shape: tuple
    v: Optional[torch.Tensor] = None
    ut: Optional[torch.Tensor] = None

    @classmethod
    def from_tensor(cls, t: MixedPrecisionDeltaTensor, device=None, cache: bool = True) -> "DeltaFactors":
        device = device if device is not None else t.base_weight.device
        parts = {n: getattr(t, n).detach().to(device) for n in t.tensor_data_names[1:]}
        f = cls(**parts, bits=tuple(t.bits), counts=tuple(t.counts), group_size=int(t.group_size),
                shape=tuple(t.base_weight.shape))
        if cache:
            v, ut = f.dequantized()
            f = cls(**{**f.__dict__, "v": v, "ut": ut})
        return f

    @property
    def rank(self) -> int:
        return sum(self.counts)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V̂ (r, in), Ûᵀ (r, out)) fp32: the cached ones, else unpacked now."""
        if self.v is not None:
            return self.v, self.ut
        return dequantize_factors(*self.shape, self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale,
                                  self.u_zero, self.bits, self.counts, self.group_size)

    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero, self.s))

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.v, self.ut) if t is not None)


@dataclass(frozen=True)
class _Entry:
    """What one delta does to one layer: low-rank factors added to the base output, and/or a dense
    replacement weight / bias (kept tensors of a non-compressed layer). All None: nothing."""

    name: str
    factors: Optional[DeltaFactors] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    params: Optional[Mapping[str, torch.Tensor]] = None

    def nbytes(self) -> int:
        n = 0
        if self.factors is not None:
            n += self.factors.packed_nbytes() + self.factors.cache_nbytes()
        for t in (self.weight, self.bias, *(self.params or {}).values()):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


def segmented_delta_reference(y: torch.Tensor, x: torch.Tensor, groups, factors: Mapping[int, DeltaFactors]) -> torch.Tensor:
    """The grouped low-rank step, reference path: for each (delta id, rows) in `groups` whose id
    has factors, `y[rows] = (y[rows].fp32 + ((x[rows].fp32 V̂ᵀ) · s) Ûᵀ).to(y.dtype)` — the same
    arithmetic as `deltacome::delta_linear`, so a row gives what the delta's model alone gives.
    `y` (B, ..., out) is updated in place and returned. Each delta's factors are read once."""
    for d, rows in groups:
        f = factors.get(d)
        if f is None:
            continue
        v, ut = f.dequantized()
        xg = x.index_select(0, rows)
        yg = (y.index_select(0, rows).float() + low_rank_term(xg, v, ut, f.s)).to(y.dtype)
        y.index_copy_(0, rows, yg)
    return y


# device type -> fn(y, x, groups, factors) -> y, with the contract of `segmented_delta_reference`
_SEGMENTED_BACKENDS: dict[str, Callable] = {}


def register_segmented_backend(device_type: str, fn: Optional[Callable]):
    """Plug a segmented (SGMV-style) kernel in for `device_type` ("cuda", ...); None removes it."""
    if fn is None:
        _SEGMENTED_BACKENDS.pop(device_type, None)
    else:
        _SEGMENTED_BACKENDS[device_type] = fn


class _Registry:
    """Copy-on-write registry shared by the multi-delta modules: `entries` (id -> _Entry) is
    replaced, never mutated, under `lock`, so a forward reads one consistent snapshot."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[int, _Entry] = {}
        self.names: dict[str, int] = {}
        self._next = itertools.count()

    def add(self, name: str, entry: _Entry, delta_id: Optional[int]) -> int:
        with self.lock:
            if name in self.names:
                raise ValueError(f"a delta named {name!r} is already registered; remove it first")
            if delta_id is None:
                delta_id = next(self._next)
                while delta_id in self.entries:
                    delta_id = next(self._next)
            elif delta_id < 0 or delta_id in self.entries:
                raise ValueError(f"delta id {delta_id} is negative or already used")
            self.entries = {**self.entries, delta_id: entry}
            self.names = {**self.names, name: delta_id}
            return delta_id

    def remove(self, name: str) -> int:
        with self.lock:
            if name not in self.names:
                raise UnknownDeltaError(f"no delta named {name!r}; loaded: {sorted(self.names)}")
            delta_id = self.names[name]
            self.names = {k: v for k, v in self.names.items() if k != name}
            self.entries = {k: v for k, v in self.entries.items() if k != delta_id}
            return delta_id

    def snapshot(self, r: Optional[Routing], where: str) -> dict[int, _Entry]:
        entries = self.entries  # one read: a consistent snapshot
        if r is not None:
            missing = [d for d in r.active() if d not in entries]
            if missing:
                raise UnknownDeltaError(f"{where}: delta id(s) {missing} are not loaded here; loaded ids: {sorted(entries)}")
        return entries


class MultiDeltaLinear(torch.nn.Module):
    """An `nn.Linear` serving the base and many deltas at once (see the module docstring).

    `weight` / `bias` are the base module's own parameters (same names, so state dicts and base
    fingerprints are unchanged). `add(name, tensor)` registers a `MixedPrecisionDeltaTensor` built
    on this base weight (or `weight=` / `bias=` dense replacements, or nothing: a delta that leaves
    this layer as the base) and returns its id; `remove(name)`. Forward: `layer(x, delta_ids)` with
    `x` (B, ..., in) and `delta_ids` (B,) (-1 = base), or `layer(x)` inside `routing(...)` /
    `MultiDeltaModel.route(...)`; without either, base only.

    cache_dequantized: keep V̂ and Ûᵀ dequantized in fp32 (4·r·(in+out) bytes per delta and layer,
    ~14x the packed size at alpha = 1/16: 28.6 MiB vs 2 MiB for 4096x4096) instead of unpacking each
    active delta's factors once per forward (the default; transient memory only).
    """

    def __init__(self, linear: torch.nn.Linear, cache_dequantized: bool = False):
        super().__init__()
        if isinstance(linear.weight, (MixedPrecisionDeltaTensor, artifact.BitDeltaTensor)):
            raise ValueError("wrap a plain nn.Linear (the base), not a compressed one")
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.cache_dequantized = cache_dequantized
        self._registry = _Registry()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, cache_dequantized: bool = False) -> "MultiDeltaLinear":
        return cls(linear, cache_dequantized)

    # registry

    def add(self, name: str, tensor: Optional[MixedPrecisionDeltaTensor] = None, *, weight=None, bias=None,
            delta_id: Optional[int] = None, check_base: bool = True) -> int:
        factors = None
        if tensor is not None:
            if not isinstance(tensor, MixedPrecisionDeltaTensor):
                raise UnsupportedDeltaError(
                    f"{name}: only MixedPrecisionDeltaTensor deltas can be served, got {type(tensor).__name__}")
            if tuple(tensor.shape) != tuple(self.weight.shape):
                raise ValueError(f"{name}: delta shape {tuple(tensor.shape)}, layer {tuple(self.weight.shape)}")
            if check_base and not torch.equal(tensor.base_weight.to(self.weight.dtype), self.weight.detach()):
                raise artifact.BaseMismatchError(f"{name}: the delta was made against another base weight")
            factors = DeltaFactors.from_tensor(tensor, device=self.weight.device, cache=self.cache_dequantized)
        if weight is not None:
            weight = weight.detach().to(self.weight.device)
            if weight.shape != self.weight.shape:
                raise ValueError(f"{name}: replacement weight {tuple(weight.shape)}, layer {tuple(self.weight.shape)}")
        if bias is not None:
            bias = bias.detach().to(self.weight.device)
            if bias.shape != (self.out_features,):
                raise ValueError(f"{name}: replacement bias {tuple(bias.shape)}, layer ({self.out_features},)")
        return self._registry.add(name, _Entry(name, factors, weight, bias), delta_id)

    def remove(self, name: str) -> int:
        return self._registry.remove(name)

    def delta_ids(self) -> dict[str, int]:
        return dict(self._registry.names)

    def delta_nbytes(self, name: Optional[str] = None) -> int:
        entries, names = self._registry.entries, self._registry.names
        ids = [names[name]] if name is not None else list(entries)
        return sum(entries[i].nbytes() for i in ids)

    # forward

    def forward(self, x: torch.Tensor, delta_ids=None) -> torch.Tensor:
        r = _resolve(delta_ids, x.shape[0]) if x.dim() > 1 else None
        entries = self._registry.snapshot(r, "MultiDeltaLinear")
        groups = r.groups_on(x.device) if r is not None else []
        groups = [(d, rows) for d, rows in groups if entries[d].factors is not None or
                  entries[d].weight is not None or entries[d].bias is not None]
        y = F.linear(x, self.weight.to(x.dtype))
        if not groups:
            return y if self.bias is None else y + self.bias
        dense = [(d, rows) for d, rows in groups if entries[d].weight is not None]
        for d, rows in dense:
            y.index_copy_(0, rows, F.linear(x.index_select(0, rows), entries[d].weight.to(x.dtype)))
        factors = {d: entries[d].factors for d, _ in groups if entries[d].factors is not None}
        if factors:
            backend = _SEGMENTED_BACKENDS.get(x.device.type, segmented_delta_reference)
            y = backend(y, x, groups, factors)
        biased = [(d, rows) for d, rows in groups if entries[d].bias is not None]
        if self.bias is None and not biased:
            return y
        if not biased:
            return y + self.bias
        base_bias = self.bias if self.bias is not None else y.new_zeros(self.out_features)
        per_row = base_bias.to(y.dtype).expand(x.shape[0], self.out_features).clone()
        for d, rows in biased:
            per_row[rows] = entries[d].bias.to(y.dtype)
        return y + per_row.reshape(x.shape[0], *([1] * (y.dim() - 2)), self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"deltas={sorted(self._registry.names)}")


class MultiDeltaEmbedding(torch.nn.Module):
    """An `nn.Embedding` whose rows may use a delta's own table (a kept `embed_tokens.weight`):
    base lookup for every row, then each such delta's rows are looked up in its table."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        if embedding.max_norm is not None:
            raise UnsupportedDeltaError("embeddings with max_norm are not supported")
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self._registry = _Registry()

    def add(self, name: str, weight: Optional[torch.Tensor] = None, *, delta_id: Optional[int] = None) -> int:
        if weight is not None:
            weight = weight.detach().to(self.weight.device)
            if weight.shape != self.weight.shape:
                raise ValueError(f"{name}: replacement table {tuple(weight.shape)}, embedding {tuple(self.weight.shape)}")
        return self._registry.add(name, _Entry(name, weight=weight), delta_id)

    def remove(self, name: str) -> int:
        return self._registry.remove(name)

    def delta_ids(self) -> dict[str, int]:
        return dict(self._registry.names)

    def forward(self, input_ids: torch.Tensor, delta_ids=None) -> torch.Tensor:
        r = _resolve(delta_ids, input_ids.shape[0]) if input_ids.dim() > 1 else None
        entries = self._registry.snapshot(r, "MultiDeltaEmbedding")
        y = F.embedding(input_ids, self.weight, self.padding_idx)
        if r is not None:
            for d, rows in r.groups_on(input_ids.device):
                w = entries[d].weight
                if w is not None:
                    y.index_copy_(0, rows, F.embedding(input_ids.index_select(0, rows), w, self.padding_idx))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, deltas={sorted(self._registry.names)}"


class MultiDeltaModule(torch.nn.Module):
    """Any other leaf module (RMSNorm, LayerNorm, ...) whose parameters deltas replace. The base
    module runs on every row, then each such delta's rows run through it again with the delta's
    parameters (`torch.func.functional_call`), so whatever the module computes, a row gets what
    the delta's model alone gives. Needs a forward whose first argument and output are batch-first
    tensors, as norms have. The module's parameters are registered here under their own names
    (state dicts and base fingerprints are unchanged); the module itself is not a submodule."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        if next(module.children(), None) is not None:
            raise UnsupportedDeltaError(f"{type(module).__name__} has submodules; only leaf modules can be served per row")
        object.__setattr__(self, "_inner", module)
        for n, p in module.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in module.named_buffers(recurse=False):
            self.register_buffer(n, b)
        self._registry = _Registry()

    def add(self, name: str, params: Optional[Mapping[str, torch.Tensor]] = None, *, delta_id: Optional[int] = None) -> int:
        own = dict(self._inner.named_parameters(recurse=False))
        checked = {}
        for leaf, value in (params or {}).items():
            if leaf not in own or own[leaf].shape != value.shape:
                raise ValueError(f"{name}: {leaf} {tuple(value.shape)} does not match {type(self._inner).__name__}'s parameters "
                                 f"{ {k: tuple(v.shape) for k, v in own.items()} }")
            checked[leaf] = value.detach().to(own[leaf].device, own[leaf].dtype)
        return self._registry.add(name, _Entry(name, params=checked or None), delta_id)

    def remove(self, name: str) -> int:
        return self._registry.remove(name)

    def delta_ids(self) -> dict[str, int]:
        return dict(self._registry.names)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        r = _resolve(None, x.shape[0]) if x.dim() > 1 else None
        entries = self._registry.snapshot(r, type(self._inner).__name__)
        y = self._inner(x, *args, **kwargs)
        if r is None:
            return y
        for d, rows in r.groups_on(x.device):
            params = entries[d].params
            if params:
                yg = torch.func.functional_call(self._inner, dict(params), (x.index_select(0, rows), *args), kwargs)
                y = y.index_copy(0, rows, yg)
        return y

    def extra_repr(self) -> str:
        return f"{type(self._inner).__name__}, deltas={sorted(self._registry.names)}"


_MULTI = (MultiDeltaLinear, MultiDeltaEmbedding, MultiDeltaModule)


# --- the model -----------------------------------------------------------------------------------


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer (nothing is copied but
    Python objects), for `artifact.load_delta` to swap tensors on without touching `model`."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _split(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


class MultiDeltaModel(torch.nn.Module):
    """A Hugging Face causal LM serving many deltas at once, one per batch row.

    `MultiDeltaModel(base)` wraps `base` in place (modules are replaced by multi-delta ones as
    deltas need them; parameter names are unchanged). `load_delta(name, delta_dir)` -> delta id,
    `unload_delta(name)`, `deltas()`. Rows are routed with `delta_ids`: a sequence of names / ids /
    None (base), or a (B,) int tensor of ids (-1 = base):

        served(input_ids, delta_ids=["a", None, "b"])          # -> the base model's output type
        served.generate(input_ids, delta_ids=["a", None, "b"], max_new_tokens=8)
        with served.route(["a", None, "b"]):                   # any call of the base inside
            served.model(input_ids)

    A delta routed to by a running forward / generate is pinned: `unload_delta` raises
    `DeltaInUseError` until it finishes. Thread-safe: loads, unloads and forwards may run in
    different threads (the routing is a context variable, i.e. per thread).
    """

    def __init__(self, base: torch.nn.Module, cache_dequantized: bool = False):
        """cache_dequantized: see `MultiDeltaLinear` (memory for speed; off by default)."""
        super().__init__()
        already = sorted(artifact.compressed_layers(base))
        if already:
            raise ValueError(f"the base holds compressed weights ({artifact._few(already)}); pass a plain base")
        self.model = base
        self.cache_dequantized = cache_dequantized
        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self._pins: dict[int, int] = {}
        self._next_id = itertools.count()
        # plain modules sharing the base's tensors (not a registered submodule: no duplicate state)
        object.__setattr__(self, "_skeleton", _structural_copy(base))

    # --- registry ---

    def deltas(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ids)

    def multi_modules(self) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, _MULTI)}

    def load_delta(self, name: str, delta_dir: Union[str, os.PathLike], verify: str = "full") -> int:
        """Read the artifact at `delta_dir` (format and base fingerprint checked by
        `artifact.load_delta`), register it under `name` in every layer it touches, return its id.
        Nothing changes if it fails."""
        if not isinstance(name, str) or not name:
            raise ValueError("a delta name must be a non-empty string")
        with self._lock:
            if name in self._ids:
                raise ValueError(f"a delta named {name!r} is already loaded; unload it first")
        document = artifact.read_delta_config(delta_dir)
        loaded = artifact.load_delta(_structural_copy(self._skeleton), delta_dir, verify=verify)
        layers, dense = self._plan(loaded, document)
        with self._lock:
            if name in self._ids:
                raise ValueError(f"a delta named {name!r} is already loaded; unload it first")
            delta_id = next(self._next_id)
            added = []
            try:
                for module_name in sorted(set(layers) | set(dense)):
                    module = self._multi(module_name)
                    if isinstance(module, MultiDeltaEmbedding):
                        module.add(name, dense[module_name].get("weight"), delta_id=delta_id)
                    elif isinstance(module, MultiDeltaModule):
                        module.add(name, dense[module_name], delta_id=delta_id)
                    else:
                        module.add(name, layers.get(module_name), weight=dense.get(module_name, {}).get("weight"),
                                   bias=dense.get(module_name, {}).get("bias"), delta_id=delta_id, check_base=False)
                    added.append(module)
                for module in self.multi_modules().values():  # every other multi module: base for this delta
                    if module not in added:
                        module.add(name, delta_id=delta_id)
                        added.append(module)
            except BaseException:
                for module in added:
                    module.remove(name)
                raise
            self._ids[name] = delta_id
            self._pins[delta_id] = 0
            return delta_id

    def _plan(self, loaded: torch.nn.Module, document: dict):
        """-> ({module: MixedPrecisionDeltaTensor}, {module: {"weight"/"bias": tensor}}) of one
        delta loaded onto a structural copy; refuses what cannot be served per row."""
        layers = {}
        for module_name in document["layers"]:
            w = loaded.get_submodule(module_name).weight
            if not isinstance(w, MixedPrecisionDeltaTensor):
                raise UnsupportedDeltaError(
                    f"{module_name}: {type(w).__name__} layers cannot be served per row; only MixedPrecisionDeltaTensor")
            layers[module_name] = w
        base_state = dict(self._skeleton.state_dict(keep_vars=True))
        kept_names = set(document.get("kept", []))
        kept_names |= {alias for alias, target in document.get("aliases", {}).items() if target in kept_names}
        dense, refused = {}, []
        for key in sorted(kept_names):
            value = artifact._get_tensor(loaded, key)
            if key in base_state and artifact._same(value.detach(), base_state[key].detach()):
                continue  # stored (e.g. saved without a base) but equal to the base's: nothing to serve
            owner, leaf = _split(key)
            module = self._skeleton.get_submodule(owner) if owner else self._skeleton
            own = dict(module.named_parameters(recurse=False))
            ok = (isinstance(module, torch.nn.Embedding) and leaf == "weight") or \
                 (isinstance(module, torch.nn.Linear) and leaf in ("weight", "bias")) or \
                 (not isinstance(module, (torch.nn.Embedding, torch.nn.Linear)) and leaf in own
                  and next(module.children(), None) is None)
            if ok and isinstance(module, torch.nn.Linear) and leaf == "weight" and owner in layers:
                ok = False  # a compressed layer's weight is never a kept tensor
            if not ok:
                refused.append(f"{key} ({type(module).__name__})")
                continue
            dense.setdefault(owner, {})[leaf] = value.detach()
        if refused:
            raise UnsupportedDeltaError(
                f"the delta changes tensors that cannot be swapped per row: {artifact._few(refused)}; only "
                "projection deltas, nn.Embedding tables, nn.Linear weights/biases (e.g. lm_head) and parameters of "
                "leaf modules such as norms can be served in a mixed batch — serve this fine-tune alone with artifact.load_delta")
        return layers, dense

    def _multi(self, module_name: str) -> torch.nn.Module:
        """The multi-delta module at `module_name`, wrapping the base module there first if needed
        (with every loaded delta registered as 'base' in it). Caller holds the lock."""
        current = self.model.get_submodule(module_name)
        if isinstance(current, _MULTI):
            return current
        if isinstance(current, torch.nn.Embedding):
            wrapped = MultiDeltaEmbedding(current)
        elif isinstance(current, torch.nn.Linear):
            wrapped = MultiDeltaLinear(current, self.cache_dequantized)
        elif next(current.children(), None) is None:
            wrapped = MultiDeltaModule(current)
        else:
            raise UnsupportedDeltaError(f"{module_name}: {type(current).__name__} cannot be served per row")
        for other, delta_id in self._ids.items():
            wrapped.add(other, delta_id=delta_id)
        owner, leaf = _split(module_name)
        setattr(self.model.get_submodule(owner) if owner else self.model, leaf, wrapped)
        return wrapped

    def unload_delta(self, name: str):
        """Remove a delta everywhere. Raises `DeltaInUseError` while a forward / generate routed
        to it runs, `UnknownDeltaError` if it is not loaded."""
        with self._lock:
            if name not in self._ids:
                raise UnknownDeltaError(f"no delta named {name!r}; loaded: {sorted(self._ids)}")
            delta_id = self._ids[name]
            if self._pins.get(delta_id):
                raise DeltaInUseError(
                    f"delta {name!r} (id {delta_id}) is used by {self._pins[delta_id]} running forward/generate "
                    "call(s); unload it when they finish")
            del self._ids[name]
            del self._pins[delta_id]
            for module in self.multi_modules().values():
                if name in module.delta_ids():
                    module.remove(name)

    def delta_nbytes(self, name: str) -> int:
        """Bytes held for one delta (packed factors, dequantized caches, dense copies)."""
        with self._lock:
            if name not in self._ids:
                raise UnknownDeltaError(f"no delta named {name!r}")
            return sum(m.delta_nbytes(name) for m in self.multi_modules().values() if isinstance(m, MultiDeltaLinear)) + \
                sum(m._registry.entries[self._ids[name]].nbytes() for m in self.multi_modules().values()
                    if isinstance(m, (MultiDeltaEmbedding, MultiDeltaModule)))

    # --- routing ---

    def resolve_ids(self, delta_ids) -> torch.Tensor:
        """Names / ids / None -> a (B,) int64 tensor of ids (-1 = base); unknown -> UnknownDeltaError."""
        with self._lock:
            known = dict(self._ids)
        if isinstance(delta_ids, torch.Tensor):
            ids = delta_ids.detach().to("cpu", torch.long).reshape(-1)
        else:
            out = []
            for d in delta_ids:
                if d is None:
                    out.append(BASE)
                elif isinstance(d, str):
                    if d not in known:
                        raise UnknownDeltaError(f"no delta named {d!r}; loaded: {sorted(known)}")
                    out.append(known[d])
                else:
                    out.append(int(d))
            ids = torch.tensor(out, dtype=torch.long)
        bad = sorted({int(i) for i in ids.tolist() if i != BASE and i not in known.values()})
        if bad:
            raise UnknownDeltaError(f"unknown delta id(s) {bad}; loaded: {known} ({BASE} = base)")
        return ids

    @contextlib.contextmanager
    def route(self, delta_ids):
        """Route the base's multi-delta modules per row inside the block; pins the deltas used."""
        ids = self.resolve_ids(delta_ids)
        r = Routing(ids)
        with self._lock:
            missing = [d for d in r.active() if d not in self._pins]
            if missing:  # unloaded between resolve_ids and here
                raise UnknownDeltaError(f"delta id(s) {missing} were unloaded")
            for d in r.active():
                self._pins[d] += 1
        try:
            with routing(r):
                yield r
        finally:
            with self._lock:
                for d in r.active():
                    if d in self._pins:
                        self._pins[d] -= 1

    def forward(self, input_ids=None, delta_ids=None, **kwargs):
        if delta_ids is None:
            return self.model(input_ids=input_ids, **kwargs)
        with self.route(delta_ids):
            return self.model(input_ids=input_ids, **kwargs)

    def generate(self, input_ids=None, delta_ids=None, **kwargs):
        """`base.generate` with every row routed to its delta for the whole generation. With
        `num_beams` / `num_return_sequences` the ids are repeated like HF repeats the rows."""
        if delta_ids is None:
            return self.model.generate(input_ids, **kwargs)
        ids = self.resolve_ids(delta_ids)
        gen = getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1
        seqs = kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1
        expand = int(beams) if int(beams) > 1 else int(seqs)  # HF: beams expand the batch, else return sequences
        if expand > 1:
            ids = ids.repeat_interleave(expand)
        with self.route(ids):
            return self.model.generate(input_ids, **kwargs)
