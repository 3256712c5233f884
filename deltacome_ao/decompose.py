"""Stage 1: the weight delta and its singular value decomposition.

Everything here runs in fp32: a fine-tuning delta is often 100x smaller than the weights, and
subtracting two bf16 tensors (or running SVD in bf16) would bury it in rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DeltaSVD", "weight_delta", "delta_svd", "product_svd"]

# "auto": randomized SVD (2 power iterations) when the kept rank plus oversampling is below half the full
# rank of a matrix with min(m, n) >= 1024; exact below that size (LAPACK is faster there). Measured
# (benchmarks/cpu.py svd / svd7b, docs/results.md): 2.0-3.5x faster than exact at Llama-7B shapes and
# alpha 1/16 ranks; on the zoo's real deltas +0.16 % truncation error on average (max +0.57 %) over exact.
_RANDOMIZED_MAX_FRACTION = 0.5
_RANDOMIZED_MIN_DIM = 1024


@dataclass
class DeltaSVD:
    """`delta ≈ U @ diag(S) @ Vh`, singular values in decreasing order (all fp32)."""

    U: torch.Tensor  # (out_features, k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, in_features)

    @property
    def rank(self) -> int:
        return self.S.numel()


def weight_delta(finetuned: torch.Tensor, base: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """`finetuned - base` in fp32, after checking the two can be compared at all."""
    if finetuned.ndim != 2 or base.ndim != 2:
        raise ValueError(f"{name}: expected 2-D weights, got {tuple(finetuned.shape)} and {tuple(base.shape)}")
    if finetuned.shape != base.shape:
        raise ValueError(
            f"{name}: fine-tuned weight has shape {tuple(finetuned.shape)} but the base weight has "
            f"{tuple(base.shape)}; the base must be the model this one was fine-tuned from"
        )
    finetuned, base = finetuned.detach(), base.detach().to(finetuned.device)
    # One m×n fp32 result and no other full-size temporary: an fp32 fine-tuned tensor is subtracted from
    # as it is, a lower-precision one is cast once and the base subtracted in place; a bf16 / fp16 / fp32
    # base is converted inside the subtraction (exactly, as `.float()` would). The values are those of
    # `finetuned.float() - base.float()`, bit for bit (an fp64 base is rounded to fp32 first, as before).
    other = base if base.dtype in (torch.float32, torch.bfloat16, torch.float16) else base.float()
    if finetuned.dtype == torch.float32:
        delta = torch.sub(finetuned, other)
    else:
        delta = finetuned.float().sub_(other)
    if not _finite(delta):  # NaN / Inf in either weight shows in the delta; the weights are checked only then
        for label, t in (("fine-tuned", finetuned), ("base", base)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: the {label} weight contains NaN or Inf values; fix the checkpoint first")
        raise ValueError(f"{name}: fine-tuned - base overflows fp32 although both weights are finite (values beyond "
                         "±3.4e38, e.g. fp64 weights outside fp32's range); such a delta cannot be compressed")
    return delta


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`, in one reduction (`torch.isfinite(t).all()` makes full-size temporaries)."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates into both
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def any_nonzero(t: torch.Tensor) -> bool:
    """`bool(torch.any(t))` without its full-size bool temporary."""
    return bool(t.count_nonzero())


def delta_svd(
    delta: torch.Tensor,
    rank: int | None = None,
    method: str = "auto",
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
) -> DeltaSVD:
    """Top-`rank` SVD of `delta` (all of it when `rank` is None).

    `method`: "exact" (LAPACK), "randomized" (Halko et al. via `torch.svd_lowrank`, with `oversample`
    extra columns and `power_iters` power iterations), or "auto" (randomized when min(m, n) >= 1024 and
    rank + oversample is below half of it; exact otherwise). An exact SVD of a wide delta runs on its
    transpose. Singular values that are zero to fp32 precision are dropped, so a
    rank-deficient or all-zero delta yields fewer (possibly no) vectors.
    """
    delta = delta.float()
    m, n = delta.shape
    full = min(m, n)
    k = full if rank is None else max(0, min(rank, full))
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'")
    if k == 0 or not any_nonzero(delta):
        return DeltaSVD(delta.new_zeros(m, 0), delta.new_zeros(0), delta.new_zeros(0, n))
    use_randomized = method == "randomized" or (method == "auto" and full >= _RANDOMIZED_MIN_DIM
                                                and k + oversample < _RANDOMIZED_MAX_FRACTION * full)
    if use_randomized:
        q = min(k + oversample, full)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(delta, q=q, niter=power_iters)
        Vh = V.T
    elif m < n:  # LAPACK is ~2x faster on the tall transpose (measured: 4096x11008, 2 cores)
        V, S, Uh = torch.linalg.svd(delta.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    else:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    keep = int((S > S[0] * full * torch.finfo(torch.float32).eps).sum()) if S.numel() else 0
    return DeltaSVD(U[:, :keep].contiguous(), S[:keep].contiguous(), Vh[:keep].contiguous())


def product_svd(left: torch.Tensor, right: torch.Tensor) -> DeltaSVD:
    """The exact SVD of `left @ right` ((m, k) @ (k, n)) without forming the (m, n) product: QR of
    both factors, then the SVD of the (k, k) core (in float64). O((m + n) k²) instead of O(m n min(m, n)):
    a rank-k LoRA product or a low-rank delta is re-decomposed cheaply and exactly. Singular values
    that are zero to fp32 precision are dropped, as in `delta_svd`."""
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"product_svd needs (m, k) and (k, n) factors, got {tuple(left.shape)} and {tuple(right.shape)}")
    m, k = left.shape
    n = right.shape[1]
    if k == 0 or not torch.any(left) or not torch.any(right):
        return DeltaSVD(left.new_zeros(m, 0).float(), left.new_zeros(0).float(), left.new_zeros(0, n).float())
    ql, rl = torch.linalg.qr(left.double())
    qr_, rr = torch.linalg.qr(right.double().T)
    u, s, vh = torch.linalg.svd(rl @ rr.T)
    keep = int((s > s[0] * min(m, n) * torch.finfo(torch.float32).eps).sum())
    return DeltaSVD((ql @ u[:, :keep]).float().contiguous(), s[:keep].float().contiguous(),
                    (vh[:keep] @ qr_.T).float().contiguous())
