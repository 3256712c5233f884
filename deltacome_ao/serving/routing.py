"""Which batch row uses which delta: `Routing` (grouped once per step) and the `routing(...)` context.

Delta id `BASE` (-1) means base only. A `Routing` groups the rows by delta id once (a stable sort:
the segment table a segmented kernel takes); every multi-delta layer of the step reads it from a
context variable, so a model's forward needs no extra argument and threads do not interfere.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

__all__ = ["BASE", "Routing", "routing", "current_routing", "resolve_routing", "UnknownDeltaError",
           "DeltaInUseError", "UnsupportedDeltaError"]

BASE = -1  # delta id of rows that use the base model only


class UnknownDeltaError(LookupError):
    """A row asks for a delta id / name that is not loaded."""


class DeltaInUseError(RuntimeError):
    """A delta cannot be removed while a forward or generate routed to it is running."""


class UnsupportedDeltaError(ValueError):
    """The delta changes something that cannot be served per row (see docs/serving.md)."""


class Routing:
    """The row -> delta mapping of one batch, grouped once for every layer of the step.

    `ids` (B,) int64 on CPU, `BASE` (-1) = base only. `groups`: [(delta id, row indices)] for
    every delta id used, rows in ascending order. The row indices are cached per device.
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
    """Route every multi-delta layer called inside the block (in this thread / context) with per-row
    `delta_ids` (a (B,) int tensor or list, -1 = base, or a `Routing`). Layer-level only:
    `MultiDeltaModel.route` also validates and pins the deltas."""
    r = delta_ids if isinstance(delta_ids, Routing) else Routing(delta_ids)
    token = _ROUTING.set(r)
    try:
        yield r
    finally:
        _ROUTING.reset(token)


def resolve_routing(delta_ids, rows: int) -> Optional[Routing]:
    """The routing for an input of `rows` batch rows: `delta_ids` if given, else the context's.
    ValueError if its size differs from `rows`."""
    r = current_routing() if delta_ids is None else (delta_ids if isinstance(delta_ids, Routing) else Routing(delta_ids))
    if r is not None and r.batch != rows:
        raise ValueError(f"the routing has {r.batch} delta ids but the input has {rows} rows (dim 0)")
    return r
