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

where `config` is the `DeltaCoMeConfig` (read the options you need from it: `alpha`, `group_size`,
..., and the method's own settings from `config.method_options`, declared with `options=` at
registration) and `hessian` (in, in) is Σ xᵀx / N of the layer's calibration inputs (only passed to
methods registered with `calibrated=True`).

The compressed weight must share no memory with the caller's `base` (copy it), unless
`base_handed_over(config)`: the caller made that base tensor for this call (read it from disk, cast
it) or copies it anyway (stacked experts), so the weight may hold it as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

__all__ = ["Method", "register_method", "unregister_method", "register_kind", "get_method", "method_names",
           "tensor_kinds", "tensor_kind", "ALLOCATIONS", "MethodFileWarning", "handing_over_base", "base_handed_over"]

# how a method may spend the budget (DeltaCoMeConfig.allocation): the paper's schedule, the error-optimal
# widths of each matrix, or one error-optimal allocation over the whole model (alpha then model-wide)
ALLOCATIONS = ("paper", "optimal", "global")


class MethodFileWarning(UserWarning):
    """A file in deltacome_ao/methods/ could not be imported; its methods are unavailable."""


@dataclass(frozen=True)
class Method:
    """One registered compression method (see the module docstring)."""

    name: str
    tensor: type
    compress: Callable
    calibrated: bool = False  # accepts a Hessian (GPTQ) from calibration data
    allocations: tuple[str, ...] = ("paper",)  # values of `DeltaCoMeConfig.allocation` it accepts
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)  # its own settings and their defaults


_METHODS: dict[str, Method] = {}
_KINDS: dict[str, type] = {}  # stored kinds that belong to no method of their own (e.g. stacked experts)


_HANDED_OVER = "_deltacome_base_handed_over"  # the attribute of a config copy from `handing_over_base`


def handing_over_base(config):
    """A shallow copy of `config` whose compress may keep the base tensor it is given inside the
    compressed weight, without copying it (`config` itself is left as it was). For callers whose base
    tensor nobody else holds or changes: one read from a checkpoint for this call (`compress_streaming`),
    a fresh cast of the caller's, or one the caller copies anyway (`stack` of experts)."""
    handed = copy.copy(config)
    object.__setattr__(handed, _HANDED_OVER, True)
    return handed


def base_handed_over(config) -> bool:
    """Whether `config` comes from `handing_over_base` (a compress function may skip its copy of the base)."""
    return bool(getattr(config, _HANDED_OVER, False))


def _check_tensor_class(name: str, tensor) -> None:
    from ..delta_tensor import DeltaTensor

    if not (isinstance(tensor, type) and issubclass(tensor, DeltaTensor)) or tensor is DeltaTensor:
        raise TypeError(f"method {name!r}: tensor must be a DeltaTensor subclass, got {tensor!r}")
    data, attrs = getattr(tensor, "tensor_data_names", None), getattr(tensor, "tensor_attribute_names", None)
    if not (isinstance(data, list) and data[:1] == ["base_weight"] and len(data) >= 2 and isinstance(attrs, list)):
        raise TypeError(f"method {name!r}: {tensor.__name__} needs tensor_data_names ['base_weight', <delta tensors>...] "
                        f"and a tensor_attribute_names list (docs/extending.md)")
    own = [k for k in tensor.__mro__ if k is not DeltaTensor and issubclass(k, DeltaTensor)]
    missing = [m for m in ("delta_layout", "delta_term", "delta_weight") if not any(m in k.__dict__ for k in own)]
    if missing:
        raise TypeError(f"method {name!r}: {tensor.__name__} must define {missing} (docs/extending.md)")


def register_method(name: str, tensor: type, compress: Callable, *, calibrated: bool = False,
                    allocations: tuple[str, ...] = ("paper",), description: str = "",
                    options: Optional[Mapping[str, Any]] = None) -> Method:
    """Add a method: `tensor` (a `DeltaTensor` subclass that stores it) and `compress` (see the module
    docstring). `calibrated`: accepts a Hessian (GPTQ). `allocations`: the `DeltaCoMeConfig.allocation`
    values it accepts (from `ALLOCATIONS`). `options`: its own settings {name: default} (JSON values),
    passed as `DeltaCoMeConfig(method_options={...})`.

    Raises TypeError / ValueError for a malformed registration, and ValueError when the name is taken
    (a name means one stored format; re-registering the identical method is a no-op)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method names are identifiers, got {name!r}")
    _check_tensor_class(name, tensor)
    if not callable(compress):
        raise TypeError(f"method {name!r}: compress must be callable, got {compress!r}")
    if not isinstance(calibrated, bool):
        raise TypeError(f"method {name!r}: calibrated must be True or False, got {calibrated!r}")
    if isinstance(allocations, str) or not allocations or any(a not in ALLOCATIONS for a in allocations):
        raise ValueError(f"method {name!r}: allocations must be a non-empty tuple from {ALLOCATIONS}, got {allocations!r}")
    options = dict(options or {})
    if not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise ValueError(f"method {name!r}: option names are identifiers, got {sorted(options)}")
    method = Method(name, tensor, compress, calibrated, tuple(allocations), description, options)
    old = _METHODS.get(name)
    if old is not None:
        same = (old.tensor.__qualname__, old.tensor.__module__, getattr(old.compress, "__qualname__", None)) == \
               (tensor.__qualname__, tensor.__module__, getattr(compress, "__qualname__", None))
        if not same:
            raise ValueError(f"method {name!r} is already registered (tensor {old.tensor.__name__}); pick another name")
    clash = next((m for m in _METHODS.values() if m.tensor.__name__ == tensor.__name__
                  and m.tensor.__qualname__ + m.tensor.__module__ != tensor.__qualname__ + tensor.__module__), None)
    if clash is not None:
        raise ValueError(f"another tensor class named {tensor.__name__} is registered (method {clash.name!r}); "
                         f"the class name is what artifacts store")
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove a registered method (tests, plugins that unload); KeyError if it is not registered."""
    if name not in _METHODS:
        raise KeyError(f"method {name!r} is not registered")
    return _METHODS.pop(name)


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
    """Import every module file of this folder; one that fails to import (e.g. an optional
    dependency missing) only loses its own methods, with a `MethodFileWarning`."""
    import importlib
    import pkgutil
    import warnings

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.ispkg:
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 — any failure of a method file stays local to it
            warnings.warn(f"deltacome_ao/methods/{info.name}.py could not be imported ({type(e).__name__}: {e}); "
                          f"its methods are unavailable", MethodFileWarning, stacklevel=2)


_import_method_files()  # each file registers itself at its end
