"""Stage 5: `DeltaTensor`, the protocol every compressed delta weight implements.

A delta weight is `W = base_weight + Δ`, with Δ stored compressed. Each kind (Delta-CoMe's
mixed-precision SVD, BitDelta's sign + scale, ...) is one `DeltaTensor` subclass in a file of its
own; everything else — the artifact format, the Hugging Face loader, `delta_report`, serving, the
CLI — talks to a kind only through this class, so a new kind needs no edit outside its own file
(checklist: docs/extending.md). A subclass provides:

    tensor_data_names       ["base_weight", <the delta's inner tensors>...] (torchao's convention;
                            the constructor takes them in this order, then the attributes)
    tensor_attribute_names  JSON-able attributes (ints, tuples of ints), stored in the artifact
    delta_layout(shape, attributes) -> {inner name: (shape, dtype)}   every tensor but base_weight
    delta_term(x) -> fp32 (..., out)                                   x Δᵀ, without forming Δ
    delta_weight() -> fp32 (out, in)                                   Δ itself
    check_attributes(attributes) -> None or the reason they are invalid (optional)
    describe() -> short text of the structure, e.g. "8b×2 3b×32" (optional)
    low_rank_factors() -> PackedFactors or None (optional: batched multi-delta kernels)
    sliced(dim, start, end), transposed() -> DeltaTensor (optional: tensor parallelism, DTensor)

and gets, shared: the JSON `spec()` of a weight and its inverse `from_parts(spec, tensors)` (shapes
and dtypes checked against `inner_layout(spec)`), `shell(spec)` (an empty weight of that structure),
`delta_tensors()`, `delta_nbytes()`, `bits_per_param()`, `dequantize()`, `with_base()`, and the ops
`F.linear` (fp32 delta term added to the base matmul), `aten._to_copy` (a dtype change applies to
the base weight only: codes and scales keep theirs).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

__all__ = ["DeltaTensor", "DeltaSpecError", "DTYPE_NAMES", "dtype_name", "parse_dtype", "is_plain"]

aten = torch.ops.aten

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}
DTYPE_NAMES = tuple(_DTYPES)  # the dtype names the stored formats may use


class DeltaSpecError(ValueError):
    """A layer spec (the JSON structure of one compressed weight) is malformed or does not match its
    tensors. The artifact and checkpoint readers re-raise it as their own format error."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, where: str = "") -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise DeltaSpecError(f"{where}unsupported dtype {name!r}")
    return _DTYPES[name]


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def is_plain(t: torch.Tensor) -> bool:
    """A plain tensor or parameter (not a tensor subclass such as a quantized base). Under
    `torch.compile` a plain tensor is traced as a FakeTensor / FunctionalTensor: plain too, so eager and
    compiled code take the same path (the same op, the same rounding)."""
    return type(t) in _PLAIN_TYPES


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class DeltaTensor(TorchAOBaseTensor):
    """Base class of compressed delta weights (see the module docstring for the contract).

    Shape and dtype are the base weight's: (out_features, in_features) — or (in, out) for the
    transposed view a `Conv1D` holds, (E, out, in) for a stack of experts (`spec_ndim = 3`) — and the
    model dtype.
    """

    # dimensions of the weight: 2 for a matrix, 3 for a stack of expert matrices (`stack`)
    spec_ndim = 2

    # --- what a kind provides ---------------------------------------------------------------------

    @classmethod
    def delta_layout(cls, shape: tuple[int, int], attributes: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def delta_term(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def check_attributes(cls, attributes: Mapping[str, Any]) -> Optional[str]:
        return None

    def describe(self) -> str:
        return type(self).__name__

    def low_rank_factors(self):
        """The delta as `factors.PackedFactors` when the kind stores it that way (then serving batches
        it through the segmented kernel), else None (served through `delta_term`)."""
        return None

    def transposed(self) -> "DeltaTensor":
        """`Wᵀ` as a weight of the same kind (optional): what `w.t()`, `w.T` and the `x @ w` / `addmm`
        forms of transformers' `Conv1D` and of `x @ self.weight.T` layers (Falcon) run through."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be transposed: layers that multiply by Wᵀ (transformers' Conv1D, "
            f"`x @ weight.T`) need a kind that implements DeltaTensor.transposed"
        )

    @classmethod
    def stack(cls, weights: list) -> "DeltaTensor":
        """One weight of shape (E, out, in) from E weights of this kind (optional): how stacked expert
        parameters (transformers' MoE `experts.gate_up_proj`, ...) are stored and served."""
        raise NotImplementedError(f"{cls.__name__} cannot stack expert matrices")
    def sliced(self, dim: int, start: int, end: int) -> "DeltaTensor":
        """The compressed weight `W[start:end]` (dim 0) or `W[:, start:end]` (dim 1), exact, of the
        same kind (optional: tensor parallelism shards weights with it; see the ops at the end)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sliced")

    # --- shared -----------------------------------------------------------------------------------

    @property
    def attributes(self) -> dict[str, Any]:
        return {a: getattr(self, a) for a in self.tensor_attribute_names}

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """The stored delta: every inner tensor but `base_weight`."""
        return {n: getattr(self, n) for n in self.tensor_data_names[1:]}

    def delta_nbytes(self) -> int:
        """Bytes of everything stored for the delta (codes, scales, zero-points, S, ...)."""
        return sum(t.numel() * t.element_size() for t in self.delta_tensors().values())

    def bits_per_param(self) -> float:
        """Stored delta bits per weight parameter (1.0 = 1/16 of fp16)."""
        return 8 * self.delta_nbytes() / max(self.base_weight.numel(), 1)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense `W_base + Δ` in `output_dtype` (default the weight's dtype)."""
        base = self.base_weight if is_plain(self.base_weight) else self.base_weight.dequantize()
        return (base.float() + self.delta_weight()).to(output_dtype or self.dtype)

    def layout_mismatch(self) -> Optional[str]:
        """Why this weight's inner tensors differ from what its spec's layout says (None if they
        match): the check every reader applies, run at compress time instead of at load time."""
        try:
            layout = type(self).inner_layout(self.spec())
        except (DeltaSpecError, TypeError, ValueError) as e:
            return str(e)
        actual = {n: (tuple(getattr(self, n).shape), getattr(self, n).dtype) for n in self.tensor_data_names}
        wrong = [f"{n} is {tuple(shape)} {dtype_name(dt)}, the layout says {tuple(layout[n][0])} {dtype_name(layout[n][1])}"
                 for n, (shape, dt) in actual.items() if n != "base_weight" and (tuple(shape), dt) != (tuple(layout[n][0]), layout[n][1])]
        return "; ".join(wrong) or None

    def with_contiguous_parts(self) -> "DeltaTensor":
        """The same weight with every inner tensor contiguous: the layout every stored form (artifact,
        checkpoint) reloads with, so results before saving and after loading agree bit for bit."""
        if all(getattr(self, n).is_contiguous() for n in self.tensor_data_names):
            return self
        return type(self)(*(getattr(self, n).contiguous() for n in self.tensor_data_names), *self.attributes.values())

    def with_base(self, base_weight: torch.Tensor) -> "DeltaTensor":
        """The same delta over another base weight of the same shape and dtype — e.g. a torchao
        quantized copy of the base (`Int8Tensor`): `F.linear` then runs the base term through that
        tensor's own linear. Raises ValueError on a shape or dtype mismatch."""
        if tuple(base_weight.shape) != tuple(self.shape) or base_weight.dtype != self.dtype:
            raise ValueError(
                f"base weight {tuple(base_weight.shape)} {base_weight.dtype} does not match the delta's "
                f"{tuple(self.shape)} {self.dtype}"
            )
        return type(self)(base_weight, *self.delta_tensors().values(), *self.attributes.values())

    # --- the JSON structure of one weight (the artifact and HF formats store it) -------------------

    def spec(self) -> dict:
        """JSON-able structure: everything needed to rebuild the weight from its inner tensors."""
        spec = {
            "tensor": type(self).__name__,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "delta_bytes": int(self.delta_nbytes()),
        }
        for name, value in self.attributes.items():
            spec[name] = list(value) if isinstance(value, tuple) else value
        return spec

    @classmethod
    def attributes_from_spec(cls, spec: Mapping, where: str = "layer") -> dict[str, Any]:
        """The constructor attributes a spec describes (lists become tuples), validated."""
        if not isinstance(spec, Mapping):
            raise DeltaSpecError(f"{where}: a layer spec must be a JSON object, got {type(spec).__name__}")
        missing = [a for a in cls.tensor_attribute_names if a not in spec]
        if missing:
            raise DeltaSpecError(f"{where}: {cls.__name__} spec lacks {missing}")
        attributes = {a: tuple(spec[a]) if isinstance(spec[a], list) else spec[a] for a in cls.tensor_attribute_names}
        try:
            problem = cls.check_attributes(attributes)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
            problem = f"bad attributes {attributes} ({type(e).__name__}: {e})"
        if problem:
            raise DeltaSpecError(f"{where}: {problem}")
        return attributes

    @classmethod
    def check_spec(cls, spec: Mapping, where: str = "layer") -> None:
        """Raise `DeltaSpecError` if `spec` does not describe a weight of this kind."""
        attributes = cls.attributes_from_spec(spec, where)
        shape = spec.get("shape")
        if not (isinstance(shape, list) and len(shape) == cls.spec_ndim and all(_is_int(d) and d > 0 for d in shape)):
            raise DeltaSpecError(f"{where}: bad shape {shape!r}")
        dtype = parse_dtype(spec.get("dtype"), f"{where}: ")
        if not dtype.is_floating_point:
            raise DeltaSpecError(f"{where}: dtype {spec.get('dtype')!r}: a compressed weight has a floating-point dtype")
        if not (_is_int(spec.get("delta_bytes", 0)) and spec.get("delta_bytes", 0) >= 0):
            raise DeltaSpecError(f"{where}: bad delta_bytes {spec.get('delta_bytes')!r}")
        try:
            layout = cls.delta_layout(tuple(shape), attributes)
            nbytes = sum(math.prod(s) * torch.empty((), dtype=dt).element_size() for s, dt in layout.values())
        except (ValueError, TypeError, OverflowError, KeyError, IndexError) as e:
            raise DeltaSpecError(f"{where}: {e}") from None
        if "delta_bytes" in spec and spec["delta_bytes"] != nbytes:
            raise DeltaSpecError(f"{where}: delta_bytes {spec['delta_bytes']} does not match the structure it describes "
                                 f"({nbytes} bytes)")

    @classmethod
    def inner_layout(cls, spec: Mapping, dtype: Optional[torch.dtype] = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{inner tensor name: (shape, dtype)} of the weight `spec` describes, `base_weight` first
        (in `dtype`, default the spec's)."""
        cls.check_spec(spec)
        shape = tuple(spec["shape"])
        out = {"base_weight": (shape, dtype or parse_dtype(spec["dtype"]))}
        out.update(cls.delta_layout(shape, cls.attributes_from_spec(spec)))
        if list(out) != list(cls.tensor_data_names):
            raise TypeError(f"{cls.__name__}.delta_layout must list {cls.tensor_data_names[1:]} in order")
        return out

    @classmethod
    def shell(cls, spec: Mapping, device: Any = "meta", dtype: Optional[torch.dtype] = None) -> "DeltaTensor":
        """An uninitialised weight of the structure `spec` describes (every inner tensor empty)."""
        inner = [torch.empty(shape, dtype=dt, device=device) for shape, dt in cls.inner_layout(spec, dtype).values()]
        return cls(*inner, *cls.attributes_from_spec(spec).values())

    @classmethod
    def from_parts(cls, spec: Mapping, tensors: Mapping[str, torch.Tensor], where: str = "layer",
                   dtype: Optional[torch.dtype] = None) -> "DeltaTensor":
        """The weight `spec` describes, from its inner tensors (`base_weight` included), checking
        that exactly the expected tensors are there with the expected shapes and dtypes.
        `base_weight` is cast to `dtype` (default the spec's) — the only inner tensor whose dtype may
        differ from the layout. Raises `DeltaSpecError` on any mismatch."""
        try:
            layout = cls.inner_layout(spec, dtype)
        except DeltaSpecError as e:
            raise DeltaSpecError(f"{where}: {e}") from None
        missing, extra = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
        if missing or extra:
            raise DeltaSpecError(f"{where}: inner tensors missing {missing}, unexpected {extra}")
        inner = []
        for name, (shape, dt) in layout.items():
            t = tensors[name]
            if name == "base_weight" and t.dtype != dt and t.is_floating_point():
                t = t.to(dt)
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise DeltaSpecError(
                    f"{where}: {name} is {tuple(t.shape)} {dtype_name(t.dtype)}, the layer's structure "
                    f"({cls.__name__} {cls.attributes_from_spec(spec)}) needs {tuple(shape)} {dtype_name(dt)}"
                )
            inner.append(t.contiguous())
        return cls(*inner, *cls.attributes_from_spec(spec).values())

    def same_structure(self, other: Any) -> bool:
        """`other` is a compressed weight of this kind with the same shape, attributes and inner
        tensor shapes and dtypes (what `copy_` between two weights needs)."""
        return (type(other) is type(self) and tuple(other.shape) == tuple(self.shape) and other.attributes == self.attributes
                and all(getattr(other, n).shape == getattr(self, n).shape and getattr(other, n).dtype == getattr(self, n).dtype
                        for n in self.tensor_data_names))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        table = cls._ATEN_OP_TABLE.get(cls, {})
        if func in table:
            return table[func](func, types, args, kwargs or {})
        raise NotImplementedError(unsupported_op_message(cls.__name__, func))
    def delta_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of Δ in fp32, shape (*ids.shape, in): what an embedding table adds to the base's
        rows (`F.embedding` on a compressed table). Kinds override it to avoid forming Δ."""
        return torch.nn.functional.embedding(ids, self.delta_weight())

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """`F.embedding(ids, W)` for a compressed table: the base rows plus the fp32 delta rows, rounded once."""
        base = self.base_weight if is_plain(self.base_weight) else self.base_weight.dequantize()
        rows = torch.nn.functional.embedding(ids, base)
        return (rows.float() + self.delta_rows(ids)).to(self.dtype)

    def rlinear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x W + b` with this weight used as an (in, out) matrix (transformers' `Conv1D` stores its
        weight that way; `x @ weight.T` layers multiply by such a view): `linear` of `Wᵀ`."""
        return self.transposed().linear(x, bias)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x Wᵀ + b`: the base matmul in the input dtype plus the fp32 delta term, rounded once."""
        y = torch.nn.functional.linear(x, self.base_weight if not is_plain(self.base_weight)
                                       else self.base_weight.to(x.dtype))
        y = (y.float() + self.delta_term(x)).to(x.dtype)
        return y if bias is None else y + bias


def unsupported_op_message(kind: str, op: Any) -> str:
    """The one error for an operation a compressed weight does not implement."""
    return (
        f"{kind} (a compressed delta weight) does not support {op}. Compressed weights support F.linear (and "
        f"x @ W / addmm / F.embedding where the kind allows), .t(), row / column slices and split (tensor "
        f"parallelism), .to(device / dtype), detach / clone, copy_ from a compressed weight of the same structure "
        f"and empty_like (model.to_empty); for anything else use weight.dequantize() (the dense W_base + delta) or "
        f"model.dequantize(). To quantize the base under the deltas use deltacome_ao.optimum.quantize_base_(model, "
        f"config), not torchao's quantize_ on the compressed model."
    )


implements = DeltaTensor.implements
implements_torch_function = DeltaTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return w.linear(x, bias)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """A device move applies to every inner tensor, a dtype change to the base weight only."""
    w = args[0]
    device, dtype = kwargs.get("device") or w.device, kwargs.get("dtype")
    base = w.base_weight.to(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else None)
    moved = [t.to(device) for t in w.delta_tensors().values()]
    return type(w)(base, *moved, *w.attributes.values())


@implements(aten.empty_like.default)
def _(func, types, args, kwargs):
    """An uninitialised weight of the same structure (what `model.to_empty(device=...)` builds); a
    dtype applies to the base weight only, as for `.to`."""
    w = args[0]
    device, dtype = kwargs.get("device") or w.device, kwargs.get("dtype")
    base = torch.empty_like(w.base_weight, device=device,
                            dtype=dtype if dtype is not None and dtype.is_floating_point else None)
    return type(w)(base, *(torch.empty_like(t, device=device) for t in w.delta_tensors().values()),
                   *w.attributes.values())


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    """Copy every inner tensor from a compressed weight of the same structure; anything else is a
    short ValueError (e.g. `plain_model.load_state_dict(compressed.state_dict())`)."""
    dst, src = args[0], args[1]
    if isinstance(dst, DeltaTensor) and dst.same_structure(src):
        for name in dst.tensor_data_names:
            getattr(dst, name).copy_(getattr(src, name))
        return dst

    def describe(t):
        if isinstance(t, DeltaTensor):
            return f"a compressed {type(t).__name__} {tuple(t.shape)} {t.attributes}"
        return f"a plain {tuple(t.shape)} {dtype_name(t.dtype)} tensor" if isinstance(t, torch.Tensor) else repr(t)[:80]

    if not isinstance(dst, DeltaTensor):
        hint = ("copy its dequantize() instead (for a state dict: {k: v.dequantize() if isinstance(v, DeltaTensor) "
                "else v ...}), or load it into a model compressed with the same structure")
    else:
        hint = "a compressed weight can only be copied from one of the same kind, shape and bands"
    raise ValueError(f"copy_: cannot copy {describe(src)} into {describe(dst)}; {hint}")
# --- a weight used as an (in, out) matrix: Conv1D's addmm, `x @ W.T` -------------------------------------


def _is_matrix(w) -> bool:
    return isinstance(w, DeltaTensor) and w.spec_ndim == 2 and w.dim() == 2


@implements([aten.t.default])
def _(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0].transposed())


@implements([aten.permute.default])
def _(func, types, args, kwargs):
    w, dims = args[0], [d % args[0].dim() for d in args[1]]
    if w.dim() == 2 and dims == [1, 0]:
        return return_and_correct_aliasing(func, args, kwargs, w.transposed())
    if w.dim() == 3 and dims == [0, 2, 1]:
        return return_and_correct_aliasing(func, args, kwargs, w.transposed())
    raise NotImplementedError(f"{type(w).__name__}: permute{tuple(args[1])} is not supported")


@implements([aten.transpose.int])
def _(func, types, args, kwargs):
    w = args[0]
    dims = sorted(d % w.dim() for d in args[1:3])
    if dims == [w.dim() - 2, w.dim() - 1]:
        return return_and_correct_aliasing(func, args, kwargs, w.transposed())
    raise NotImplementedError(f"{type(w).__name__}: transpose{tuple(args[1:3])} is not supported")


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm])
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    if _is_matrix(w) and not isinstance(x, DeltaTensor):
        return w.rlinear(x)
    mm = func in (torch.mm, torch.Tensor.mm)
    if _is_matrix(x) and isinstance(w, torch.Tensor) and not isinstance(w, DeltaTensor) and (
            w.dim() == 2 if mm else w.dim() >= 1):
        # the weight on the left, `W @ X` (Jamba's dt_proj: weight @ time_step (B, in, S)): (Xᵀ Wᵀ)ᵀ
        if w.dim() == 1:
            return torch.nn.functional.linear(w, x)
        return torch.nn.functional.linear(w.transpose(-2, -1), x).transpose(-2, -1)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@implements_torch_function([torch.addmm, torch.Tensor.addmm])
def _(func, types, args, kwargs):
    bias, x, w = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if _is_matrix(w) and not isinstance(x, DeltaTensor) and beta == 1 and alpha == 1 and len(args) == 3:
        return w.rlinear(x, bias)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@implements_torch_function([torch.nn.functional.embedding])
def _(func, types, args, kwargs):
    ids = args[0]
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    if _is_matrix(w) and not isinstance(ids, DeltaTensor) and max_norm is None:
        return w.embedding(ids)  # padding_idx, scale_grad_by_freq, sparse only concern gradients
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)
# --- slices and transposes: the ops tensor parallelism runs (DTensor, vLLM; docs/vllm.md) ----------
#
# A slice of a compressed weight is a compressed weight of the slice (`DeltaTensor.sliced`, which each
# kind implements exactly, e.g. by repacking its codes), never a dense copy; a transpose is the
# compressed weight of the transpose (`transposed`). `mm` / `addmm` against a transposed weight (what
# `F.linear` decomposes into under DTensor) run the kind's own linear.


def _slice_bounds(w: torch.Tensor, dim: int, start, end) -> tuple[int, int, int]:
    dim = dim % w.ndim
    size = w.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    return dim, max(0, min(start, size)), max(0, min(end, size))


def _piece(w: "DeltaTensor", dim: int, start: int, end: int) -> "DeltaTensor":
    if start == 0 and end == w.shape[dim]:
        return _shallow(w)
    if end <= start:
        raise NotImplementedError(f"an empty slice of a {type(w).__name__} (dim {dim}, [{start}, {end}))")
    return w.sliced(dim, start, end)


def _shallow(w: "DeltaTensor") -> "DeltaTensor":
    return type(w)(*(getattr(w, n) for n in w.tensor_data_names), *w.attributes.values())


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    w, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    if step != 1:
        raise NotImplementedError(f"a strided slice (step {step}) of a {type(w).__name__}")
    dim, start, end = _slice_bounds(w, dim, start, end)
    return _piece(w, dim, start, end)


@implements([aten.split.Tensor, aten.split_with_sizes.default])
def _(func, types, args, kwargs):
    w, sizes = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % w.ndim
    total = w.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    out, start = [], 0
    for size in sizes:
        out.append(_piece(w, dim, start, start + size))
        start += size
    return out


@implements([aten.detach.default, aten.alias.default])
def _(func, types, args, kwargs):
    return _shallow(args[0])


@implements(aten.clone.default)
def _(func, types, args, kwargs):
    w = args[0]
    return type(w)(*(getattr(w, n).clone() for n in w.tensor_data_names), *w.attributes.values())


@implements(aten.view.default)
def _(func, types, args, kwargs):
    """Only the identity view (what `DTensor.from_local` and `view_as` take)."""
    w, shape = args[0], list(args[1])
    if -1 in shape and shape.count(-1) == 1:
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        shape[shape.index(-1)] = w.numel() // max(known, 1)
    if tuple(shape) != tuple(w.shape):
        raise NotImplementedError(f"a {type(w).__name__} of shape {tuple(w.shape)} cannot be viewed as {tuple(shape)}")
    return _shallow(w)


@implements(aten.mm.default)
def _(func, types, args, kwargs):
    """`x @ Wᵀ` with the transposed weight second: the kind's linear, never a dense weight."""
    x, wt = args
    if not isinstance(wt, DeltaTensor) or isinstance(x, DeltaTensor):
        raise NotImplementedError("mm with a compressed weight is supported as x @ Wᵀ only")
    return wt.transposed().linear(x)


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, x, wt = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if not isinstance(wt, DeltaTensor) or isinstance(x, DeltaTensor) or beta != 1 or alpha != 1:
        raise NotImplementedError("addmm with a compressed weight is supported as bias + x @ Wᵀ only")
    return wt.transposed().linear(x, bias)
