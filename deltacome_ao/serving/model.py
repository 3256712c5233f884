"""`MultiDeltaModel`: a Hugging Face causal LM serving many deltas at once, one per batch row.

`load_delta(name, dir)` reads an artifact written by `save_delta` (through `artifact.load_delta`
itself, on a throw-away module tree that shares the base's tensors, so the format and fingerprint
checks are the artifact's own), wraps every module a delta touches in its multi-delta layer
(`layers.py`), and routes each batch row to its delta: `model(input_ids, delta_ids=[...])`,
`model.generate(input_ids, delta_ids=[...], ...)`.

Kept (non-matmul) tensors of a delta — those that differ from the base — are served per row when
they are the weight of an `nn.Embedding` (through the embedding's own forward: Gemma's scale), the
weight / bias of an `nn.Linear` or `Conv1D` (e.g. `lm_head`), or parameters of any other leaf module
with a batch-first forward, such as the RMSNorm / LayerNorm weights every full fine-tune changes.
A mixture-of-experts block, and a module with parameters of its own and children (CLIP's vision
embeddings), are served as one unit: every tensor of a delta inside it, compressed experts included,
replaces the unit's own for that delta's rows. Buffers, and a delta whose config differs from the
base's in a field that changes outputs, are refused with `UnsupportedDeltaError`. See docs/serving.md.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import threading
from typing import Mapping, Optional, Union

import torch

from ..artifact import get_tensor, load_delta
from ..checkpoint import few
from ..compress import compressed_layers
from ..fingerprint import same
from ..finetune_config import NEUTRAL, differing_fields
from ..format import read_delta_config, spec_key
from ..hub import resolve_delta_dir
from .controls import deltas_disabled, disable_deltas, weighted_artifact
from .layers import MultiDeltaLayer, is_moe_block, is_unit, wrap_module, wrapper_class
from .routing import BASE, DeltaInUseError, Routing, UnknownDeltaError, UnsupportedDeltaError, routing

__all__ = ["MultiDeltaModel"]


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer (nothing is copied but
    Python objects), for `artifact.load_delta` to swap tensors on without touching `model`."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _serves_flat_tokens(module: torch.nn.Module) -> bool:
    """A mixture-of-experts block: batch-first in and out, its router and experts see the tokens flattened."""
    return is_moe_block(module)


def _unit_of(root: torch.nn.Module, owner: str) -> str:
    """The module serving the tensors of module `owner` per row: its outermost ancestor (or itself) that
    is a mixture-of-experts block (batch-first outside, the tokens flattened and regrouped by expert
    inside) or has parameters of its own and children (`layers.is_unit`), else `owner` itself.
    Structural, so every delta is served by the same modules."""
    parts = owner.split(".") if owner else []
    for i in range(1, len(parts) + 1):
        module = root.get_submodule(".".join(parts[:i]))
        if is_moe_block(module) or is_unit(module):
            return ".".join(parts[:i])
    return owner


def _probe_input(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """(2, 6) token ids for `MultiDeltaModel._probe` (two different rows, fixed), on the embedding's
    device; None when the model has no input embedding table to size them."""
    try:
        embedding = model.get_input_embeddings()
        vocab = int(embedding.weight.shape[0])
        device = embedding.weight.device
    except (AttributeError, NotImplementedError, TypeError, IndexError):
        return None
    if vocab < 2 or device.type == "meta":
        return None
    g = torch.Generator().manual_seed(0)
    low = min(3, vocab - 1)  # ordinary tokens: clear of the usual special ids at both ends of the table
    return torch.randint(low, max(low + 1, min(vocab - 2, 1000)), (2, 6), generator=g).to(device)


def _logits(out) -> Optional[torch.Tensor]:
    """The logits of a model output (`.logits`, or the first element of a tuple), None if there are none."""
    y = getattr(out, "logits", None)
    if y is None and isinstance(out, (tuple, list)) and out:
        y = out[0]
    return y.detach() if isinstance(y, torch.Tensor) and y.dim() >= 2 and y.shape[0] == 2 else None


def _dtype(model: torch.nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


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
        already = sorted(compressed_layers(base))
        if already:
            raise ValueError(f"the base holds compressed weights ({few(already)}); pass a plain base")
        self.model = base
        self.cache_dequantized = cache_dequantized
        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self._pins: dict[int, int] = {}
        self._next_id = itertools.count()
        # plain modules sharing the base's tensors (not a registered submodule: no duplicate state)
        object.__setattr__(self, "_skeleton", _structural_copy(base))
        self._documents: dict[str, dict] = {}  # delta_config.json of each loaded delta (add_weighted_delta)
        self._originals: dict[str, torch.nn.Module] = {}  # base modules replaced by multi-delta ones (unload)

    # --- registry ---

    def deltas(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ids)

    def multi_modules(self) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiDeltaLayer)}

    def load_delta(self, name: str, delta_dir: Union[str, os.PathLike], verify: str = "full", *,
                   revision: Optional[str] = None, probe: bool = True) -> int:
        """Read the artifact at `delta_dir` (format and base fingerprint checked by
        `artifact.load_delta`), register it under `name` in every layer it touches, return its id.
        `delta_dir` may be a Hub repo id `org/name` (at `revision`; `hub.resolve_delta_dir`).

        probe: before the delta is registered, one small forward (2 rows × 6 tokens, with a KV cache)
        routes a row to it next to a base row and compares each row with the delta's model alone and the
        base: a module that cannot be cut by rows (called with keyword arguments or a KV cache, returning
        a tuple, flattening the batch into tokens, ...) or a row that differs is refused here with
        `UnsupportedDeltaError` naming the module, instead of failing (or differing) at the first forward.
        `probe=False` skips it. Nothing changes if it fails."""
        delta_dir = resolve_delta_dir(delta_dir, revision)
        if not isinstance(name, str) or not name:
            raise ValueError("a delta name must be a non-empty string")
        with self._lock:
            if name in self._ids:
                raise ValueError(f"a delta named {name!r} is already loaded; unload it first")
        document = read_delta_config(delta_dir, verify=verify)
        self._refuse_unservable(document)
        # load_delta checks everything (format, digests, base, shapes) and harmonises dtypes to the base's
        loaded = load_delta(_structural_copy(self._skeleton), delta_dir, verify=verify)
        layers, dense = self._plan(loaded, document)
        with self._lock:
            if name in self._ids:
                raise ValueError(f"a delta named {name!r} is already loaded; unload it first")
            delta_id = next(self._next_id)
            added = []
            wrapped_before = dict(self._originals)
            try:
                for module_name in sorted(set(layers) | set(dense)):
                    module = self._multi(module_name)
                    module.add_delta(name, layers.get(module_name), dense.get(module_name), delta_id=delta_id)
                    added.append(module)
                for module in self.multi_modules().values():  # every other multi module: base for this delta
                    if module not in added:
                        module.add_delta(name, delta_id=delta_id)
                        added.append(module)
                if probe:
                    self._probe(name, delta_id, loaded)
            except BaseException:
                for module in added:
                    module.remove(name)
                self._unwrap_since(wrapped_before)
                raise
            self._ids[name] = delta_id
            self._pins[delta_id] = 0
            self._documents[name] = document
            return delta_id

    def _unwrap_since(self, wrapped_before: dict) -> None:
        """Put back the base modules wrapped after `wrapped_before` (a copy of `_originals`) was taken:
        a failed load leaves the served model's module tree as it was. Caller holds the lock."""
        for module_name in sorted(set(self._originals) - set(wrapped_before), key=lambda n: -n.count(".")):
            owner, leaf = _split(module_name)
            setattr(self.model.get_submodule(owner) if owner else self.model, leaf, self._originals.pop(module_name))

    def _probe(self, name: str, delta_id: int, loaded: torch.nn.Module) -> None:
        """One forward of 2 rows (row 0 routed to the new delta, row 1 to the base) with a KV cache, compared
        with the delta's model alone (`loaded`) and the base (`_skeleton`). UnsupportedDeltaError naming the
        module if the routed forward raises, or if a row differs from its model alone by more than rounding
        (5 % of the delta's effect on that row, or √eps of the logits' scale). Skipped when the model cannot
        be called with `input_ids` alone (the un-routed forwards raise). Caller holds the lock."""
        x = _probe_input(self.model)
        if x is None:
            return
        # the private copies in eval mode (dropout would make the rows incomparable), restored after; the
        # served model's modes are never touched (other threads may be running it): in training mode
        # only the routed forward running is checked, not its numbers
        modes = {m: m.training for m in itertools.chain(self._skeleton.modules(), loaded.modules())}
        try:
            self._skeleton.eval()
            loaded.eval()
            with torch.no_grad():
                try:
                    base_out = _logits(self._skeleton(input_ids=x, use_cache=True))
                    alone = _logits(loaded(input_ids=x, use_cache=True))
                except Exception:
                    return  # not a model this probe can call (other required inputs): nothing to compare
                stack = []  # the multi-delta modules whose forward is running: the innermost one raised

                def enter(module, args, module_name):
                    stack.append(module_name)

                def leave(module, args, output):
                    if stack:
                        stack.pop()  # returns None: the output is left as it is

                hooks = []
                for module_name, module in self.multi_modules().items():
                    hooks.append(module.register_forward_pre_hook(lambda m, a, n=module_name: enter(m, a, n)))
                    hooks.append(module.register_forward_hook(leave))
                try:
                    with routing(Routing(torch.tensor([delta_id, BASE]))):
                        served = _logits(self.model(input_ids=x, use_cache=True))
                except Exception as e:
                    where = f"{stack[-1]}: " if stack else ""
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise UnsupportedDeltaError(
                        f"delta {name!r} cannot be served per row next to other rows: {where}a forward with one row "
                        f"routed to it and one to the base raised {type(e).__name__}: {reason[:400]} — serve this "
                        f"fine-tune alone with artifact.load_delta / DeltaCoMeModel.from_pretrained") from e
                finally:
                    for h in hooks:
                        h.remove()
        finally:
            for m, mode in modes.items():
                m.training = mode
        if self.model.training or served is None or alone is None or base_out is None or served.shape != alone.shape:
            return
        eps = max(torch.finfo(_dtype(self.model)).eps, torch.finfo(served.dtype).eps if served.is_floating_point() else 0)
        served, alone, base_out = served.float(), alone.float(), base_out.float()
        scale = max(alone.abs().max().item(), base_out.abs().max().item())
        tol = math.sqrt(eps) * scale
        err_delta = (served[0] - alone[0]).abs().max().item()
        gap = (alone[0] - base_out[0]).abs().max().item()
        err_base = (served[1] - base_out[1]).abs().max().item()
        if err_delta > max(0.05 * gap, tol) or err_base > tol or not (math.isfinite(err_delta) and math.isfinite(err_base)):
            raise UnsupportedDeltaError(
                f"delta {name!r} cannot be served per row next to other rows: a forward with one row routed to it and "
                f"one to the base gave rows that differ from each model alone (delta row: max |diff| {err_delta:.3g}, "
                f"the delta's own effect {gap:.3g}; base row: {err_base:.3g}) — serve this fine-tune alone with "
                f"artifact.load_delta / DeltaCoMeModel.from_pretrained")

    def _refuse_unservable(self, document: dict) -> None:
        """What a mixed batch cannot give each row as its model alone would, refused before any work: a
        config that differs from the base's in a field that changes the outputs (one batch runs one config)."""
        differ = {k: v for k, v in differing_fields(self._skeleton, document.get("model_config")).items() if k not in NEUTRAL}
        if differ:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(differ.items())[:3])
            raise UnsupportedDeltaError(
                f"the fine-tune's config differs from the base's ({shown}{', ...' if len(differ) > 3 else ''}); one "
                f"batch runs one config, so this delta cannot be served per row next to others — serve it alone with "
                f"artifact.load_delta / DeltaCoMeModel.from_pretrained, which applies the fine-tune's config")

    def _plan(self, loaded: torch.nn.Module, document: dict):
        """-> ({module: compressed weight}, {module: {leaf: tensor}}) of one delta loaded onto a structural
        copy; refuses what cannot be served per row. A tensor inside a module served as one unit (a
        mixture-of-experts block, or a module with parameters and children: `_unit_of`) — compressed
        (stacked experts, a shared expert's projections) or not (routers, norms) — is a replacement of
        that unit's tensor under its nested name."""
        layers, by_key, dense, refused = {}, {}, {}, []
        for name, spec in document["layers"].items():
            key = spec_key(name, spec)
            owner, leaf = _split(key)
            by_key[key] = loaded.get_submodule(owner)._parameters[leaf]
            unit = _unit_of(self._skeleton, owner)
            if unit != owner or by_key[key].dim() == 3:
                if not _serves_flat_tokens(self._skeleton.get_submodule(unit)) and by_key[key].dim() == 3:
                    refused.append(f"{key} (stacked experts outside a mixture-of-experts block)")
                dense.setdefault(unit, {})[key[len(unit) + 1:]] = by_key[key]
            else:
                layers[owner] = by_key[key]
        for alias, target in document.get("aliases", {}).items():  # a compressed table tied to lm_head
            if target in by_key:
                layers[_split(alias)[0]] = by_key[target]
        base_state = dict(self._skeleton.state_dict(keep_vars=True))
        kept_names = set(document.get("kept", []))
        kept_names |= {alias for alias, target in document.get("aliases", {}).items() if target in kept_names}
        for key in sorted(kept_names):
            value = get_tensor(loaded, key)
            if key in base_state and same(value.detach(), base_state[key].detach()):
                continue  # stored (e.g. saved without a base) but equal to the base's: nothing to serve
            owner, leaf = _split(key)
            unit = _unit_of(self._skeleton, owner)  # a parameter inside a unit is served by the unit
            owner, leaf = unit, key[len(unit) + 1:] if unit else key
            module = self._skeleton.get_submodule(owner) if owner else self._skeleton
            cls = wrapper_class(module)
            # a compressed layer's weight is never a kept tensor
            if cls is None or not cls.serves(module, leaf) or (owner in layers and leaf == "weight"):
                refused.append(f"{key} ({type(module).__name__})")
                continue
            dense.setdefault(owner, {})[leaf] = value.detach()
        if refused:
            raise UnsupportedDeltaError(
                f"the delta changes tensors that cannot be swapped per row: {few(refused)}; only "
                "compressed layers, nn.Embedding tables, nn.Linear weights/biases (e.g. lm_head) and parameters of "
                "modules with a batch-first forward (norms, MoE blocks) can be served in a mixed batch — serve this "
                "fine-tune alone with artifact.load_delta")
        return layers, dense

    def _multi(self, module_name: str) -> torch.nn.Module:
        """The multi-delta module at `module_name`, wrapping the base module there first if needed
        (with every loaded delta registered as 'base' in it). Caller holds the lock."""
        current = self.model.get_submodule(module_name)
        if isinstance(current, MultiDeltaLayer):
            return current
        try:
            wrapped = wrap_module(current, self.cache_dequantized)
        except UnsupportedDeltaError as e:
            raise UnsupportedDeltaError(f"{module_name}: {e}") from None
        for other, delta_id in self._ids.items():
            wrapped.add_delta(other, delta_id=delta_id)
        owner, leaf = _split(module_name)
        if wrapped is not current:
            self._originals.setdefault(module_name, current)
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
            self._documents.pop(name, None)
            for module in self.multi_modules().values():
                if name in module.delta_ids():
                    module.remove(name)

    def delta_nbytes(self, name: str) -> int:
        """Bytes held for one delta (packed factors, dequantized caches, dense copies)."""
        with self._lock:
            if name not in self._ids:
                raise UnknownDeltaError(f"no delta named {name!r}")
            return sum(m.delta_nbytes(name) for m in self.multi_modules().values())

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
        if deltas_disabled(self):  # inside disable_deltas(): every row runs the base
            ids = torch.full_like(ids, BASE)
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

    # --- PEFT-style controls (controls.py) ---

    def disable_deltas(self):
        """Context manager: inside it every row runs the base; the deltas stay loaded (PEFT's
        `disable_adapter()`). Per thread / task, like the routing."""
        return disable_deltas(self)

    def add_weighted_delta(self, name: str, weights: Mapping[str, float], *, out_dir: Optional[Union[str, os.PathLike]] = None,
                           method: Optional[str] = None, alpha: Optional[float] = None, group_size: Optional[int] = None,
                           allocation: Optional[str] = None) -> int:
        """Register `name` = Σ wᵢ · delta `i` of loaded deltas ({name: weight}): per layer the
        weighted sum of their dense deltas, re-compressed with the sources' method / alpha / group
        size (or the ones given) — the SVD of the weighted sum; kept tensors combined as
        `base + Σ wᵢ (tensorᵢ − base)`. The artifact is written to `out_dir` (kept) or a temporary
        directory. Returns the new delta's id."""
        import tempfile

        with self._lock:
            if name in self._ids:
                raise ValueError(f"a delta named {name!r} is already loaded; unload it first")
            documents = {n: self._documents[n] for n in weights if n in self._documents}
            missing = sorted(set(weights) - set(self._ids))
            if missing:
                raise UnknownDeltaError(f"no delta named {missing}; loaded: {sorted(self._ids)}")
            layers = self.multi_modules()
        options = dict(method=method, alpha=alpha, group_size=group_size, allocation=allocation)
        if out_dir is not None:
            path = weighted_artifact(layers, self._skeleton, documents, weights, out_dir, **options)
            return self.load_delta(name, path, verify="none")
        with tempfile.TemporaryDirectory(prefix="deltacome-weighted-") as tmp:
            path = weighted_artifact(layers, self._skeleton, documents, weights, os.path.join(tmp, name), **options)
            return self.load_delta(name, path, verify="none")

    def unload(self) -> torch.nn.Module:
        """Remove every delta and every multi-delta layer; return the base model with its original
        modules and tensors (PEFT's `unload()`). Raises `DeltaInUseError` while a routed forward runs."""
        with self._lock:
            busy = {d: n for d, n in self._pins.items() if n}
            if busy:
                raise DeltaInUseError(f"deltas {sorted(busy)} are used by running forward/generate calls; unload later")
            for module_name, original in sorted(self._originals.items(), key=lambda kv: -kv[0].count(".")):
                owner, leaf = _split(module_name)
                setattr(self.model.get_submodule(owner) if owner else self.model, leaf, original)
            self._originals.clear()
            self._ids.clear()
            self._pins.clear()
            self._documents.clear()
            return self.model
