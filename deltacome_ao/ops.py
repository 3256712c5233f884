"""Stage 5: the `deltacome::` operators — the one place where `PackedFactors` travel flat.

    delta_linear(x, base_weight, <factors>)            x W_baseᵀ + ((x V̂ᵀ) · s) Ûᵀ
    delta_only_linear(x, <7 tensors>, bits, counts, out, in, group_size)
                                                       ((x V̂ᵀ) · s) Ûᵀ (the base is a quantized subclass)
    segmented_delta_linear(y, x, rows, <n factors>)    y with each delta's term added on its rows
    grouped_delta_linear(x, offs, base_weight, <stacked factors>)
                                                       a stack of expert matrices: x W_eᵀ for the rows of each expert e

`<factors>` is `PackedFactors.op_args()`: the seven tensors, bits, counts, group_size. They are
registered with `torch.library`, so `torch.compile(fullgraph=True)` treats each as one opaque node.
The implementations here are the reference path (any device): they unpack the factors and run small
matmuls in fp32, never forming the dense delta. `deltacome_ao.kernels` registers Triton kernels for
CUDA on the same operators; nothing here depends on them.
"""

from __future__ import annotations

import torch

from .factors import TENSOR_NAMES, PackedFactors, low_rank_term

__all__ = ["delta_linear", "delta_only_linear", "delta_linear_reference", "segmented_delta_linear",
           "register_kernel", "direct_kernel",
           "grouped_delta_linear", "grouped_delta_linear_reference", "expert_major",
           "segmented_delta", "segmented_reference", "segmented_delta_linear_reference", "unflatten_segments", "low_rank_term"]

_N = len(TENSOR_NAMES)


def _factors(tensors, bits, counts, group_size, out_features, in_features) -> PackedFactors:
    return PackedFactors(*tensors, bits=tuple(bits), counts=tuple(counts), group_size=group_size,
                         out_features=out_features, in_features=in_features)


def delta_linear_reference(x: torch.Tensor, base_weight: torch.Tensor, factors: PackedFactors) -> torch.Tensor:
    """The reference path of `delta_linear` (also the kernels' fallback for unsupported inputs)."""
    v, ut = factors.dequantize()
    y = torch.nn.functional.linear(x, base_weight.to(x.dtype))
    return (y.float() + low_rank_term(x, v, ut, factors.s)).to(x.dtype)


@torch.library.custom_op("deltacome::delta_linear", mutates_args=())
def delta_linear(
    x: torch.Tensor, base_weight: torch.Tensor,
    v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    u_packed: torch.Tensor, u_scale: torch.Tensor, u_zero: torch.Tensor, s: torch.Tensor,
    bits: list[int], counts: list[int], group_size: int,
) -> torch.Tensor:
    f = _factors((v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s), bits, counts, group_size, *base_weight.shape)
    return delta_linear_reference(x, base_weight, f)


@delta_linear.register_fake
def _(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
    return x.new_empty(*x.shape[:-1], base_weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, base_weight, *rest = inputs
    ctx.save_for_backward(base_weight, *rest[:_N])
    ctx.meta = (*rest[_N:], x.dtype)


def _backward(ctx, grad):
    """Gradient for the input only: the compressed weight is frozen."""
    base_weight, *tensors = ctx.saved_tensors
    bits, counts, group_size, dtype = ctx.meta
    v, ut = _factors(tensors, bits, counts, group_size, *base_weight.shape).dequantize()
    g = grad.float()
    s = tensors[-1]
    grad_x = g @ base_weight.float() + ((g @ ut.T) * s) @ v
    return (grad_x.to(dtype),) + (None,) * (1 + _N + 3)


delta_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("deltacome::delta_only_linear", mutates_args=())
def delta_only_linear(
    x: torch.Tensor,
    v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    u_packed: torch.Tensor, u_scale: torch.Tensor, u_zero: torch.Tensor, s: torch.Tensor,
    bits: list[int], counts: list[int], out_features: int, in_features: int, group_size: int,
) -> torch.Tensor:
    """The delta term alone, fp32 inside, `x.dtype` out: used when the base weight is itself a
    quantized tensor subclass (which a custom op cannot take as input), so the base term runs
    through that subclass's own `F.linear`."""
    f = _factors((v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s), bits, counts, group_size,
                 out_features, in_features)
    v, ut = f.dequantize()
    return low_rank_term(x, v, ut, s).to(x.dtype)


@delta_only_linear.register_fake
def _(x, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, out_features, in_features, group_size):
    return x.new_empty(*x.shape[:-1], out_features)


# --- many deltas in one batch --------------------------------------------------------------------


def segmented_reference(y: torch.Tensor, x: torch.Tensor, groups) -> torch.Tensor:
    """For each (rows, factors) of `groups`: `y[rows] = (y[rows].fp32 + ((x[rows] V̂ᵀ) · s) Ûᵀ).to(y.dtype)`,
    in place on `y` — the same arithmetic as `delta_linear`, so a row gives what the delta's model
    alone gives. Each delta's factors are read once."""
    for rows, f in groups:
        v, ut = f.dequantize()
        yg = (y.index_select(0, rows).float() + low_rank_term(x.index_select(0, rows), v, ut, f.s)).to(y.dtype)
        y.index_copy_(0, rows, yg)
    return y


def unflatten_segments(rows, tensors, bits, counts, nbands, group_sizes, out_features, in_features):
    """The flat arguments of `segmented_delta_linear` -> [(rows, PackedFactors), ...]."""
    groups, b0 = [], 0
    for i, r in enumerate(rows):
        nb = nbands[i]
        f = _factors(tensors[_N * i:_N * (i + 1)], bits[b0:b0 + nb], counts[b0:b0 + nb], group_sizes[i],
                     out_features, in_features)
        groups.append((r, f))
        b0 += nb
    return groups


def segmented_delta_linear_reference(y, x, rows, tensors, bits, counts, nbands, group_sizes) -> torch.Tensor:
    """The reference (any device) implementation of `segmented_delta_linear`."""
    groups = unflatten_segments(rows, tensors, bits, counts, nbands, group_sizes, y.shape[-1], x.shape[-1])
    return segmented_reference(y.clone(), x, groups)


@torch.library.custom_op("deltacome::segmented_delta_linear", mutates_args=())
def segmented_delta_linear(
    y: torch.Tensor, x: torch.Tensor, rows: list[torch.Tensor], tensors: list[torch.Tensor],
    bits: list[int], counts: list[int], nbands: list[int], group_sizes: list[int],
) -> torch.Tensor:
    """`y` (B, ..., out) plus, on the batch rows `rows[i]` (int64 indices into dim 0), the low-rank
    term of delta i, whose factors are `tensors[7i:7i+7]` with `nbands[i]` bands (`bits`, `counts`
    concatenated over the deltas) and group size `group_sizes[i]`. Returns a new tensor."""
    return segmented_delta_linear_reference(y, x, rows, tensors, bits, counts, nbands, group_sizes)


@segmented_delta_linear.register_fake
def _(y, x, rows, tensors, bits, counts, nbands, group_sizes):
    return torch.empty_like(y)


def segmented_delta(y: torch.Tensor, x: torch.Tensor, groups) -> torch.Tensor:
    """`segmented_delta_linear` on [(rows, PackedFactors), ...] (deltas without vectors skipped)."""
    groups = [(r, f) for r, f in groups if f.rank > 0 and r.numel() > 0]
    if not groups:
        return y
    tensors, bits, counts = [], [], []
    for _, f in groups:
        tensors += (f.v_packed, f.v_scale, f.v_zero, f.u_packed, f.u_scale, f.u_zero, f.s)
        bits += f.bits
        counts += f.counts
    op = direct_kernel(segmented_delta_linear, x) or segmented_delta_linear
    return op(y, x, [r for r, _ in groups], tensors, bits, counts,
              [len(f.bits) for _, f in groups], [f.group_size for _, f in groups])


# --- eager calls without the dispatcher --------------------------------------------------------------

_DIRECT: dict = {}  # (id(op), device type) -> (implementation, what the op held for it once registered)


def register_kernel(op, device_type: str, fn) -> None:
    """`op.register_kernel(device_type)(fn)`, remembering `fn` so that eager calls on that device may run
    it directly (`direct_kernel`). A later registration by anyone else switches the shortcut off."""
    op.register_kernel(device_type)(fn)
    held = getattr(op, "_backend_fns", {}).get(device_type)
    _DIRECT[(id(op), device_type)] = (fn, held)


def direct_kernel(op, x: torch.Tensor):
    """The implementation `register_kernel` gave `op` for `x`'s device when eager code may call it
    without the dispatcher, else None (call `op`). A Python custom op costs ~20-30 µs a call in the
    dispatcher (autograd wrapper, aliasing checks), as much as a small layer's whole delta term on CPU;
    the shortcut applies only outside `torch.compile` tracing, for a plain tensor that needs no gradient,
    and while that implementation is still the one the op holds (and not disabled)."""
    if type(x) is not torch.Tensor or (x.requires_grad and torch.is_grad_enabled()):
        return None
    device = "cpu" if x.is_cpu else x.device.type
    entry = _DIRECT.get((id(op), device))
    if entry is None:
        return None
    fn, held = entry
    if held is None or getattr(op, "_backend_fns", _NONE).get(device) is not held:
        return None
    if device in getattr(op, "_disabled_kernel", ()) or torch.compiler.is_compiling():
        return None
    return fn


_NONE: dict = {}


# --- 0.1 names, kept importable for one release ------------------------------------------------------


def _dequantize_factor_01(packed, scale, zero, bits, counts, length: int, group_size: int) -> torch.Tensor:
    """0.1's `dequantize_factor`: one factor's rows (r, length), fp32. Use `PackedFactors.dequantize_factor`."""
    f = PackedFactors(packed, scale, zero, packed, scale, zero, torch.zeros(sum(counts)), tuple(bits), tuple(counts),
                      group_size, length, length)
    return f.dequantize_factor("v")


def _dequantize_factors_01(out_features: int, in_features: int, *factors_and_bands) -> tuple[torch.Tensor, torch.Tensor]:
    """0.1's `dequantize_factors(out, in, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, bits, counts,
    group_size)`. Use `PackedFactors.dequantize`."""
    *tensors, bits, counts, group_size = factors_and_bands
    v = _dequantize_factor_01(*tensors[:3], bits, counts, in_features, group_size)
    ut = _dequantize_factor_01(*tensors[3:], bits, counts, out_features, group_size)
    return v, ut


def __getattr__(name: str):
    legacy = {"dequantize_factor": _dequantize_factor_01, "dequantize_factors": _dequantize_factors_01}
    if name in legacy:
        return legacy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# --- a stack of expert matrices (MoE): every expert of a call in one operator -------------------------


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of `x` times `w[e]` (E, k, n), for every e: torch's grouped matmul where it
    has one for these strides, else a loop over the experts that have rows. Rows past offs[-1]: zero."""
    y = None
    grouped = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped is not None:
        try:
            y = grouped(x.contiguous(), w, offs=offs.to(torch.int32))
        except (RuntimeError, NotImplementedError):  # e.g. strides that are not multiples of 16 bytes
            y = None
    if y is None:
        y = x.new_zeros(x.shape[0], w.shape[-1])
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                y[start:end] = x[start:end] @ w[e]
            start = end
    end = int(offs[-1]) if offs.numel() else 0
    if end < x.shape[0]:
        y[end:] = 0  # rows of no expert (grouped_mm leaves them uninitialised)
    return y


def expert_major(factors: PackedFactors, num_experts: int, multiple: int = 8):
    """The dequantized factors of a stack (bands holding all experts' vectors band by band) per expert:
    (V̂ (E, r, in), Ûᵀ (E, r, out), s (E, r)) in fp32, r padded with zero vectors to a multiple of
    `multiple` (grouped matmuls want 16-byte strides)."""
    v, ut = factors.dequantize()
    vs, uts, ss, start = [], [], [], 0
    for count in factors.counts:
        c = count // num_experts
        vs.append(v[start:start + count].reshape(num_experts, c, -1))
        uts.append(ut[start:start + count].reshape(num_experts, c, -1))
        ss.append(factors.s[start:start + count].reshape(num_experts, c))
        start += count
    rank = sum(c // num_experts for c in factors.counts)
    pad = -rank % multiple
    if pad:
        vs.append(v.new_zeros(num_experts, pad, factors.in_features))
        uts.append(ut.new_zeros(num_experts, pad, factors.out_features))
        ss.append(factors.s.new_zeros(num_experts, pad))
    return torch.cat(vs, 1), torch.cat(uts, 1), torch.cat(ss, 1).float()


def grouped_delta_linear_reference(x: torch.Tensor, offs: torch.Tensor, base_weight: torch.Tensor,
                                   factors: PackedFactors) -> torch.Tensor:
    """Reference of `grouped_delta_linear`: three grouped matmuls over all experts at once — the base
    (`x W_base,eᵀ`), then `x V̂_eᵀ`, scaled by s_e, then `· Û_eᵀ` — no loop over experts (where torch has
    a grouped matmul for the strides); the factors are unpacked once per band for all experts."""
    num_experts = base_weight.shape[0]
    y = _grouped(x, base_weight.to(x.dtype).transpose(-2, -1), offs)
    if factors.rank == 0:
        return y
    v, ut, s = expert_major(factors, num_experts)
    sizes = torch.diff(offs.to(torch.long), prepend=offs.new_zeros(1, dtype=torch.long))
    token_expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), sizes)
    end = token_expert.numel()
    z = _grouped(x.float(), v.transpose(-2, -1), offs)  # (S, r)
    z[:end] *= s[token_expert]
    y = (y.float() + _grouped(z, ut, offs)).to(x.dtype)
    if end < x.shape[0]:
        y[end:] = 0
    return y


@torch.library.custom_op("deltacome::grouped_delta_linear", mutates_args=())
def grouped_delta_linear(
    x: torch.Tensor, offs: torch.Tensor, base_weight: torch.Tensor,
    v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    u_packed: torch.Tensor, u_scale: torch.Tensor, u_zero: torch.Tensor, s: torch.Tensor,
    bits: list[int], counts: list[int], group_size: int,
) -> torch.Tensor:
    """`x` (S, in) sorted by expert, `offs` (E,) the cumulative row counts (torch.grouped_mm's offsets):
    rows offs[e-1]:offs[e] get `x W_eᵀ` with `W_e = W_base,e + Û_e diag(s_e) V̂_e`, fp32 inside, one
    rounding. `base_weight` (E, out, in); the factors are those of a `MixedPrecisionExpertsTensor` (bands
    holding all experts' vectors band by band; `counts` per expert)."""
    num_experts, out_features, in_features = base_weight.shape
    f = _factors((v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s), bits,
                 [c * num_experts for c in counts], group_size, out_features, in_features)
    return grouped_delta_linear_reference(x, offs, base_weight, f)


@grouped_delta_linear.register_fake
def _(x, offs, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
    return x.new_empty(x.shape[0], base_weight.shape[1])
