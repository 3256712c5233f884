"""Stage 9 (integrations): one rank's part of a compressed linear layer, for tensor-parallel engines.

A tensor-parallel engine (vLLM; `deltacome_ao.vllm_plugin`) gives each rank a slice of every linear
layer: column-parallel layers cut the output features (each rank: `W[a:b, :]`), row-parallel ones
the input features (`W[:, a:b]`, the engine's all-reduce then sums the partial outputs), and fused
layers (vLLM's `qkv_proj`, `gate_up_proj`) stack several checkpoint matrices along the output dim,
each cut on its own. A compressed weight is cut with `DeltaTensor.sliced` (exact: the cut factor is
repacked, `slicing.py`), so a rank holds only packed codes of its own slice, and the result equals
the same rows / columns of the unsharded compressed weight.

This module knows no engine: `SubMatrix` is one checkpoint matrix inside a (maybe fused) layer;
`LayerShards` collects the stored inner tensors `<module>.weight:<inner>` of its sub-matrices as
the engine's loader streams them (each sub-matrix is cut as soon as its tensors are complete, so a
rank never holds more than one unsharded matrix's factors at a time), and `local_weights` then puts
each rank's slice of the base weight under the cut deltas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .delta_tensor import DeltaTensor
from .format import DeltaFormatError, assemble, tensor_class
from .slicing import shard_group_size

__all__ = ["SubMatrix", "LayerShards", "shard_range", "check_shardable"]

logger = logging.getLogger(__name__)
_WARNED: set = set()


def shard_range(full: int, local: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """[start, end) of this rank's `local` features out of `full`.

    `local == full`: not sharded. Otherwise the feature dim is cut into `full / local` equal parts,
    each held by `tp_size * local / full` consecutive ranks (vLLM replicates a kv head over several
    ranks when there are fewer kv heads than ranks)."""
    if local == full:
        return 0, full
    if local <= 0 or full % local or (tp_size * local) % full:
        raise ValueError(f"{full} features do not split into shards of {local} over {tp_size} ranks")
    replicas = tp_size * local // full
    start = (tp_rank // replicas) * local
    return start, start + local


def check_shardable(name: str, spec: Mapping, dim: int, start: int, end: int) -> Optional[str]:
    """A note when the cut is exact but costs memory: the shard starts off a quantization group
    boundary, so the factors are re-expressed with a finer group size (repeated scales)."""
    group = spec.get("group_size")
    if not isinstance(group, int) or start % group == 0:
        return None
    finer = shard_group_size(group, start)
    return (f"{name}: the shard [{start}, {end}) of dim {dim} ({'output' if dim == 0 else 'input'} features) "
            f"does not start on a group boundary (group_size {group}); it is served exactly with group "
            f"size {finer} ({group // finer}x the scale / zero-point bytes of this layer). Compress with a "
            f"group_size that divides every shard size to avoid this")


@dataclass(frozen=True)
class SubMatrix:
    """One checkpoint matrix `name` (its layer spec `spec`, None when stored dense) inside a layer:
    rows [offset, offset + local_out) of the rank's output, sliced from the full matrix as given."""

    name: str
    spec: Optional[dict]
    offset: int
    local_out: int
    out_range: tuple[int, int]
    in_range: tuple[int, int]

    @property
    def compressed(self) -> bool:
        return self.spec is not None


class LayerShards:
    """The rank's part of one linear layer whose sub-matrices (checkpoint names `names`, stacked
    along the output dim, `local_out` rows each on this rank) have layer specs in `specs` (a
    name missing there is a dense, uncompressed matrix)."""

    def __init__(self, names: Sequence[str], specs: Mapping[str, dict], local_out: Sequence[int], local_in: int,
                 tp_rank: int, tp_size: int, dtype: torch.dtype):
        if len(names) != len(local_out):
            raise ValueError(f"{len(names)} sub-matrices but {len(local_out)} output partitions")
        self.dtype = dtype
        self.subs: list[SubMatrix] = []
        offset = 0
        for name, out_j in zip(names, local_out):
            spec = specs.get(name)
            if spec is None:
                self.subs.append(SubMatrix(name, None, offset, out_j, (0, out_j), (0, local_in)))
            else:
                tensor_class(spec, name)  # a known kind
                full_out, full_in = spec["shape"]
                out_range = shard_range(full_out, out_j, tp_rank, tp_size)
                in_range = shard_range(full_in, local_in, tp_rank, tp_size)
                for dim, (a, b) in ((0, out_range), (1, in_range)):
                    note = check_shardable(name, spec, dim, a, b)
                    key = (tuple(spec["shape"]), dim, a, b, spec.get("group_size"))
                    if note and key not in _WARNED:  # once per kind of cut, not once per layer
                        _WARNED.add(key)
                        logger.warning(note + " (the same holds for every layer of this shape)")
                self.subs.append(SubMatrix(name, dict(spec), offset, out_j, out_range, in_range))
            offset += out_j
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._cut: dict[int, DeltaTensor] = {}

    @property
    def inner_names(self) -> list[str]:
        """Inner tensor names (`base_weight` first) of every compressed sub-matrix's kind."""
        names = dict.fromkeys(["base_weight"])
        for sub in self.subs:
            if sub.compressed:
                names.update(dict.fromkeys(tensor_class(sub.spec, sub.name).tensor_data_names[1:]))
        return list(names)

    @property
    def any_compressed(self) -> bool:
        return any(s.compressed for s in self.subs)

    def index(self, shard_id) -> int:
        """Sub-matrix index of an engine shard id: None (one matrix), an int, or "q" / "k" / "v"."""
        if shard_id is None:
            if len(self.subs) != 1:
                raise DeltaFormatError(f"{[s.name for s in self.subs]}: a tensor came without its sub-matrix id")
            return 0
        if isinstance(shard_id, str):
            return "qkv".index(shard_id)
        return int(shard_id)

    def add(self, inner: str, shard_id, tensor: torch.Tensor, device=None) -> None:
        """One stored inner tensor (not `base_weight`) of the sub-matrix `shard_id`, full size.
        When its sub-matrix is complete it is assembled (checked against its spec) and cut."""
        j = self.index(shard_id)
        sub = self.subs[j]
        if not sub.compressed:
            raise DeltaFormatError(f"{sub.name}: compressed-weight tensor {inner!r} for a matrix quantization_config "
                                   f"does not list as compressed")
        if j in self._cut:
            raise DeltaFormatError(f"{sub.name}.weight:{inner} loaded twice")
        parts = self._parts.setdefault(j, {})
        parts[inner] = tensor.detach().to(device if device is not None else tensor.device, copy=True)
        kind = tensor_class(sub.spec, sub.name)
        if set(parts) >= set(kind.tensor_data_names[1:]):
            self._cut[j] = self._cut_sub(sub, self._parts.pop(j))

    def _cut_sub(self, sub: SubMatrix, parts: dict[str, torch.Tensor]) -> DeltaTensor:
        full = tuple(sub.spec["shape"])
        # the base weight is sharded by the engine's own loader; here it only has to have the shape
        base = torch.empty(full, dtype=self.dtype, device="meta")
        w = assemble(sub.spec, {"base_weight": base, **parts}, where=sub.name, dtype=self.dtype)
        (o0, o1), (i0, i1) = sub.out_range, sub.in_range
        if (o0, o1) != (0, full[0]):
            w = w.sliced(0, o0, o1)
        if (i0, i1) != (0, full[1]):
            w = w.sliced(1, i0, i1)
        return w

    def missing(self) -> list[str]:
        """`<name>.weight:<inner>` of every compressed sub-matrix not (completely) loaded."""
        out = []
        for j, sub in enumerate(self.subs):
            if sub.compressed and j not in self._cut:
                have = self._parts.get(j, {})
                need = tensor_class(sub.spec, sub.name).tensor_data_names[1:]
                out += [f"{sub.name}.weight:{n}" for n in need if n not in have]
        return out

    def local_weights(self, base: torch.Tensor) -> list[Optional[DeltaTensor]]:
        """For each sub-matrix, its compressed weight over this rank's base rows `base[offset:offset +
        local_out]` (`base`: the rank's (Σ local_out, local_in) base, sharded by the engine), or None
        for a dense one. Raises `DeltaFormatError` naming any tensor that never arrived."""
        missing = self.missing()
        if missing:
            raise DeltaFormatError(f"compressed-weight tensors not in the checkpoint: {missing[:4]}"
                                   f"{' ...' if len(missing) > 4 else ''}")
        out = []
        for j, sub in enumerate(self.subs):
            if not sub.compressed:
                out.append(None)
                continue
            local = base.narrow(0, sub.offset, sub.local_out)
            w = self._cut[j]
            out.append(type(w)(local, *w.delta_tensors().values(), *w.attributes.values()))
        return out
