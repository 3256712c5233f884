"""Stage 3b: GPTQ for the two singular-vector factors, one bit-width per singular vector.

GPTQ (Frantar et al., 2022) quantizes a weight one input column at a time and pushes each column's
rounding error onto the columns not yet quantized, through the Cholesky factor of the inverse
Hessian H = Σ xᵀx of the layer input. The layer with a delta computes `((x V̂ᵀ) · s) Ûᵀ`, so:

- V̂ (r, in) is an ordinary weight with input `x`: H_x (in, in). Its rows are the singular
  vectors, groups run along `in` (the input dim), and each row has its band's bit-width.
  `gptq_input_groups` is classic GPTQ with per-row widths.
- Û (out, r) is a weight with input `z = x V̂ᵀ diag(s)`: H_z = diag(s) V̂ H_x V̂ᵀ diag(s) (r, r),
  from the already quantized V̂. Here the storage groups run along `out` *inside one column* of Û
  (a singular vector u_i). That still fits GPTQ: column i is quantized as a whole (group-wise RTN
  of the error-updated column at its own width), then its error moves to the later columns.
  `gptq_output_groups` takes Ûᵀ (one singular vector per row) and H_z.

Both return `QuantizedRows` per band (fp16 scale, uint8 zero, value = (code - zero) · scale), the
format of `quantize.py`, so packing and the operator are the same as for RTN. Quantization
parameters follow torchao's asymmetric mapping (the range always contains 0).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .allocate import FP16_BITS, Band
from .quantize import QuantizedRows

__all__ = ["GPTQResult", "gptq_input_groups", "gptq_output_groups", "prepare_hessian"]

_FP16_TINY = torch.finfo(torch.float16).tiny


@dataclass
class GPTQResult:
    """Per-row result: `codes` (r, L) float (fp16 rows hold their values), `scale` / `zero` (r, G)
    float, `dequantized` (r, L) fp32, `bits` (r,) long."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dequantized: torch.Tensor
    bits: torch.Tensor

    def band_rows(self, bands) -> list[QuantizedRows]:
        """Split into one `QuantizedRows` per band (rows of each band consecutive, in band order)."""
        out, start = [], 0
        for band in bands:
            band = Band(*band) if not isinstance(band, Band) else band
            sl = slice(start, start + band.count)
            start += band.count
            if band.bits == FP16_BITS:
                empty = self.codes.new_zeros(band.count, 0)
                out.append(QuantizedRows(band.bits, self.dequantized[sl].to(torch.float16),
                                         empty.to(torch.float16), empty.to(torch.uint8)))
            else:
                out.append(QuantizedRows(band.bits, self.codes[sl].to(torch.uint8).contiguous(),
                                         self.scale[sl].to(torch.float16).contiguous(),
                                         self.zero[sl].to(torch.uint8).contiguous()))
        return out


def _bits_per_row(bits, rows: int, device) -> torch.Tensor:
    if isinstance(bits, int):
        return torch.full((rows,), bits, dtype=torch.long, device=device)
    bits = torch.as_tensor(bits, dtype=torch.long, device=device)
    if bits.shape != (rows,):
        raise ValueError(f"expected one bit-width per row ({rows}), got shape {tuple(bits.shape)}")
    return bits


def _qparams(wmin: torch.Tensor, wmax: torch.Tensor, qmax: torch.Tensor):
    """Asymmetric scale (rounded to fp16) and integer zero-point of a group, range containing 0."""
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = ((wmax - wmin) / qmax).to(torch.float16).float().clamp_min(_FP16_TINY)
    zero = torch.round(-wmin / scale).clamp(torch.zeros_like(qmax), qmax)
    return scale, zero


def _fake_quant(w, scale, zero, qmax):
    q = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(qmax), qmax)
    return q, (q - zero) * scale


_PREPARED: list = []  # [(weakref to H, H._version, damp, act_order, (U, perm))], newest last
_PREPARED_MAX = 2  # an 11008² factor is 485 MB: keep the last two Hessians only


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, act_order: bool = False, order=None):
    """(upper Cholesky factor of the inverse of the damped, permuted H, permutation).

    Inputs that never fired (zero diagonal) get a unit diagonal, so their weights are rounded
    without moving error. `damp` is a fraction of the mean diagonal added to it; on a failed
    factorisation the damping grows tenfold (up to 4 times).

    Without `order`, the result for the very same H tensor (same object, unchanged since) and
    settings is computed once and reused (read-only): the optimal allocation's GPTQ measurements,
    the final GPTQ of V̂, and the layers that share one input Hessian (q/k/v, gate/up) all prepare
    the same H.
    """
    if order is not None:
        return _prepare_hessian(H, damp, act_order, order)
    for ref, version, d, a, result in _PREPARED:
        if ref() is H and version == H._version and d == damp and a == act_order:
            return result
    result = _prepare_hessian(H, damp, act_order, None)
    try:
        entry = (weakref.ref(H), H._version, damp, act_order, result)
    except TypeError:  # no weak reference to this tensor: nothing kept
        return result
    _PREPARED[:] = [e for e in _PREPARED if e[0]() is not None][-(_PREPARED_MAX - 1):] + [entry]
    return result


def _prepare_hessian(H: torch.Tensor, damp: float, act_order: bool, order):
    H = H.detach().float().clone()
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian contains NaN or Inf values (calibration activations overflowed?)")
    n = H.shape[0]
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1
    if order is not None:
        perm = torch.as_tensor(order, dtype=torch.long, device=H.device)
    elif act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    else:
        perm = torch.arange(n, device=H.device)
    H = H[perm][:, perm]
    eye = torch.eye(n, device=H.device)
    lam = damp * float(torch.diagonal(H).mean())
    if lam <= 0:
        lam = 1e-8 * float(torch.diagonal(H).mean())
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, perm
        lam *= 10
    raise ValueError("the Hessian is not positive definite even after increased damping")


def gptq_input_groups(
    W: torch.Tensor,
    H: torch.Tensor,
    bits,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> GPTQResult:
    """GPTQ of `W` (rows, L) against the Hessian `H` (L, L) of its input; groups along L.

    `bits`: one width for all rows or one per row (1..8, or 16 = fp16 rounding). Without act-order
    a group's scale and zero are computed when GPTQ enters it, from the error-updated weights;
    with act-order (columns by decreasing H diagonal) the groups are static (parameters from the
    original weights), so the stored layout never changes.
    """
    W = W.detach().float().clone()
    rows, L = W.shape
    device = W.device
    bits = _bits_per_row(bits, rows, device)
    hp = bits == FP16_BITS
    qmax = torch.where(hp, 255, (1 << bits.clamp(max=8)) - 1).float()
    groups = math.ceil(L / group_size)
    scale = torch.ones(rows, groups, device=device)
    zero = torch.zeros(rows, groups, device=device)
    if rows == 0 or L == 0:
        empty = W.new_zeros(rows, L)
        return GPTQResult(empty, scale, zero, empty.clone(), bits)
    Hinv, perm = prepare_hessian(H.to(device), damp, act_order)
    if act_order:
        for g in range(groups):
            grp = W[:, g * group_size:(g + 1) * group_size]
            scale[:, g], zero[:, g] = _qparams(grp.amin(1), grp.amax(1), qmax)
    W = W[:, perm]
    group_of = (perm // group_size).tolist()
    # Without act-order a group must start inside the block it is entered in: blocks of whole groups.
    block = block_size if act_order else max(1, math.ceil(block_size / group_size)) * group_size
    codes = torch.zeros_like(W)
    deq = torch.zeros_like(W)
    for i1 in range(0, L, block):
        i2 = min(i1 + block, L)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if not act_order and j % group_size == 0:
                grp = W1[:, i:i + group_size]
                scale[:, g], zero[:, g] = _qparams(grp.amin(1), grp.amax(1), qmax)
            w = W1[:, i]
            q, dq = _fake_quant(w, scale[:, g], zero[:, g], qmax)
            dq = torch.where(hp, w.to(torch.float16).float(), dq)
            codes[:, j], deq[:, j] = q, dq
            e = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = e
        if i2 < L:
            W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return GPTQResult(codes[:, inv].contiguous(), scale, zero, deq[:, inv].contiguous(), bits)


def _rtn_row(w: torch.Tensor, bits: int, group_size: int):
    """Group-wise RTN of one vector -> (codes, scale (G,), zero (G,), dequantized)."""
    L = w.numel()
    if bits == FP16_BITS:
        dq = w.to(torch.float16).float()
        return dq, w.new_ones(0), w.new_zeros(0), dq
    groups = math.ceil(L / group_size)
    pad = groups * group_size - L
    wp = torch.cat([w, w[-1:].expand(pad)]) if pad else w
    wg = wp.view(groups, group_size)
    qmax = torch.full((groups,), float((1 << bits) - 1), device=w.device)
    scale, zero = _qparams(wg.amin(1), wg.amax(1), qmax)
    q, dq = _fake_quant(wg, scale[:, None], zero[:, None], qmax[:, None])
    return q.reshape(-1)[:L], scale, zero, dq.reshape(-1)[:L]


def gptq_output_groups(
    Wt: torch.Tensor,
    H: torch.Tensor,
    bits,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    order=None,
) -> GPTQResult:
    """GPTQ of a weight W (L, rows) given as `Wt` = Wᵀ (rows, L), with `H` (rows, rows) the
    Hessian of W's input; groups run along L, inside each row of `Wt`.

    Each row of `Wt` (a column of W, e.g. a singular vector u_i of Û) is quantized as a whole by
    group-wise RTN of its error-updated values at its own width, then its error is propagated to
    the rows not yet quantized. Rows are processed by decreasing H diagonal with `act_order`; since
    every row has its own groups, the order never affects the stored layout.
    """
    R = Wt.detach().float().clone()
    rows, L = R.shape
    device = R.device
    bits = _bits_per_row(bits, rows, device)
    groups = math.ceil(L / group_size)
    scale = torch.ones(rows, groups, device=device)
    zero = torch.zeros(rows, groups, device=device)
    codes = torch.zeros_like(R)
    deq = torch.zeros_like(R)
    if rows == 0 or L == 0:
        return GPTQResult(codes, scale, zero, deq, bits)
    Hinv, perm = prepare_hessian(H.to(device), damp, act_order, order)
    R = R[perm]
    order = perm.tolist()
    widths = bits.tolist()
    for i1 in range(0, rows, block_size):
        i2 = min(i1 + block_size, rows)
        R1 = R[i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(R1)
        for i in range(i2 - i1):
            row = order[i1 + i]
            w = R1[i]
            q, s, z, dq = _rtn_row(w, widths[row], group_size)
            codes[row], deq[row] = q, dq
            if widths[row] != FP16_BITS:
                scale[row], zero[row] = s, z
            e = (w - dq) / Hinv1[i, i]
            R1[i:] -= Hinv1[i, i:][:, None] * e[None, :]
            err1[i] = e
        if i2 < rows:
            R[i2:] -= Hinv[i1:i2, i2:].T @ err1
    return GPTQResult(codes, scale, zero, deq, bits)
