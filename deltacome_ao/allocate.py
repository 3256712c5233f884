"""Stage 2: how many bits each singular vector gets, under a byte budget.

A *band* is a run of consecutive singular vectors (largest first) stored at one bit-width. Bits 1..8
are group-wise quantized; 16 means plain fp16 (the low-rank baseline). The cost model below is the
real storage of the packed tensors (see `packing.py` and `quantize.py`), so the budget includes
codes, padding, scales, zero-points and S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Band",
    "PAPER_SCHEDULE",
    "SCALE_BITS",
    "ZERO_BITS",
    "S_BITS",
    "FP16_BITS",
    "vector_cost_bits",
    "budget_bits",
    "allocate",
    "bands_cost_bits",
    "OPTIMAL_CANDIDATES",
    "candidate_costs",
    "max_candidate_vectors",
    "error_table",
    "optimal_allocation",
    "global_allocation",
    "bands_from_widths",
]

SCALE_BITS = 16  # fp16 scale per group
ZERO_BITS = 8  # uint8 zero-point per group
S_BITS = 32  # fp32 singular value per vector (robust for tiny deltas)
FP16_BITS = 16  # a band stored unquantized

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP16_BITS)

# Delta-CoMe's schedule: 8 bits for the top 2 vectors, 3 bits for the next 32, 2 bits for the rest.
PAPER_SCHEDULE: tuple[tuple[int, int | None], ...] = ((8, 2), (3, 32), (2, None))


@dataclass(frozen=True)
class Band:
    bits: int
    count: int


def _padded(length: int) -> int:
    return -(-length // 8) * 8


def vector_cost_bits(bits: int, out_features: int, in_features: int, group_size: int) -> int:
    """Stored bits of one singular triple (u, s, v) at `bits` bits."""
    if bits == FP16_BITS:
        return FP16_BITS * (out_features + in_features) + S_BITS
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose from {SUPPORTED_BITS}")
    codes = bits * (_padded(out_features) + _padded(in_features))
    groups = math.ceil(out_features / group_size) + math.ceil(in_features / group_size)
    return codes + groups * (SCALE_BITS + ZERO_BITS) + S_BITS


def budget_bits(out_features: int, in_features: int, alpha: float) -> int:
    """`alpha` is the delta's size as a fraction of the fp16 matrix (1/16 = 1 bit per parameter)."""
    return math.floor(alpha * 16 * out_features * in_features)


def bands_cost_bits(bands, out_features: int, in_features: int, group_size: int) -> int:
    return sum(b.count * vector_cost_bits(b.bits, out_features, in_features, group_size) for b in bands)


def allocate(
    out_features: int,
    in_features: int,
    alpha: float,
    schedule=PAPER_SCHEDULE,
    group_size: int = 128,
    max_rank: int | None = None,
) -> tuple[Band, ...]:
    """Fill `schedule` ((bits, count or None = as many as fit), ...) greedily within the budget.

    Bands are filled in order; a band that cannot be filled completely takes what fits and the
    remaining budget flows to the next (cheaper) band, so every shape — square, MLP, GQA k/v — ends
    up at or below `alpha`. `max_rank` caps the total number of vectors (the delta's rank).
    """
    if not (alpha > 0):
        raise ValueError(f"alpha must be positive, got {alpha}")
    rank_left = min(out_features, in_features) if max_rank is None else min(max_rank, out_features, in_features)
    bits_left = budget_bits(out_features, in_features, alpha)
    bands = []
    for bits, count in schedule:
        cost = vector_cost_bits(bits, out_features, in_features, group_size)
        want = rank_left if count is None else min(count, rank_left)
        take = min(want, bits_left // cost)
        if take > 0:
            bands.append(Band(bits, take))
            bits_left -= take * cost
            rank_left -= take
    return tuple(bands)


# --- Error-optimal allocation -------------------------------------------------------------------
#
# Instead of a fixed schedule, every singular vector picks its own width from a candidate set to
# minimise  Σ_i σ_i² · e_i(b_i)  subject to  Σ_i cost(b_i) ≤ budget, where e_i(b) is the measured
# relative squared error of the quantized rank-1 term i at b bits (e_i(0) = 1: the vector is
# dropped). The rank-1 terms of an SVD are orthogonal, so this sum is (up to cross terms between
# quantization errors) the squared error of the whole delta.

OPTIMAL_CANDIDATES = (0, 2, 3, 4, 8)  # 0 = the vector is dropped


def candidate_costs(candidates, out_features: int, in_features: int, group_size: int) -> list[int]:
    """Stored bits of one singular triple at each candidate width (0 bits = dropped = free)."""
    return [0 if b == 0 else vector_cost_bits(b, out_features, in_features, group_size) for b in candidates]


def max_candidate_vectors(out_features: int, in_features: int, alpha: float, candidates, group_size: int) -> int:
    """How many singular vectors the optimal allocation can possibly keep (the SVD rank it needs)."""
    costs = [c for c in candidate_costs(candidates, out_features, in_features, group_size) if c > 0]
    if not costs:
        return 0
    return min(min(out_features, in_features), budget_bits(out_features, in_features, alpha) // min(costs))


def error_table(u_rows, v_rows, candidates, quantize_fn, hessian=None, quantize_v_fn=None, out_weight=None):
    """Measured quantization error of every rank-1 term `u_i v_iᵀ` at every candidate width.

    `u_rows` (r, out) and `v_rows` (r, in) are the two singular vectors of each term (any norm);
    `quantize_fn(rows, bits) -> dequantized rows` is the quantizer (RTN in practice);
    `quantize_v_fn`, if given, quantizes the v rows instead (e.g. GPTQ against the same H: its rows
    are quantized independently of each other, so the per-vector table stays exact).
    With `hessian` H (in, in), errors are measured in the layer's output space:
    ‖X(ûv̂ᵀ - uvᵀ)ᵀ‖² = ‖û‖² v̂ᵀHv̂ - 2(ûᵀu)(v̂ᵀHv) + ‖u‖² vᵀHv, otherwise in Frobenius norm (H = I).

    With `out_weight` d (out,), the outputs are weighted too (‖D^½ X(...)ᵀ‖², D = diag(d): a K-FAC
    style proxy of the loss when d is the diagonal Fisher of the outputs): every ‖û‖², ûᵀu, ‖u‖²
    becomes ûᵀDû, ûᵀDu, uᵀDu.

    Returns (`rel` (r, C) float64: error / energy of the term, 1 for a 0-bit candidate; `energy`
    (r,) float64: (uᵀDu) vᵀHv, the squared size of the term). Pass `s · sqrt(energy)` as `sigma`
    to `optimal_allocation` to weight each term by its real contribution.
    """
    u = u_rows.double()
    v = v_rows.double()
    r = u.shape[0]
    hv = v if hessian is None else v @ hessian.double()
    d = None if out_weight is None else torch.as_tensor(out_weight).to(device=u.device, dtype=torch.float64)
    du = u if d is None else u * d
    uu = (u * du).sum(1)
    vhv = (v * hv).sum(1)
    energy = uu * vhv
    safe = torch.where(energy > 0, energy, torch.ones_like(energy))
    rel = torch.ones(r, len(candidates), dtype=torch.float64, device=u.device)
    for c, bits in enumerate(candidates):
        if bits == 0 or r == 0:
            continue
        uq = quantize_fn(u_rows, bits).double()
        vq = (quantize_v_fn or quantize_fn)(v_rows, bits).double()
        hvq = vq if hessian is None else vq @ hessian.double()
        duq = uq if d is None else uq * d
        err = (uq * duq).sum(1) * (vq * hvq).sum(1) - 2 * (uq * du).sum(1) * (vq * hv).sum(1) + energy
        rel[:, c] = torch.where(energy > 0, err.clamp_min(0) / safe, torch.zeros_like(err))
    return rel, energy


def optimal_allocation(sigma, err_table, costs, budget_bits: int):
    """Index of the chosen candidate for every vector, minimising Σ σ_i² e_i(c_i) within the budget.

    `sigma` (r,), `err_table` (r, C) relative errors, `costs` (C,) bits per vector of each
    candidate (a 0-cost candidate, "dropped", makes every budget feasible). Lagrangian relaxation:
    for a multiplier λ every vector independently takes argmin σ²e + λ·cost; a bisection on log λ
    finds the cheapest λ within budget, then a greedy pass spends what is left on the upgrades with
    the best error reduction per bit. Returns a long tensor (r,) of candidate indices.
    """
    sigma = torch.as_tensor(sigma).double().cpu()
    table = torch.as_tensor(err_table).double().cpu()
    r = sigma.numel()
    cost = torch.as_tensor(list(costs), dtype=torch.float64)
    if table.shape != (r, cost.numel()):
        raise ValueError(f"err_table has shape {tuple(table.shape)}, expected ({r}, {cost.numel()})")
    # Ties go to the cheaper candidate: argmin returns the first minimum, so sort by cost.
    order = torch.argsort(cost, stable=True)
    cost, table = cost[order], table[:, order]
    dist = sigma[:, None] ** 2 * table  # (r, C)
    if r == 0:
        return torch.zeros(0, dtype=torch.long)
    if cost[0] * r > budget_bits:
        raise ValueError(
            f"even the cheapest candidate ({int(cost[0])} bits) for all {r} vectors exceeds the budget of "
            f"{budget_bits} bits; include 0 (drop) among the candidates"
        )

    def pick(lam: float):
        return torch.argmin(dist + lam * cost, dim=1)

    def spent(choice) -> float:
        return float(cost[choice].sum())

    choice = pick(0.0)
    if spent(choice) > budget_bits:
        gaps = torch.diff(torch.unique(cost))
        # Above `hi` every vector takes the cheapest candidate.
        hi = float((dist.max() - dist.min()) / gaps.min()) * 2 + 1e-300
        lo = hi * 1e-40
        if spent(pick(lo)) <= budget_bits:
            hi = lo
        else:
            for _ in range(80):
                mid = (lo * hi) ** 0.5
                if spent(pick(mid)) <= budget_bits:
                    hi = mid
                else:
                    lo = mid
        choice = pick(hi)
    # Greedy fix-up: spend the leftover budget on the best error reduction per bit.
    rows = torch.arange(r)
    left = budget_bits - spent(choice)
    for _ in range(r * cost.numel()):
        dc = cost[None, :] - cost[choice][:, None]
        gain = dist[rows, choice][:, None] - dist
        ok = (dc > 0) & (dc <= left) & (gain > 0)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, gain / dc.clamp_min(1e-300), torch.full_like(gain, -1.0))
        flat = int(torch.argmax(ratio))
        i, c = divmod(flat, cost.numel())
        left -= float(dc[i, c])
        choice[i] = c
    return order[choice]


def global_allocation(dists, costs, budget_bits: float, caps=None):
    """One allocation over many matrices under one byte budget (`allocation="global"`).

    dists: per matrix m an (r_m, C) tensor, the absolute error of its vector i at candidate c, already
        weighted (σ², the layer's sensitivity) so that errors of different matrices add up;
    costs: per matrix the (C,) stored bits of one vector at each candidate (they differ by shape; the
        same candidate order for all, cheapest first after sorting);
    budget_bits: Σ over all matrices and vectors of the chosen costs must not exceed it;
    caps: per matrix the most bits it may spend (None: no cap).

    Minimises Σ_m Σ_i dists[m][i, c_mi]. Lagrangian relaxation, as `optimal_allocation` but with one
    multiplier λ for all matrices: every vector takes argmin dist + λ_m·cost with λ_m = max(λ, λ_cap,m),
    λ_cap,m the smallest multiplier that keeps matrix m within its cap; a bisection on λ meets the
    budget; a greedy pass then spends what is left on the best error reduction per bit (within the
    budget and the caps). Returns (choices: list of long (r_m,) candidate indices, info: {"spent",
    "objective", "lower_bound"} — the Lagrangian dual bound, so objective − lower_bound bounds how far
    from the exact optimum the answer can be).
    """
    m_count = len(dists)
    if len(costs) != m_count or (caps is not None and len(caps) != m_count):
        raise ValueError("dists, costs and caps need one entry per matrix")
    if m_count == 0:
        return [], {"spent": 0.0, "objective": 0.0, "lower_bound": 0.0}
    cost_rows = [torch.as_tensor(list(c), dtype=torch.float64) for c in costs]
    n_cand = cost_rows[0].numel()
    order = torch.argsort(cost_rows[0], stable=True)
    tables = []
    for m, (d, c) in enumerate(zip(dists, cost_rows)):
        d = torch.as_tensor(d).double().cpu()
        if c.numel() != n_cand or d.dim() != 2 or d.shape[1] != n_cand:
            raise ValueError(f"matrix {m}: dists {tuple(d.shape)} and costs {tuple(c.shape)} disagree on the candidates")
        if bool((torch.diff(c[order]) < 0).any()):
            raise ValueError(f"matrix {m}: candidate costs {c.tolist()} are not in the same order as the first matrix's")
        tables.append(d[:, order])
    cost_rows = [c[order] for c in cost_rows]
    sizes = [t.shape[0] for t in tables]
    owner = torch.repeat_interleave(torch.arange(m_count), torch.tensor(sizes, dtype=torch.long))
    D = torch.cat(tables) if sum(sizes) else torch.zeros(0, n_cand, dtype=torch.float64)
    K = torch.stack(cost_rows)[owner]  # (R, C) bits of each candidate of each row
    R = D.shape[0]
    cap = torch.full((m_count,), math.inf, dtype=torch.float64) if caps is None else \
        torch.tensor([math.inf if c is None else float(c) for c in caps], dtype=torch.float64)
    floor_spend = torch.zeros(m_count, dtype=torch.float64).index_add_(0, owner, K[:, 0])
    if bool((floor_spend > cap).any()) or float(floor_spend.sum()) > budget_bits:
        raise ValueError("even the cheapest candidate for every vector exceeds the budget or a cap; include 0 (drop) "
                         "among the candidates")
    rows = torch.arange(R)
    gaps = torch.diff(torch.unique(K)) if R else torch.ones(1, dtype=torch.float64)
    gaps = gaps[gaps > 0]
    # Above `top` every vector takes its cheapest candidate.
    top = (float((D.max() - D.min()) / gaps.min()) * 2 if R and gaps.numel() else 1.0) + 1e-300

    def pick(lam_rows):
        return torch.argmin(D + lam_rows[:, None] * K, dim=1)

    def spend_by_matrix(choice):
        return torch.zeros(m_count, dtype=torch.float64).index_add_(0, owner, K[rows, choice])

    def bisect(fits, lo, hi):
        """Smallest multiplier in [lo, hi] (log scale) for which `fits` holds (it holds at hi)."""
        if fits(lo):
            return lo
        lo = max(lo, hi * 1e-40)
        if fits(lo):
            return lo
        for _ in range(80):
            mid = (lo * hi) ** 0.5
            if fits(mid):
                hi = mid
            else:
                lo = mid
        return hi

    # λ_cap of each matrix: the smallest multiplier keeping it within its cap (0 when uncapped).
    lam_cap = torch.zeros(m_count, dtype=torch.float64)
    for m in range(m_count):
        if math.isinf(float(cap[m])) or sizes[m] == 0:
            continue
        sel = owner == m
        Dm, Km = D[sel], K[sel]
        rm = torch.arange(Dm.shape[0])

        def fits_cap(lam, Dm=Dm, Km=Km, rm=rm, m=m):
            return float(Km[rm, torch.argmin(Dm + lam * Km, dim=1)].sum()) <= float(cap[m])

        lam_cap[m] = bisect(fits_cap, 0.0, top)

    def lam_rows(lam):
        return torch.clamp(lam_cap, min=lam)[owner]

    def fits_budget(lam):
        return float(K[rows, pick(lam_rows(lam))].sum()) <= budget_bits

    lam = bisect(fits_budget, 0.0, top)
    choice = pick(lam_rows(lam))
    def upgrade(choice, spent_m, left: float) -> float:
        """Greedy fix-up within the budget and the caps: the best error drop per bit that still fits,
        until none fits (`choice` and `spent_m` updated in place); returns the bits left."""
        for _ in range(R * n_cand):
            dc = K - K[rows, choice][:, None]
            gain = D[rows, choice][:, None] - D
            room = torch.clamp(cap - spent_m, max=left)[owner][:, None]
            ok = (dc > 0) & (dc <= room) & (gain > 0)
            if not bool(ok.any()):
                break
            ratio = torch.where(ok, gain / dc.clamp_min(1e-300), torch.full_like(gain, -1.0))
            i, c = divmod(int(torch.argmax(ratio)), n_cand)
            left -= float(dc[i, c])
            spent_m[owner[i]] += dc[i, c]
            choice[i] = c
        return left

    spent_m = spend_by_matrix(choice)
    left = upgrade(choice, spent_m, budget_bits - float(spent_m.sum()))
    # Exchange pass: one vector gives bits back so that another can take a better width (what a single
    # multiplier cannot see when the budget is a few vectors wide). Each step strictly lowers the objective.
    for _ in range(R):
        cur_cost, cur_err = K[rows, choice], D[rows, choice]
        dc = K - cur_cost[:, None]
        delta_err = D - cur_err[:, None]
        room = (cap - spent_m)[owner][:, None]
        up = (dc > left) & (dc <= room) & (delta_err < 0)  # upgrades the leftover alone cannot pay for
        down = (dc < 0) & torch.isfinite(delta_err)
        if not bool(up.any()) or not bool(down.any()):
            break
        d_rows, d_cols = down.nonzero(as_tuple=True)
        freed, loss = -dc[d_rows, d_cols], delta_err[d_rows, d_cols]
        srt = torch.argsort(freed)
        freed, loss, d_rows, d_cols = freed[srt], loss[srt], d_rows[srt], d_cols[srt]
        # suffix minimum of the loss over downgrades freeing at least a given amount
        rev = torch.flip(loss, [0])
        run_min, run_arg = torch.cummin(rev, 0)
        suf_min = torch.flip(run_min, [0])
        suf_arg = (loss.numel() - 1) - torch.flip(run_arg, [0])
        u_rows, u_cols = up.nonzero(as_tuple=True)
        need = dc[u_rows, u_cols] - left
        pos = torch.searchsorted(freed, need)
        ok = pos < freed.numel()
        if not bool(ok.any()):
            break
        u_rows, u_cols, pos = u_rows[ok], u_cols[ok], pos[ok]
        net = delta_err[u_rows, u_cols] + suf_min[pos]  # < 0: the pair lowers the objective
        moved = False
        for k in torch.argsort(net).tolist():
            if float(net[k]) >= 0:
                break
            j, cj = int(u_rows[k]), int(u_cols[k])
            i_idx = int(suf_arg[pos[k]])
            i, ci = int(d_rows[i_idx]), int(d_cols[i_idx])
            if i == j:
                continue
            left -= float(dc[j, cj]) + float(dc[i, ci])
            spent_m[owner[j]] += dc[j, cj]
            spent_m[owner[i]] += dc[i, ci]
            choice[j], choice[i] = cj, ci
            moved = True
            break
        if not moved:
            break
        left = upgrade(choice, spent_m, left)  # what the exchange freed may now pay for plain upgrades
    lam_final = lam_rows(lam)
    dual = float((D + lam_final[:, None] * K).min(dim=1).values.sum()) - lam * budget_bits
    finite = ~torch.isinf(cap)
    dual -= float(((torch.clamp(lam_cap, min=lam) - lam)[finite] * cap[finite]).sum())
    info = {"spent": float(K[rows, choice].sum()), "objective": float(D[rows, choice].sum()), "lower_bound": dual}
    chosen = order[choice]
    return list(chosen.split(sizes)), info


def bands_from_widths(widths):
    """Group per-vector widths into bands: (permutation, bands).

    Vectors are ordered by width (descending; 0 = dropped vectors are left out), keeping their
    original order within a width. The delta is a sum of rank-1 terms, so permuting the singular
    triples with `perm` before storing them changes nothing but their order.
    """
    widths = torch.as_tensor(widths, dtype=torch.long).cpu()
    perm, bands = [], []
    for bits in sorted({int(b) for b in widths.tolist() if b != 0}, reverse=True):
        idx = torch.nonzero(widths == bits).flatten()
        perm.append(idx)
        bands.append(Band(bits, idx.numel()))
    perm = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.long)
    return perm, tuple(bands)
