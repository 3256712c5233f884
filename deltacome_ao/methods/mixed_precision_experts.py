"""Stacked experts of the SVD methods: `MixedPrecisionExpertsTensor`, E matrices as one weight.

Transformers 5 stores the experts of a mixture-of-experts layer as 3-D parameters (Mixtral's
`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I), Qwen2/3-MoE alike) and runs them
through `torch.nn.functional.grouped_mm` (its default experts implementation). Each expert matrix gets
its own delta (`MixedPrecisionDeltaTensor.from_hp`, same budget per matrix as any linear layer); this
kind stacks them so that a layer's experts are one weight, stored and served as one structure:

- the seven `PackedFactors` tensors hold every expert's singular vectors *band by band* (band b:
  `counts[b]` vectors of expert 0, then of expert 1, ...), so the whole stack unpacks with one call per
  band, not per expert; experts with fewer vectors (a delta of lower numerical rank) are padded with
  zero vectors to the common bands;
- `torch.nn.functional.grouped_mm(x, w.transpose(-2, -1), offs)` on it (what transformers' experts
  forward calls) runs one `deltacome::grouped_delta_linear` operator for all experts of the call:
  three grouped matmuls, the base term, `x V̂_eᵀ` and `· s_e Û_eᵀ`, each over all experts at once
  (`ops.grouped_delta_linear_reference`);
- `w[e]` (transformers' eager experts loop) is expert e as a `MixedPrecisionDeltaTensor`.

Attributes: `bits`, `counts` (per expert), `group_size`, `in_out` (0: shape (E, out, in), the layout of
Mixtral's experts; 1: (E, in, out), a stack used as `x @ w[e]`). The factors are always those of the
(out, in) matrices, the orientation `F.linear` uses.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..allocate import FP16_BITS, Band
from ..delta_tensor import DeltaTensor
from ..factors import PackedFactors
from ..ops import expert_major, grouped_delta_linear
from ..packing import band_offsets, pack_rows, unpack_rows
from . import register_kind
from .mixed_precision import MixedPrecisionDeltaTensor

__all__ = ["MixedPrecisionExpertsTensor"]

aten = torch.ops.aten


class MixedPrecisionExpertsTensor(DeltaTensor):
    """E expert matrices `W_e = W_base,e + Û_e diag(s_e) V̂_e` as one (E, out, in) weight (see the module
    docstring). `base_weight` is the stacked base parameter itself."""

    spec_ndim = 3
    tensor_data_names = ["base_weight", "v_packed", "v_scale", "v_zero", "u_packed", "u_scale", "u_zero", "s"]
    tensor_attribute_names = ["bits", "counts", "group_size", "in_out"]

    def __new__(cls, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size,
                in_out):
        return torch.Tensor._make_wrapper_subclass(
            cls, base_weight.shape, dtype=base_weight.dtype, device=base_weight.device, requires_grad=False
        )

    def __init__(self, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size,
                 in_out):
        super().__init__()
        self.base_weight = base_weight
        self.v_packed, self.v_scale, self.v_zero = v_packed, v_scale, v_zero
        self.u_packed, self.u_scale, self.u_zero = u_packed, u_scale, u_zero
        self.s = s
        self.bits = tuple(int(b) for b in bits)
        self.counts = tuple(int(c) for c in counts)
        self.group_size = int(group_size)
        self.in_out = int(in_out)
        _register_transformers_ops()

    # --- structure ---------------------------------------------------------------------------------

    @staticmethod
    def _matrix(shape, in_out) -> tuple[int, int, int]:
        experts, a, b = shape
        return (experts, b, a) if in_out else (experts, a, b)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of each expert matrix in `F.linear`'s orientation."""
        return self._matrix(tuple(self.shape), self.in_out)[1:]

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(Band(b, c) for b, c in zip(self.bits, self.counts))

    @property
    def factors(self) -> PackedFactors:
        """All experts' vectors as one `PackedFactors` (band b holds E·counts[b] vectors)."""
        out_features, in_features = self.matrix_shape
        return PackedFactors(self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero,
                             self.s, self.bits, tuple(c * self.num_experts for c in self.counts), self.group_size,
                             out_features, in_features)

    @classmethod
    def delta_layout(cls, shape, attributes):
        experts, out_features, in_features = cls._matrix(tuple(shape), attributes["in_out"])
        counts = [c * experts for c in attributes["counts"]]
        return PackedFactors.layout(attributes["bits"], counts, attributes["group_size"], out_features, in_features)

    @classmethod
    def check_attributes(cls, attributes):
        if attributes["in_out"] not in (0, 1) or isinstance(attributes["in_out"], bool):
            return f"in_out must be 0 or 1, got {attributes['in_out']!r}"
        return PackedFactors.check_bands(list(attributes["bits"]), list(attributes["counts"]), attributes["group_size"])

    def describe(self) -> str:
        bands = " ".join(f"{b}b×{c}" for b, c in zip(self.bits, self.counts)) or "(dropped)"
        return f"{self.num_experts} experts × {bands}"

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, weights: Sequence[MixedPrecisionDeltaTensor], in_out: int = 0) -> "MixedPrecisionExpertsTensor":
        """Stack E compressed (out, in) matrices. Their bands are merged by bit-width (per width, the largest
        count of any expert; the others padded with zero vectors, which add nothing to the product).
        `in_out=1` gives the (E, in, out) layout (each matrix transposed, the factors unchanged)."""
        weights = list(weights)
        if not weights or not all(isinstance(w, MixedPrecisionDeltaTensor) for w in weights):
            raise TypeError("stack MixedPrecisionDeltaTensor weights (at least one)")
        shape, group_size = tuple(weights[0].shape), weights[0].group_size
        if any(tuple(w.shape) != shape or w.group_size != group_size or w.dtype != weights[0].dtype for w in weights):
            raise ValueError("expert matrices of one stack must share shape, dtype and group size")
        widths = sorted({b for w in weights for b in w.bits}, reverse=True)
        counts = [max(sum(c for b, c in zip(w.bits, w.counts) if b == width) for w in weights) for width in widths]
        out_features, in_features = shape
        parts = {n: [] for n in ("v_packed", "v_scale", "v_zero", "u_packed", "u_scale", "u_zero", "s")}
        for width, count in zip(widths, counts):
            for factor, length in (("v", in_features), ("u", out_features)):
                codes, scales, zeros = zip(*(_band_rows(w, factor, width, count, length) for w in weights))
                parts[f"{factor}_packed"].append(pack_rows(torch.cat(codes), width))
                if width != FP16_BITS:
                    parts[f"{factor}_scale"].append(torch.cat(scales))
                    parts[f"{factor}_zero"].append(torch.cat(zeros))
            parts["s"].append(torch.cat([_band_s(w, width, count) for w in weights]))
        device = weights[0].base_weight.device
        empty = PackedFactors.layout((), (), group_size, out_features, in_features)
        tensors = []
        for name, items in parts.items():
            if items:
                tensors.append(torch.cat(items).to(device).contiguous())
            else:
                layout_shape, dtype = empty[name]
                tensors.append(torch.zeros(layout_shape, dtype=dtype, device=device))
        base = torch.stack([w.base_weight for w in weights])
        if in_out:
            base = base.transpose(-2, -1).contiguous()
        return cls(base, *tensors, tuple(widths), tuple(counts), group_size, in_out)

    # --- views ------------------------------------------------------------------------------------------

    def expert_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ûᵀ (E, r, out), s (E, r), V̂ (E, r, in)) in fp32, each expert's vectors in band order."""
        v, ut, s = expert_major(self.factors, self.num_experts, multiple=1)
        return ut, s, v

    def delta_weight(self) -> torch.Tensor:
        ut, s, v = self.expert_major()
        dense = torch.einsum("ero,er,eri->eoi", ut, s, v)
        return dense.transpose(-2, -1) if self.in_out else dense

    def delta_term(self, x):
        raise NotImplementedError("a stack of expert matrices is applied per expert (grouped_mm or w[e]), not as one linear")

    def linear(self, x, bias=None):
        raise NotImplementedError(
            f"F.linear on a stack of {self.num_experts} expert matrices: index one expert (w[e]) or use grouped_mm"
        )

    def transposed(self) -> "MixedPrecisionExpertsTensor":
        return type(self)(self.base_weight.transpose(-2, -1), *self.delta_tensors().values(), self.bits, self.counts,
                          self.group_size, 1 - self.in_out)

    def expert(self, e: int) -> DeltaTensor:
        """Expert `e` as a `MixedPrecisionDeltaTensor` of shape `self.shape[1:]` (its vectors copied out)."""
        experts = self.num_experts
        if not -experts <= e < experts:
            raise IndexError(f"expert {e} of a stack of {experts}")
        e %= experts
        out_features, in_features = self.matrix_shape
        f = self.factors
        parts = {}
        for factor, length in (("v", in_features), ("u", out_features)):
            packed, scale, zero = (getattr(f, f"{factor}_{n}") for n in ("packed", "scale", "zero"))
            chunks, scales, zeros, q_row = [], [], [], 0
            offsets = band_offsets(f.bits, f.counts, length)
            for width, count, (start, end) in zip(self.bits, self.counts, offsets):
                codes = unpack_rows(packed[start:end], width, count * experts, length)[e * count:(e + 1) * count]
                chunks.append(pack_rows(codes, width))
                if width != FP16_BITS:
                    scales.append(scale[q_row + e * count:q_row + (e + 1) * count])
                    zeros.append(zero[q_row + e * count:q_row + (e + 1) * count])
                    q_row += count * experts
            empty = PackedFactors.layout((), (), self.group_size, out_features, in_features)
            parts[f"{factor}_packed"] = torch.cat(chunks) if chunks else packed.new_zeros(0)
            parts[f"{factor}_scale"] = torch.cat(scales) if scales else scale.new_zeros(empty[f"{factor}_scale"][0])
            parts[f"{factor}_zero"] = torch.cat(zeros) if zeros else zero.new_zeros(empty[f"{factor}_zero"][0])
        starts = [sum(c * experts for c in self.counts[:i]) + e * c for i, c in enumerate(self.counts)]
        parts["s"] = torch.cat([self.s[a:a + c] for a, c in zip(starts, self.counts)]) if self.counts else self.s[:0]
        base = self.base_weight[e].transpose(-2, -1) if self.in_out else self.base_weight[e]
        one = PackedFactors.from_tensors(parts, self.bits, self.counts, self.group_size, out_features, in_features)
        w = MixedPrecisionDeltaTensor.from_factors(base, one)
        return w.transposed() if self.in_out else w

    def grouped_matmul(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """`torch.nn.functional.grouped_mm(x, self, offs)`: rows offs[e-1]:offs[e] of `x` times `self[e]`,
        every expert in one `deltacome::grouped_delta_linear` call."""
        if hasattr(self.base_weight, "tensor_data_names"):  # (not is_plain: under torch.compile it is a FakeTensor)
            raise NotImplementedError("stacked experts over a quantized base are not supported")
        # `x @ self[e]` = linear with self[e]ᵀ: the stored factors when in_out, else the transposed ones
        f = self.factors if self.in_out else self.factors.transposed()
        base = self.base_weight.transpose(-2, -1)  # (E, out', in') of the linear orientation
        per_expert = [c // self.num_experts for c in f.counts]
        return grouped_delta_linear(x, offs, base, *f.tensors().values(), list(f.bits), per_expert, f.group_size)


def _band_rows(w: MixedPrecisionDeltaTensor, factor: str, width: int, count: int, length: int):
    """(codes (count, L), scales, zeros) of `w`'s vectors of bit-width `width`, padded with zero vectors."""
    f = w.factors
    packed, scale, zero = (getattr(f, f"{factor}_{n}") for n in ("packed", "scale", "zero"))
    codes, scales, zeros, q_row = [], [], [], 0
    for b, c, (start, end) in zip(f.bits, f.counts, band_offsets(f.bits, f.counts, length)):
        if b == width:
            codes.append(unpack_rows(packed[start:end], b, c, length))
            if b != FP16_BITS:
                scales.append(scale[q_row:q_row + c])
                zeros.append(zero[q_row:q_row + c])
        if b != FP16_BITS:
            q_row += c
    groups = scale.shape[1]
    have = sum(t.shape[0] for t in codes)
    code_dtype = torch.float16 if width == FP16_BITS else torch.uint8
    codes.append(torch.zeros(count - have, length, dtype=code_dtype, device=packed.device))
    scales.append(torch.zeros(count - have, groups, dtype=torch.float16, device=packed.device))
    zeros.append(torch.zeros(count - have, groups, dtype=torch.uint8, device=packed.device))
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def _band_s(w: MixedPrecisionDeltaTensor, width: int, count: int) -> torch.Tensor:
    parts, start = [], 0
    for b, c in zip(w.bits, w.counts):
        if b == width:
            parts.append(w.s[start:start + c])
        start += c
    have = sum(p.numel() for p in parts)
    parts.append(torch.zeros(count - have, dtype=torch.float32, device=w.s.device))
    return torch.cat(parts).float()


implements = MixedPrecisionExpertsTensor.implements
implements_torch_function = MixedPrecisionExpertsTensor.implements_torch_function


@implements([aten.select.int])
def _(func, types, args, kwargs):
    w, dim, index = args[0], args[1], args[2]
    if dim % w.dim() != 0:
        raise NotImplementedError(f"{type(w).__name__}: select along dim {dim}; index experts along dim 0")
    return w.expert(int(index))


def _grouped(func, types, args, kwargs):
    x, w = args[0], args[1]
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if isinstance(x, DeltaTensor) or offs is None or kwargs.get("bias") is not None:
        raise NotImplementedError(f"{func}: only grouped_mm(x, experts, offs=...) is supported on stacked experts")
    return w.grouped_matmul(x, offs)


@implements([aten.bmm.default])
def _(func, types, args, kwargs):
    """`torch.bmm(x, experts)` (Llama 4's experts: x (E, T, in) against the (E, in, out) stack): the
    same grouped call, every expert's T rows in one block."""
    x, w = args[0], args[1]
    if isinstance(x, DeltaTensor) or x.dim() != 3 or x.shape[0] != w.num_experts:
        raise NotImplementedError(f"{type(w).__name__}: only torch.bmm(x (E, T, in), experts) is supported")
    experts, tokens, _ = x.shape
    offs = torch.arange(1, experts + 1, device=x.device, dtype=torch.int32) * tokens
    y = w.grouped_matmul(x.reshape(experts * tokens, x.shape[-1]), offs)
    return y.reshape(experts, tokens, y.shape[-1])


_GROUPED = [f for f in (getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f]
if _GROUPED:
    implements_torch_function(_GROUPED)(_grouped)
if hasattr(aten, "_grouped_mm"):
    implements([aten._grouped_mm.default])(_grouped)

_TRANSFORMERS_OPS: list = []


def _register_transformers_ops() -> None:
    """Once a stack exists: route transformers' `grouped_mm_fallback` operator (what its experts forward
    calls under torch.compile for non-bf16 weights) here too, if transformers defines it."""
    if _TRANSFORMERS_OPS:
        return
    _TRANSFORMERS_OPS.append(None)
    try:
        import transformers.integrations.moe  # noqa: F401  (defines the operator)

        packet = torch.ops.transformers.grouped_mm_fallback
    except (ImportError, AttributeError, RuntimeError):
        return
    for cls in [MixedPrecisionExpertsTensor, *MixedPrecisionExpertsTensor.__subclasses__()]:
        cls.implements([packet.default])(_grouped)
        cls.implements_torch_function([packet.default, packet])(_grouped)


@implements([aten.index.Tensor])
def _(func, types, args, kwargs):
    raise NotImplementedError(
        "indexing stacked compressed experts with a tensor of expert ids (transformers' experts_implementation="
        "'batched_mm') is not supported; use 'grouped_mm' (the default) or 'eager'"
    )


register_kind(MixedPrecisionExpertsTensor)
torch.serialization.add_safe_globals([MixedPrecisionExpertsTensor])
