"""The compression methods: one file per method in this folder, and the registry of them.

Each file defines a `DeltaTensor` subclass (the stored kind) and ends with its registration line:

    register_method("bitdelta", BitDeltaTensor, compress_bitdelta, description="sign + one scale")

Every module in this folder is imported when the registry is first used, so adding a method is
adding one file here (docs/extending.md); a method defined outside the package registers the same
way once its module is imported. The config validates names and options against this table, the
CLI offers its names, and the artifact and Hugging Face readers find tensor classes in it by name —
nothing else lists methods.

    mixed_precision.py   MixedPrecisionDeltaTensor: "deltacome" (Delta-CoMe), "single", "lowrank"
    mixed_precision_experts.py   MixedPrecisionExpertsTensor: what MixedPrecisionDeltaTensor.stack
                         returns for stacked MoE experts (a kind without a method: `register_kind`)
    bitdelta.py          BitDeltaTensor: "bitdelta" (BitDelta's sign + scale)

A compress function has the signature

    compress(finetuned (out, in), base (out, in), config, *, name: str, hessian=None) -> DeltaTensor

where `config` is the `DeltaCoMeConfig` (read the options you need from it) and `hessian` (in, in)
is Σ xᵀx / N of the layer's calibration inputs (only passed to methods registered with
`calibrated=True`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Method", "register_method", "register_kind", "get_method", "method_names", "tensor_kinds", "tensor_kind"]


@dataclass(frozen=True)
class Method:
    """One registered compression method (see the module docstring)."""

    name: str
    tensor: type
    compress: Callable
    calibrated: bool = False  # accepts a Hessian (GPTQ) from calibration data
    allocations: tuple[str, ...] = ("paper",)  # values of `DeltaCoMeConfig.allocation` it accepts
    description: str = ""


_METHODS: dict[str, Method] = {}
_KINDS: dict[str, type] = {}  # stored kinds that belong to no method of their own (e.g. stacked experts)


def register_method(name: str, tensor: type, compress: Callable, *, calibrated: bool = False,
                    allocations: tuple[str, ...] = ("paper",), description: str = "") -> Method:
    """Add a method; `tensor` must be a `DeltaTensor` subclass. Re-registering a name with a
    different tensor class raises ValueError (a name means one stored format)."""
    from ..delta_tensor import DeltaTensor

    if not (isinstance(tensor, type) and issubclass(tensor, DeltaTensor)):
        raise TypeError(f"method {name!r}: tensor must be a DeltaTensor subclass, got {tensor!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method names are identifiers, got {name!r}")
    old = _METHODS.get(name)
    if old is not None and old.tensor.__name__ != tensor.__name__:
        raise ValueError(f"method {name!r} is already registered with {old.tensor.__name__}")
    clash = next((m for m in _METHODS.values() if m.tensor.__name__ == tensor.__name__ and m.tensor is not tensor), None)
    if clash is not None:
        raise ValueError(f"another tensor class named {tensor.__name__} is registered (method {clash.name!r})")
    method = Method(name, tensor, compress, calibrated, tuple(allocations), description)
    _METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError naming the choices otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {method_names()}")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """Registered names: the default "deltacome" first, then alphabetical (independent of import order)."""
    return tuple(sorted(_METHODS, key=lambda n: (n != "deltacome", n)))


def register_kind(tensor: type) -> type:
    """Make a `DeltaTensor` class readable from artifacts and checkpoints without a method of its own:
    a kind another kind's `stack` returns (stacked experts). Returns the class."""
    from ..delta_tensor import DeltaTensor

    if not (isinstance(tensor, type) and issubclass(tensor, DeltaTensor)):
        raise TypeError(f"register_kind needs a DeltaTensor subclass, got {tensor!r}")
    old = _KINDS.get(tensor.__name__)
    if old is not None and old is not tensor:
        raise ValueError(f"another tensor class named {tensor.__name__} is registered")
    _KINDS[tensor.__name__] = tensor
    return tensor


def tensor_kinds() -> dict[str, type]:
    """{tensor class name: class} of every registered method and kind (the names stored in artifacts)."""
    return {**_KINDS, **{m.tensor.__name__: m.tensor for m in _METHODS.values()}}


def tensor_kind(name) -> type:
    """The tensor class stored under `name`; KeyError naming the known ones otherwise."""
    kinds = tensor_kinds()
    if not isinstance(name, str) or name not in kinds:
        raise KeyError(f"unknown tensor type {name!r}; expected one of {sorted(kinds)}")
    return kinds[name]


def _import_method_files() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_method_files()  # each file registers itself at its end
