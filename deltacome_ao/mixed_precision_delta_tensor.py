"""Stage 5: `MixedPrecisionDeltaTensor`, a weight stored as base + mixed-precision SVD delta.

`from_hp` runs the whole offline pipeline for one matrix (delta → SVD → bit allocation → RTN
quantization → packing); the tensor itself only holds the packed result, and `F.linear` on it calls
the `deltacome::delta_linear` operator without forming the dense delta.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from .allocate import (
    FP16_BITS,
    OPTIMAL_CANDIDATES,
    PAPER_SCHEDULE,
    Band,
    allocate,
    bands_from_widths,
    budget_bits,
    candidate_costs,
    error_table,
    max_candidate_vectors,
    optimal_allocation,
    vector_cost_bits,
)
from .decompose import delta_svd, weight_delta
from .gptq import gptq_input_groups, gptq_output_groups
from .ops import delta_linear, delta_only_linear, dequantize_factors
from .packing import pack_rows
from .quantize import dequantize_rows, quantize_rows

__all__ = ["MixedPrecisionDeltaTensor", "BudgetTooSmallError"]

aten = torch.ops.aten


class BudgetTooSmallError(ValueError):
    pass


def _quantize_factor(rows: torch.Tensor, bands, group_size: int, quantizer):
    """Quantize and pack the rows of one factor band by band -> (packed, scale, zero)."""
    quantized, start = [], 0
    for band in bands:
        quantized.append(quantizer(rows[start:start + band.count], band.bits, group_size))
        start += band.count
    return _pack_factor(quantized, rows.shape[1], group_size)


def _pack_factor(quantized, length: int, group_size: int):
    """Pack one factor's `QuantizedRows`, one per band in band order -> (packed, scale, zero)."""
    packed, scales, zeros = [], [], []
    for q in quantized:
        band = Band(q.bits, q.codes.shape[0])
        packed.append(pack_rows(q.codes, band.bits))
        if band.bits != FP16_BITS:
            scales.append(q.scale)
            zeros.append(q.zero)
    groups = math.ceil(length / group_size)
    scale = torch.cat(scales) if scales else torch.zeros(0, groups, dtype=torch.float16)
    zero = torch.cat(zeros) if zeros else torch.zeros(0, groups, dtype=torch.uint8)
    packed = torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)
    return packed, scale, zero


def _rtn(rows, bits, group_size):
    return quantize_rows(rows, bits, group_size)


class MixedPrecisionDeltaTensor(TorchAOBaseTensor):
    """Weight `W_base + Û diag(s) V̂`, with Û and V̂ quantized in bands of decreasing bit-width.

    Tensor data: `base_weight` (out, in) in the model dtype; `v_packed` / `u_packed` flat uint8
    codes of V̂ (rows of length `in`) and Ûᵀ (rows of length `out`), band after band; `v_scale`,
    `v_zero`, `u_scale`, `u_zero` (rows of quantized bands, groups) fp16 / uint8; `s` (rank,) fp32.
    Attributes: `bits` and `counts` (one entry per band) and `group_size`.
    """

    tensor_data_names = ["base_weight", "v_packed", "v_scale", "v_zero", "u_packed", "u_scale", "u_zero", "s"]
    tensor_attribute_names = ["bits", "counts", "group_size"]

    def __new__(cls, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
        return torch.Tensor._make_wrapper_subclass(
            cls, base_weight.shape, dtype=base_weight.dtype, device=base_weight.device, requires_grad=False
        )

    def __init__(self, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
        super().__init__()
        self.base_weight = base_weight
        self.v_packed, self.v_scale, self.v_zero = v_packed, v_scale, v_zero
        self.u_packed, self.u_scale, self.u_zero = u_packed, u_scale, u_zero
        self.s = s
        self.bits = tuple(int(b) for b in bits)
        self.counts = tuple(int(c) for c in counts)
        self.group_size = int(group_size)

    @classmethod
    def from_hp(
        cls,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        alpha: float = 1 / 16,
        schedule=PAPER_SCHEDULE,
        bands=None,
        group_size: int = 128,
        svd: str = "auto",
        quantizer=_rtn,
        name: str = "weight",
        allocation: str = "paper",
        candidates=OPTIMAL_CANDIDATES,
        hessian: torch.Tensor | None = None,
        damp: float = 0.01,
        act_order: bool = True,
        target_correction: bool = False,
    ) -> "MixedPrecisionDeltaTensor":
        """Compress `finetuned - base`.

        `bands` ([(bits, count), ...]) fixes the allocation; otherwise `allocation="paper"` fills
        `schedule` within `alpha` (see `allocate.allocate`) and `allocation="optimal"` gives every
        singular vector its own width from `candidates` (0 = dropped) minimising the measured
        σ²-weighted error within `alpha` (see `allocate.optimal_allocation`); the vectors are then
        stored grouped by width, widest first. `quantizer(rows, bits, group_size) -> QuantizedRows`
        is the seam for data-free quantizers (RTN by default).

        `hessian` (in, in), the Σ xᵀx of this layer's calibration inputs, switches both factors to
        GPTQ (`gptq.py`; `damp`, `act_order`, group size `group_size`) and makes the optimal
        allocation measure errors in output space. `target_correction` then quantizes Û toward the
        least-squares target that best reproduces the full delta's outputs given the quantized V̂
        (regularised toward the SVD's Û with `damp`).
        """
        delta = weight_delta(finetuned, base, name)
        out_features, in_features = delta.shape
        if allocation not in ("paper", "optimal"):
            raise ValueError(f"unknown allocation {allocation!r}; use 'paper' or 'optimal'")
        if hessian is not None and tuple(hessian.shape) != (in_features, in_features):
            raise ValueError(f"{name}: hessian has shape {tuple(hessian.shape)}, expected {(in_features, in_features)}")
        optimal = bands is None and allocation == "optimal"
        if optimal:
            for b in candidates:
                if b != 0:
                    vector_cost_bits(b, out_features, in_features, group_size)  # validates the width
            max_rank = max_candidate_vectors(out_features, in_features, alpha, candidates, group_size)
            if max_rank == 0 and torch.any(delta):
                raise _budget_error(name, alpha, out_features, in_features, [b for b in candidates if b], group_size)
        elif bands is None:
            chosen = allocate(out_features, in_features, alpha, schedule, group_size)
            if not chosen and torch.any(delta):
                raise _budget_error(name, alpha, out_features, in_features, [b for b, _ in schedule], group_size)
            max_rank = sum(b.count for b in chosen)
        else:
            chosen = tuple(Band(int(b), int(c)) for b, c in bands)
            for b in chosen:
                vector_cost_bits(b.bits, out_features, in_features, group_size)  # validates the width
            max_rank = sum(b.count for b in chosen)
        svd_out = delta_svd(delta, rank=max_rank, method=svd)
        u_rows, s, v_rows = svd_out.U.T, svd_out.S, svd_out.Vh
        # Scale each singular vector to max |x| = 1 so group scales stay in fp16's normal range.
        u_max = u_rows.abs().amax(dim=1).clamp_min(1e-30) if s.numel() else s
        v_max = v_rows.abs().amax(dim=1).clamp_min(1e-30) if s.numel() else s
        u_rows, v_rows, s = u_rows / u_max[:, None], v_rows / v_max[:, None], s * u_max * v_max
        if optimal:
            chosen, perm = _optimal_bands(
                u_rows, s, v_rows, candidates, budget_bits(out_features, in_features, alpha), group_size,
                quantizer, hessian, damp, act_order,
            )
        else:
            chosen = _truncate(chosen, svd_out.rank)
            perm = torch.arange(sum(b.count for b in chosen), device=s.device)
        u_rows, s, v_rows = u_rows[perm], s[perm], v_rows[perm]
        if hessian is None:
            v_packed, v_scale, v_zero = _quantize_factor(v_rows, chosen, group_size, quantizer)
            u_packed, u_scale, u_zero = _quantize_factor(u_rows, chosen, group_size, quantizer)
        else:
            v_q, u_q, s = _gptq_factors(
                u_rows, s, v_rows, chosen, hessian, group_size, damp, act_order,
                target=delta if target_correction else None,
            )
            v_packed, v_scale, v_zero = _pack_factor(v_q, in_features, group_size)
            u_packed, u_scale, u_zero = _pack_factor(u_q, out_features, group_size)
        device = base.device
        return cls(
            base.detach().clone().contiguous(),
            v_packed.to(device), v_scale.to(device), v_zero.to(device),
            u_packed.to(device), u_scale.to(device), u_zero.to(device),
            s.float().contiguous().to(device),
            [b.bits for b in chosen], [b.count for b in chosen], group_size,
        )

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(Band(b, c) for b, c in zip(self.bits, self.counts))

    @property
    def rank(self) -> int:
        return sum(self.counts)

    def delta_nbytes(self) -> int:
        """Bytes of everything stored for the delta (codes, scales, zero-points, S)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero, self.s)
        )

    def bits_per_param(self) -> float:
        return 8 * self.delta_nbytes() / self.base_weight.numel()

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Û (out, r), s (r,), V̂ (r, in)) in fp32."""
        v, ut = dequantize_factors(*self.base_weight.shape, self.v_packed, self.v_scale, self.v_zero, self.u_packed,
                                   self.u_scale, self.u_zero, self.bits, self.counts, self.group_size)
        return ut.T, self.s, v

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        u, s, v = self.delta_factors()
        w = _dense(self.base_weight).float() + (u * s) @ v
        return w.to(output_dtype or self.dtype)

    def with_base(self, base_weight: torch.Tensor) -> "MixedPrecisionDeltaTensor":
        """The same delta over another base weight of the same shape and dtype — e.g. a torchao
        quantized copy of the base (`Int8Tensor`): `F.linear` then runs the base term through that
        tensor's own linear and only the delta through `deltacome::delta_only_linear`."""
        if tuple(base_weight.shape) != tuple(self.shape) or base_weight.dtype != self.dtype:
            raise ValueError(
                f"base weight {tuple(base_weight.shape)} {base_weight.dtype} does not match the delta's "
                f"{tuple(self.shape)} {self.dtype}"
            )
        inner = [getattr(self, n) for n in self.tensor_data_names[1:]]
        return MixedPrecisionDeltaTensor(base_weight, *inner, self.bits, self.counts, self.group_size)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a base weight that may be a quantized tensor subclass."""
    return t if type(t) in (torch.Tensor, torch.nn.Parameter) else t.dequantize()


def _budget_error(name, alpha, out_features, in_features, widths, group_size) -> BudgetTooSmallError:
    cheapest = min(vector_cost_bits(b, out_features, in_features, group_size) for b in widths)
    return BudgetTooSmallError(
        f"{name}: alpha={alpha:g} gives {budget_bits(out_features, in_features, alpha)} bits for a "
        f"{out_features}x{in_features} delta, but the cheapest singular vector costs {cheapest} bits "
        f"(codes, scales, zero-points and S); raise alpha or lower group_size"
    )


def _optimal_bands(u_rows, s, v_rows, candidates, budget, group_size, quantizer, hessian, damp,
                   act_order=True, gptq_v=True):
    """Per-vector widths from `allocate.optimal_allocation` -> (bands, permutation of the vectors)."""
    out_features, in_features = u_rows.shape[1], v_rows.shape[1]

    def measure(rows, bits):
        return dequantize_rows(quantizer(rows, bits, group_size), group_size)

    H = measure_v = None
    if hessian is not None:
        H = hessian.detach().to(device=v_rows.device, dtype=torch.float64)
        H = H + damp * torch.diagonal(H).mean().clamp_min(1e-30) * torch.eye(in_features, dtype=H.dtype, device=H.device)
        if gptq_v:
            def measure_v(rows, bits):  # what GPTQ will really do to V̂ at this width
                return gptq_input_groups(rows, hessian, bits, group_size, damp, act_order).dequantized
    rel, energy = error_table(u_rows, v_rows, candidates, measure, H, measure_v)
    weight = s.double().cpu() * energy.cpu().sqrt()
    costs = candidate_costs(candidates, out_features, in_features, group_size)
    choice = optimal_allocation(weight, rel.cpu(), costs, budget)
    widths = torch.tensor(candidates, dtype=torch.long)[choice]
    perm, bands = bands_from_widths(widths)
    return bands, perm.to(s.device)


def _gptq_factors(u_rows, s, v_rows, bands, hessian, group_size, damp, act_order, target=None):
    """GPTQ of V̂ against H_x, then of Û against H_z = diag(s) V̂ H_x V̂ᵀ diag(s) (quantized V̂).

    Returns (V̂ `QuantizedRows` per band, Ûᵀ `QuantizedRows` per band, s). With `target` (the full
    delta), Û is first replaced by argmin ‖X(target - Û diag(s) V̂)ᵀ‖² + λ‖Û - Û_svd‖², which also
    absorbs part of V̂'s error and of the dropped tail; its rows are renormalised into s.
    """
    widths = [b.bits for b in bands for _ in range(b.count)]
    H = hessian.detach().to(device=v_rows.device, dtype=torch.float32)
    v = gptq_input_groups(v_rows, H, widths, group_size, damp, act_order)
    vq = v.dequantized
    vh = vq @ H  # (r, in)
    gram = vh @ vq.T  # V̂ H V̂ᵀ (r, r)
    if target is not None and s.numel():
        hz = s[:, None] * gram * s[None, :]
        lam = damp * torch.diagonal(hz).mean().clamp_min(1e-30)
        rhs = s[:, None] * (vh @ target.to(vh.device, torch.float32).T) + lam * u_rows
        ut = torch.linalg.solve(hz + lam * torch.eye(hz.shape[0], device=hz.device), rhs)
        if torch.isfinite(ut).all():
            scale = ut.abs().amax(dim=1).clamp_min(1e-30)
            u_rows, s = ut / scale[:, None], s * scale
    hz = s[:, None] * gram * s[None, :]
    u = gptq_output_groups(u_rows, hz, widths, group_size, damp, act_order)
    return v.band_rows(bands), u.band_rows(bands), s


def _truncate(bands, rank: int) -> tuple[Band, ...]:
    """Drop vectors beyond the delta's numerical rank (zero singular values carry nothing)."""
    out, left = [], rank
    for b in bands:
        take = min(b.count, left)
        if take:
            out.append(Band(b.bits, take))
        left -= take
    return tuple(out)


implements = MixedPrecisionDeltaTensor.implements
implements_torch_function = MixedPrecisionDeltaTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if type(w.base_weight) not in (torch.Tensor, torch.nn.Parameter):  # a quantized base (`with_base`)
        out_features, in_features = w.shape
        y = torch.nn.functional.linear(x, w.base_weight) + delta_only_linear(
            x, w.v_packed, w.v_scale, w.v_zero, w.u_packed, w.u_scale, w.u_zero, w.s,
            list(w.bits), list(w.counts), out_features, in_features, w.group_size,
        )
        return y if bias is None else y + bias
    y = delta_linear(
        x, w.base_weight, w.v_packed, w.v_scale, w.v_zero, w.u_packed, w.u_scale, w.u_zero, w.s,
        list(w.bits), list(w.counts), w.group_size,
    )
    return y if bias is None else y + bias


@implements(aten.t.default)
def _(func, types, args, kwargs):
    """Wᵀ = W_baseᵀ + V̂ᵀ diag(s) Û: the same bands with the two factors swapped."""
    w = args[0]
    out = MixedPrecisionDeltaTensor(
        w.base_weight.t(), w.u_packed, w.u_scale, w.u_zero, w.v_packed, w.v_scale, w.v_zero, w.s,
        w.bits, w.counts, w.group_size,
    )
    return return_and_correct_aliasing(func, args, kwargs, out)


def copy_to(w: TorchAOBaseTensor, device=None, dtype=None) -> TorchAOBaseTensor:
    """`aten._to_copy` for base + delta tensors (first data tensor `base_weight`): a device move
    applies to every buffer, a dtype change to the base weight only (codes and scales keep theirs)."""
    device = device or w.device
    base = w.base_weight.to(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else None)
    moved = [getattr(w, n).to(device) for n in w.tensor_data_names[1:]]
    return type(w)(base, *moved, *(getattr(w, a) for a in w.tensor_attribute_names))


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    return copy_to(args[0], kwargs.get("device"), kwargs.get("dtype"))


MixedPrecisionDeltaTensor.__module__ = "deltacome_ao"
torch.serialization.add_safe_globals([MixedPrecisionDeltaTensor])
