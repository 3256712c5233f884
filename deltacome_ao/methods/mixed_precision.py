"""Method file: `MixedPrecisionDeltaTensor`, a weight stored as base + mixed-precision SVD delta.

`from_hp` runs the offline pipeline for one matrix (delta → SVD → bit allocation → RTN or GPTQ
quantization → packing into `PackedFactors`); the tensor itself only holds the packed result, and
`F.linear` on it calls the `deltacome::delta_linear` operator without forming the dense delta.
The methods "deltacome" (Delta-CoMe's 8/3/2-bit schedule, or the optimal per-vector widths),
"single" (one bit-width) and "lowrank" (fp16 vectors) are registered at the end of this file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..allocate import (
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
from ..decompose import DeltaSVD, any_nonzero, delta_svd, weight_delta
from ..delta_tensor import DeltaTensor, is_plain
from ..factors import PackedFactors, low_rank_term, split_bands
from ..gptq import gptq_input_groups, gptq_output_groups
from . import base_handed_over, register_method
from ..ops import delta_linear, delta_only_linear, direct_kernel
from ..quantize import dequantize_rows, quantize_rows
from ..slicing import slice_factors

__all__ = ["MixedPrecisionDeltaTensor", "BudgetTooSmallError", "SVDDeltaOptions", "compress_factors", "svd_options",
           "normalized_svd", "whitened_svd", "vector_errors", "with_planned_widths", "planned_widths"]

aten = torch.ops.aten


class BudgetTooSmallError(ValueError):
    """`alpha` leaves no room for a single singular vector of this matrix."""


def _rtn(rows, bits, group_size):
    return quantize_rows(rows, bits, group_size)


@dataclass(frozen=True)
class SVDDeltaOptions:
    """How one matrix's delta is decomposed, allocated and quantized (see `from_hp`).

    alpha: delta bytes / fp16 bytes (1/16 = 1 bit per parameter, everything stored counted).
    schedule: [(bits, count or None = the rest), ...] filled within alpha (Delta-CoMe §3.3).
    bands: explicit [(bits, count), ...], overriding schedule and alpha.
    group_size: quantization group along each singular vector.
    svd: "auto" | "exact" | "randomized" (`decompose.delta_svd`).
    quantizer: `(rows, bits, group_size) -> QuantizedRows`, the data-free quantizer (RTN).
    allocation: "paper" (the schedule) or "optimal" (per-vector widths from `candidates`, 0 =
        dropped, minimising the measured σ²-weighted error within alpha; DeltaMix §3); "global"
        needs `widths` (planned over the whole model, `budget.py`).
    whiten: with a Hessian, decompose the delta in the layer's output metric (`whitened_svd`).
    widths: explicit per-vector widths in singular-value order (0 = dropped) for the top
        len(widths) singular vectors (the SVD is taken at that rank), overriding schedule, bands
        and alpha; what a model-level plan (`allocation="global"`) chose for this matrix.
    damp, act_order: GPTQ settings (used with a Hessian).
    target_correction: quantize Û toward the least-squares target given the quantized V̂ (DeltaMix).
    """

    alpha: float = 1 / 16
    schedule: Sequence = PAPER_SCHEDULE
    bands: Optional[Sequence] = None
    group_size: int = 128
    svd: str = "auto"
    quantizer: Callable = _rtn
    allocation: str = "paper"
    candidates: Sequence[int] = OPTIMAL_CANDIDATES
    damp: float = 0.01
    act_order: bool = True
    target_correction: bool = False
    widths: Optional[Sequence[int]] = None
    whiten: bool = False


def compress_factors(delta: Optional[torch.Tensor], options: SVDDeltaOptions, name: str = "weight",
                     hessian: Optional[torch.Tensor] = None, device=None, svd: Optional[DeltaSVD] = None) -> PackedFactors:
    """The packed factors of one fp32 (out, in) delta (the whole offline pipeline of `from_hp`).

    svd: the delta's SVD when the caller already has it exactly (e.g. `decompose.product_svd` of a
    LoRA's factors: no dense delta needed); `delta` may then be None (not with target_correction)."""
    return _compress_factors([delta], options, name, hessian, device, svd)


def _compress_factors(held: list, o: SVDDeltaOptions, name, hessian, device, svd) -> PackedFactors:
    """`compress_factors` of the delta in the one-element list `held`, which it takes out: once the SVD
    is done it drops its reference to the delta (unless GPTQ's target correction still needs it), so a
    caller that passes `[delta]` without keeping one (`from_hp`) frees the m×n fp32 delta before the
    factors are quantized. Every intermediate of the size of a factor is dropped when the next is made."""
    delta = held.pop()
    if svd is not None:
        if delta is None and o.target_correction and hessian is not None:
            raise ValueError(f"{name}: target_correction needs the dense delta")
        out_features, in_features = svd.U.shape[0], svd.Vh.shape[1]
    else:
        out_features, in_features = delta.shape
    nonzero = bool(svd.S.numel()) if svd is not None else any_nonzero(delta)
    if o.allocation not in ("paper", "optimal", "global"):
        raise ValueError(f"unknown allocation {o.allocation!r}; use 'paper', 'optimal' or 'global'")
    if o.allocation == "global" and o.widths is None:
        raise ValueError(f"{name}: allocation='global' spends one budget over the whole model (compress_ and "
                         f"quantize_ plan it); for one matrix alone use 'optimal'")
    if hessian is not None and tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"{name}: hessian has shape {tuple(hessian.shape)}, expected {(in_features, in_features)}")
    optimal = o.bands is None and o.allocation == "optimal" and o.widths is None
    if o.widths is not None:
        for b in set(int(w) for w in o.widths) - {0}:
            vector_cost_bits(b, out_features, in_features, o.group_size)  # validates the width
        max_rank = len(o.widths)
    elif optimal:
        for b in o.candidates:
            if b != 0:
                vector_cost_bits(b, out_features, in_features, o.group_size)  # validates the width
        max_rank = max_candidate_vectors(out_features, in_features, o.alpha, o.candidates, o.group_size)
        if max_rank == 0 and nonzero:
            raise _budget_error(name, o, out_features, in_features, [b for b in o.candidates if b])
    elif o.bands is None:
        chosen = allocate(out_features, in_features, o.alpha, o.schedule, o.group_size)
        if not chosen and nonzero:
            raise _budget_error(name, o, out_features, in_features, [b for b, _ in o.schedule])
        max_rank = sum(b.count for b in chosen)
    else:
        chosen = tuple(Band(int(b), int(c)) for b, c in o.bands)
        for b in chosen:
            vector_cost_bits(b.bits, out_features, in_features, o.group_size)  # validates the width
        max_rank = sum(b.count for b in chosen)
    if svd is None:
        svd_out = (whitened_svd(delta, hessian, max_rank, o.svd, o.damp) if o.whiten and hessian is not None
                   else delta_svd(delta, rank=max_rank, method=o.svd))
    else:
        k = min(max_rank, svd.rank)
        svd_out = DeltaSVD(svd.U[:, :k], svd.S[:k], svd.Vh[:k])
    target = delta if o.target_correction and hessian is not None else None
    del delta  # the SVD was its last use (`target` keeps it for GPTQ's target correction)
    u_rows, s, v_rows = svd_out.U.T, svd_out.S, svd_out.Vh
    rank = svd_out.rank
    del svd_out  # u_rows / v_rows are then the only references to U and Vh: each is freed when replaced
    # Scale each singular vector to max |x| = 1 so group scales stay in fp16's normal range.
    u_max = u_rows.abs().amax(dim=1).clamp_min(1e-30) if s.numel() else s
    v_max = v_rows.abs().amax(dim=1).clamp_min(1e-30) if s.numel() else s
    u_rows, v_rows, s = u_rows / u_max[:, None], v_rows / v_max[:, None], s * u_max * v_max
    if o.widths is not None:
        perm, chosen = bands_from_widths(list(o.widths)[: s.numel()])
        perm = perm.to(s.device)
    elif optimal:
        chosen, perm = _optimal_bands(u_rows, s, v_rows, o, budget_bits(out_features, in_features, o.alpha), hessian)
    else:
        chosen = _truncate(chosen, rank)
        perm = torch.arange(sum(b.count for b in chosen), device=s.device)
    u_rows, s, v_rows = u_rows[perm], s[perm], v_rows[perm]
    if hessian is None:
        v_q = [o.quantizer(rows, b.bits, o.group_size) for rows, b in zip(split_bands(v_rows, chosen), chosen)]
        u_q = [o.quantizer(rows, b.bits, o.group_size) for rows, b in zip(split_bands(u_rows, chosen), chosen)]
    else:
        v_q, u_q, s = _gptq_factors(u_rows, s, v_rows, chosen, hessian, o, target=target)
    return PackedFactors.pack(v_q, u_q, s, o.group_size, out_features, in_features, device=device)


class MixedPrecisionDeltaTensor(DeltaTensor):
    """Weight `W_base + Û diag(s) V̂`, with Û and V̂ quantized in bands of decreasing bit-width.

    Tensor data: `base_weight` (out, in) in the model dtype, then the seven `PackedFactors` tensors
    (`v_packed`, `v_scale`, `v_zero`, `u_packed`, `u_scale`, `u_zero`, `s`; see `factors.py`).
    Attributes: `bits` and `counts` (one entry per band) and `group_size`. `factors` gives the
    packed factors as one value.
    """

    tensor_data_names = ["base_weight", "v_packed", "v_scale", "v_zero", "u_packed", "u_scale", "u_zero", "s"]
    tensor_attribute_names = ["bits", "counts", "group_size"]

    # torchao's convention: the constructor takes every tensor_data_name, then every attribute.
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
    def from_factors(cls, base_weight: torch.Tensor, factors: PackedFactors) -> "MixedPrecisionDeltaTensor":
        if tuple(base_weight.shape) != (factors.out_features, factors.in_features):
            raise ValueError(f"base weight {tuple(base_weight.shape)} does not match the factors' "
                             f"{(factors.out_features, factors.in_features)}")
        return cls(base_weight, *factors.tensors().values(), factors.bits, factors.counts, factors.group_size)

    @classmethod
    def from_hp(cls, finetuned: torch.Tensor, base: torch.Tensor, *, name: str = "weight",
                hessian: Optional[torch.Tensor] = None, copy_base: bool = True,
                **options) -> "MixedPrecisionDeltaTensor":
        """Compress `finetuned - base` (both (out, in), any float dtype; the math runs in fp32).

        `options` are the fields of `SVDDeltaOptions` (alpha, schedule, bands, group_size, svd,
        quantizer, allocation, candidates, damp, act_order, target_correction). `hessian` (in, in),
        Σ xᵀx / N of this layer's calibration inputs, switches both factors to GPTQ (`gptq.py`;
        Delta-CoMe §3.4: V̂ against H_x, Û against H_z of the quantized V̂) and makes the optimal
        allocation measure errors in output space.

        The returned tensor holds a contiguous copy of `base`, so it shares no memory with the caller's
        tensor; `copy_base=False` keeps `base` itself when it is contiguous (no copy), for a caller that
        made `base` for this call and changes it no more (`methods.base_handed_over`).

        Raises ValueError (shapes, NaN/Inf, an unknown option value) and `BudgetTooSmallError`
        (alpha too small for one singular vector).
        """
        opts = SVDDeltaOptions(**options)
        # the delta is passed without a reference kept here, so it is freed before the quantization
        factors = _compress_factors([weight_delta(finetuned, base, name)], opts, name, hessian, base.device, None)
        base = base.detach()
        return cls.from_factors(base.clone(memory_format=torch.contiguous_format) if copy_base else base.contiguous(),
                                factors)

    @property
    def factors(self) -> PackedFactors:
        out_features, in_features = self.shape
        return PackedFactors(self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero,
                             self.s, self.bits, self.counts, self.group_size, out_features, in_features)

    def low_rank_factors(self) -> PackedFactors:
        return self.factors

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(Band(b, c) for b, c in zip(self.bits, self.counts))

    @property
    def rank(self) -> int:
        return sum(self.counts)

    @classmethod
    def delta_layout(cls, shape, attributes):
        return PackedFactors.layout(attributes["bits"], attributes["counts"], attributes["group_size"], *shape)

    @classmethod
    def check_attributes(cls, attributes):
        return PackedFactors.check_bands(list(attributes["bits"]), list(attributes["counts"]), attributes["group_size"])

    def describe(self) -> str:
        return " ".join(f"{b}b×{c}" for b, c in zip(self.bits, self.counts)) or "(dropped)"

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Û (out, r), s (r,), V̂ (r, in)) in fp32."""
        v, ut = self.factors.dequantize()
        return ut.T, self.s, v

    def delta_weight(self) -> torch.Tensor:
        return self.factors.dense()

    def transposed(self) -> "MixedPrecisionDeltaTensor":
        """Wᵀ = W_baseᵀ + V̂ᵀ diag(s) Û: the same bands with the two factors swapped (no copy)."""
        return MixedPrecisionDeltaTensor.from_factors(self.base_weight.t(), self.factors.transposed())

    @classmethod
    def stack(cls, weights) -> "DeltaTensor":
        """E weights of one shape -> a `MixedPrecisionExpertsTensor` (their vectors band by band)."""
        from .mixed_precision_experts import MixedPrecisionExpertsTensor

        return MixedPrecisionExpertsTensor.from_weights(weights)

    def delta_term(self, x: torch.Tensor) -> torch.Tensor:
        v, ut = self.factors.dequantize()
        return low_rank_term(x, v, ut, self.s)

    def delta_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of Û diag(s) V̂ for a compressed embedding table, without forming the (V, H) delta."""
        v, ut = self.factors.dequantize()
        return torch.nn.functional.embedding(ids, ut.T * self.s) @ v
    def sliced(self, dim, start, end):
        """`W[start:end]` / `W[:, start:end]`: base rows / columns, and the cut factor repacked
        (`slicing.slice_factors`, exact; a start off a group boundary refines the group size)."""
        base = self.base_weight.narrow(dim, start, end - start).contiguous()
        return MixedPrecisionDeltaTensor.from_factors(base, slice_factors(self.factors, dim, start, end))

    def linear(self, x, bias=None):
        base = self.base_weight
        if is_plain(base):  # eager CPU: the registered kernel directly (ops.direct_kernel)
            y = (direct_kernel(delta_linear, x) or delta_linear)(
                x, base, self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero, self.s,
                list(self.bits), list(self.counts), self.group_size)
        else:  # a quantized base (`with_base`): its own linear, plus the delta term alone
            out_features, in_features = self.shape
            y = torch.nn.functional.linear(x, base) + (direct_kernel(delta_only_linear, x) or delta_only_linear)(
                x, self.v_packed, self.v_scale, self.v_zero, self.u_packed, self.u_scale, self.u_zero, self.s,
                list(self.bits), list(self.counts), out_features, in_features, self.group_size)
        return y if bias is None else y + bias


def _budget_error(name, o: SVDDeltaOptions, out_features, in_features, widths) -> BudgetTooSmallError:
    cheapest = min(vector_cost_bits(b, out_features, in_features, o.group_size) for b in widths)
    return BudgetTooSmallError(
        f"{name}: alpha={o.alpha:g} gives {budget_bits(out_features, in_features, o.alpha)} bits for a "
        f"{out_features}x{in_features} delta, but the cheapest singular vector costs {cheapest} bits "
        f"(codes, scales, zero-points and S); raise alpha or lower group_size"
    )


def _error_measures(v_rows, o: SVDDeltaOptions, hessian, gptq_v: bool):
    """(measure, H, measure_v) for `allocate.error_table`: RTN of a factor's rows; with `hessian`, the
    damped fp64 H (GPTQ's) and, if `gptq_v`, V̂'s rows as GPTQ will really quantize them at a width."""
    def measure(rows, bits):
        return dequantize_rows(o.quantizer(rows, bits, o.group_size), o.group_size)

    if hessian is None:
        return measure, None, None
    in_features = v_rows.shape[1]
    H = hessian.detach().to(device=v_rows.device, dtype=torch.float64)
    H = H + o.damp * torch.diagonal(H).mean().clamp_min(1e-30) * torch.eye(in_features, dtype=H.dtype, device=H.device)
    if not gptq_v:
        return measure, H, None

    def measure_v(rows, bits):
        return gptq_input_groups(rows, hessian, bits, o.group_size, o.damp, o.act_order).dequantized

    return measure, H, measure_v


def _optimal_bands(u_rows, s, v_rows, o: SVDDeltaOptions, budget: int, hessian, gptq_v: bool = True):
    """Per-vector widths from `allocate.optimal_allocation` -> (bands, permutation of the vectors)."""
    out_features, in_features = u_rows.shape[1], v_rows.shape[1]
    rel, energy = error_table(u_rows, v_rows, o.candidates, *_error_measures(v_rows, o, hessian, gptq_v))
    weight = s.double().cpu() * energy.cpu().sqrt()
    costs = candidate_costs(o.candidates, out_features, in_features, o.group_size)
    choice = optimal_allocation(weight, rel.cpu(), costs, budget)
    widths = torch.tensor(o.candidates, dtype=torch.long)[choice]
    perm, bands = bands_from_widths(widths)
    return bands, perm.to(s.device)


def _gptq_factors(u_rows, s, v_rows, bands, hessian, o: SVDDeltaOptions, target=None):
    """GPTQ of V̂ against H_x, then of Û against H_z = diag(s) V̂ H_x V̂ᵀ diag(s) (quantized V̂).

    Returns (V̂ `QuantizedRows` per band, Ûᵀ `QuantizedRows` per band, s). With `target` (the full
    delta), Û is first replaced by argmin ‖X(target - Û diag(s) V̂)ᵀ‖² + λ‖Û - Û_svd‖², which also
    absorbs part of V̂'s error and of the dropped tail; its rows are renormalised into s.
    """
    widths = [b.bits for b in bands for _ in range(b.count)]
    H = hessian.detach().to(device=v_rows.device, dtype=torch.float32)
    v = gptq_input_groups(v_rows, H, widths, o.group_size, o.damp, o.act_order)
    vq = v.dequantized
    vh = vq @ H  # (r, in)
    gram = vh @ vq.T  # V̂ H V̂ᵀ (r, r)
    if target is not None and s.numel():
        hz = s[:, None] * gram * s[None, :]
        lam = o.damp * torch.diagonal(hz).mean().clamp_min(1e-30)
        rhs = s[:, None] * (vh @ target.to(vh.device, torch.float32).T) + lam * u_rows
        ut = torch.linalg.solve(hz + lam * torch.eye(hz.shape[0], device=hz.device), rhs)
        if torch.isfinite(ut).all():
            scale = ut.abs().amax(dim=1).clamp_min(1e-30)
            u_rows, s = ut / scale[:, None], s * scale
    hz = s[:, None] * gram * s[None, :]
    u = gptq_output_groups(u_rows, hz, widths, o.group_size, o.damp, o.act_order)
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



# --- the methods this tensor stores ------------------------------------------------------------------

_SCHEDULES = {
    "deltacome": lambda c: PAPER_SCHEDULE,
    "single": lambda c: ((c.single_bits, None),),
    "lowrank": lambda c: ((FP16_BITS, None),),
}


def svd_options(config) -> SVDDeltaOptions:
    """The per-matrix options a `DeltaCoMeConfig` of one of this file's methods means (for callers
    that bring their own SVD to `compress_factors`, e.g. a LoRA adapter's exact one)."""
    if config.method not in _SCHEDULES:
        raise ValueError(f"method {config.method!r} does not store mixed-precision singular vectors")
    return SVDDeltaOptions(
        alpha=config.alpha, schedule=_SCHEDULES[config.method](config), bands=config.bands,
        group_size=config.group_size, svd=config.svd, allocation=config.allocation,
        candidates=tuple(config.candidates), damp=config.damp, act_order=config.act_order,
        target_correction=config.target_correction, whiten=bool(getattr(config, "whiten", False)),
    )


def _svd_compress(finetuned, base, config, *, name="weight", hessian=None):
    options = svd_options(config)
    if config.allocation == "global":
        options = replace(options, widths=planned_widths(config, name))
    return MixedPrecisionDeltaTensor.from_hp(finetuned, base, name=name, hessian=hessian,
                                             copy_base=not base_handed_over(config), **vars(options))


# --- model-level plans (allocation="global", budget.py) ------------------------------------------------

_PLANNED = "_deltacome_planned_widths"  # the attribute of a planned config copy holding {matrix: widths}


def with_planned_widths(config, widths: Mapping[str, Sequence[int]]):
    """A shallow copy of `config` that compresses each named matrix with its planned per-vector widths
    (the config itself is left as it was: it holds no run state)."""
    planned = copy.copy(config)
    object.__setattr__(planned, _PLANNED, {k: tuple(int(b) for b in v) for k, v in widths.items()})
    return planned


def planned_widths(config, name: str) -> tuple[int, ...]:
    """The widths a model-level plan chose for matrix `name` (ValueError without a plan for it)."""
    plan = getattr(config, _PLANNED, None)
    if plan is None or name not in plan:
        raise ValueError(f"{name}: allocation='global' spends one budget over the whole model, so it is planned by "
                         f"compress_ / quantize_ before any matrix is compressed; for one matrix "
                         f"alone use allocation='optimal'")
    return plan[name]


def whitened_svd(delta: torch.Tensor, hessian: torch.Tensor, rank: int, method: str = "auto",
                 damp: float = 0.01) -> DeltaSVD:
    """The top-`rank` decomposition of `delta` that is optimal in the layer's output metric:
    ‖X (ΔW − U diag(S) Vh)ᵀ‖ is smallest for the SVD of ΔW L (H = XᵀX/N + damping = L Lᵀ), mapped
    back as Vh = Vh_L L⁻¹ (so the rows of Vh are no longer orthonormal). The kept vectors are the
    directions that move the layer's outputs most, not the largest in weight space (as SVD-LLM /
    ASVD do for weights)."""
    H = hessian.detach().to(device=delta.device, dtype=torch.float64)
    n = H.shape[0]
    diag = torch.diagonal(H)
    lam = damp * float(diag.clamp_min(0).mean()) or 1e-8
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            break
        lam *= 10
    else:
        return delta_svd(delta, rank=rank, method=method)
    inner = delta_svd((delta.double() @ L).float(), rank=rank, method=method)
    vh = torch.linalg.solve_triangular(L.T, inner.Vh.double().T, upper=True).T  # Vh_L L⁻¹
    return DeltaSVD(inner.U, inner.S, vh.float().contiguous())


def normalized_svd(delta: torch.Tensor, rank: int, method: str = "auto", hessian: Optional[torch.Tensor] = None,
                   damp: float = 0.01):
    """(u_rows (r, out), s (r,), v_rows (r, in)) of the top-`rank` SVD of `delta` (with `hessian`: the
    `whitened_svd`), each singular vector scaled to max |x| = 1 (the factor moved into s), as
    `compress_factors` quantizes them."""
    svd_out = delta_svd(delta, rank=rank, method=method) if hessian is None else \
        whitened_svd(delta, hessian, rank, method, damp)
    u_rows, s, v_rows = svd_out.U.T, svd_out.S, svd_out.Vh
    if s.numel():
        u_max = u_rows.abs().amax(dim=1).clamp_min(1e-30)
        v_max = v_rows.abs().amax(dim=1).clamp_min(1e-30)
        u_rows, v_rows, s = u_rows / u_max[:, None], v_rows / v_max[:, None], s * u_max * v_max
    return u_rows, s, v_rows


def vector_errors(u_rows, s, v_rows, o: SVDDeltaOptions, hessian=None, out_weight=None, gptq_v: bool = True):
    """Absolute squared error (r, C) float64 of each singular triple at each of `o.candidates` (0 =
    dropped: the whole term), as the optimal allocation measures it: in weight space, or in output
    space with `hessian` (in, in) (V̂ then measured as GPTQ quantizes it when `gptq_v`), weighted over
    the outputs by `out_weight` (out,) (e.g. the diagonal Fisher of the layer's outputs)."""
    rel, energy = error_table(u_rows, v_rows, o.candidates, *_error_measures(v_rows, o, hessian, gptq_v),
                              out_weight=out_weight)
    return (s.double().cpu() ** 2 * energy.cpu())[:, None] * rel.cpu()


register_method("deltacome", MixedPrecisionDeltaTensor, _svd_compress, calibrated=True,
                allocations=("paper", "optimal", "global"),
                description="Delta-CoMe: 8/3/2-bit singular vectors (or optimal widths, per matrix or model-wide)")
register_method("single", MixedPrecisionDeltaTensor, _svd_compress,
                calibrated=True, description="every kept singular vector at single_bits")
register_method("lowrank", MixedPrecisionDeltaTensor, _svd_compress,
                calibrated=True, description="top singular vectors in fp16")

MixedPrecisionDeltaTensor.__module__ = "deltacome_ao"
torch.serialization.add_safe_globals([MixedPrecisionDeltaTensor])
