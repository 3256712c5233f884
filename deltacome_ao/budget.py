"""`allocation="global"`: one byte budget for the whole model, spent where it lowers the error most.

With "paper" and "optimal" every matrix spends `alpha` of its own fp16 size. With "global", `alpha`
is the model-level ratio: the stored bytes of all compressed matrices together are at most alpha ×
their fp16 bytes, and bits move between matrices (and so between layers) to minimise one measured
proxy of the output error. Planning is a first pass over every matrix before any is compressed:

1. Per matrix: the delta's top singular vectors (as many as the matrix's cap can hold), and the
   measured error of each vector at each candidate width (`methods.mixed_precision.vector_errors`,
   the table the per-matrix optimal allocation uses) — small next to the weights (r × C numbers).
2. Sensitivity, so that errors of different matrices add up to one proxy:
   - "weight" (data-free): the squared error of the delta in weight space, σ²-weighted (‖ΔW − ΔŴ‖²_F);
   - "output": in each layer's output space, ‖X (ΔW − ΔŴ)ᵀ‖² with the layer's input Hessian
     H = XᵀX / N from calibration sequences (the fine-tuned model's own activations);
   - "fisher": the same, each output weighted by the diagonal Fisher of the layer's outputs
     (E[(∂ℓ/∂y)²] over the calibration tokens, ℓ the next-token loss): a K-FAC estimate of the loss
     increase, comparable across layers and depths.
3. One allocation over all vectors of all matrices (`allocate.global_allocation`: one Lagrange
   multiplier, a per-matrix cap, greedy fix-up; its dual bound says how near the optimum it is),
   kept only if it beats the per-matrix optimal allocation of the same tables on the same proxy
   (which is always feasible), so it is never worse on its own proxy.
4. Each matrix is then compressed with its chosen widths (`SVDDeltaOptions.widths`), with RTN or,
   when calibrated, layer-sequential GPTQ as usual.

Caps: a matrix may spend at most `cap` × (alpha × its fp16 bits) (default 4) and at least nothing
(all its vectors dropped), so no layer's delta grows beyond a few times what the paper schedule
would give it (the kernels' per-layer cost stays bounded).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .allocate import budget_bits, candidate_costs, global_allocation, max_candidate_vectors, optimal_allocation
from .decompose import any_nonzero, weight_delta
from .methods.mixed_precision import BudgetTooSmallError, normalized_svd, svd_options, vector_errors, with_planned_widths

__all__ = ["MatrixTable", "GlobalPlan", "SENSITIVITIES", "DEFAULT_CAP", "matrix_table", "solve_plan",
           "layer_matrices", "layer_statistics", "plan_global"]

SENSITIVITIES = ("weight", "output", "fisher")
DEFAULT_CAP = 4.0


@dataclass
class MatrixTable:
    """What the plan needs of one matrix: `errors` (r, C) float64 absolute proxy error of each of its
    top singular vectors at each candidate width, `costs` (C,) bits per vector, `rank` the SVD rank
    taken (the widths the plan returns have this length), its own alpha budget and cap in bits."""

    name: str
    shape: tuple[int, int]
    rank: int
    errors: torch.Tensor
    costs: list[int]
    budget: int
    cap: int


@dataclass
class GlobalPlan:
    """The plan: per matrix its widths (singular-value order, 0 = dropped), and how it was reached."""

    widths: dict[str, tuple[int, ...]]
    bits: dict[str, int]  # stored bits each matrix spends
    budget: int  # the model-level budget in bits (Σ of the matrices' alpha budgets)
    objective: float  # the proxy of the chosen allocation
    per_matrix_objective: float  # the proxy of the per-matrix optimal allocation of the same tables
    lower_bound: float  # Lagrangian dual bound of the global problem
    solver: str  # "global" or "per-matrix" (the per-matrix allocation was better: kept)
    sensitivity: str
    extra: dict = field(default_factory=dict)


def matrix_table(name: str, delta: torch.Tensor, options, alpha: float, cap: float = DEFAULT_CAP,
                 hessian: Optional[torch.Tensor] = None, out_weight: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> MatrixTable:
    """The error table of one fp32 (out, in) delta (`options`: `SVDDeltaOptions`, `alpha` the per-matrix
    ratio the cap is relative to); `scale` multiplies every error (a sensitivity known only as a number)."""
    out_features, in_features = delta.shape
    own = budget_bits(out_features, in_features, alpha)
    cap_bits = math.floor(cap * own)
    costs = candidate_costs(options.candidates, out_features, in_features, options.group_size)
    rank = max_candidate_vectors(out_features, in_features, cap * alpha, options.candidates, options.group_size)
    if rank == 0 or not any_nonzero(delta):
        return MatrixTable(name, (out_features, in_features), rank, torch.zeros(0, len(costs), dtype=torch.float64),
                           costs, own, cap_bits)
    whiten = hessian if options.whiten else None
    u_rows, s, v_rows = normalized_svd(delta, rank, options.svd, whiten, options.damp)
    errors = vector_errors(u_rows, s, v_rows, options, hessian, out_weight) * scale
    return MatrixTable(name, (out_features, in_features), rank, errors, costs, own, cap_bits)


def solve_plan(tables: list[MatrixTable], candidates, sensitivity: str = "weight") -> GlobalPlan:
    """One allocation over all `tables` under the sum of their own budgets (see the module docstring)."""
    budget = sum(t.budget for t in tables)
    choices, info = global_allocation([t.errors for t in tables], [t.costs for t in tables], budget,
                                      [t.cap for t in tables])
    per_matrix, per_objective = [], 0.0
    for t in tables:
        r = t.errors.shape[0]
        if r == 0:
            per_matrix.append(torch.zeros(0, dtype=torch.long))
            continue
        c = optimal_allocation(torch.ones(r, dtype=torch.float64), t.errors, t.costs, t.budget)
        per_matrix.append(c)
        per_objective += float(t.errors[torch.arange(r), c].sum())
    solver = "global"
    if per_objective < info["objective"]:
        choices, solver = per_matrix, "per-matrix"
    widths, bits, objective = {}, {}, 0.0
    cand = torch.tensor(list(candidates), dtype=torch.long)
    for t, c in zip(tables, choices):
        w = cand[c].tolist() if c.numel() else []
        widths[t.name] = tuple(w) + (0,) * (t.rank - len(w))
        bits[t.name] = int(sum(t.costs[int(i)] for i in c))
        objective += float(t.errors[torch.arange(len(c)), c].sum()) if len(c) else 0.0
    return GlobalPlan(widths, bits, budget, objective, per_objective, info["lower_bound"], solver, sensitivity)


# --- the matrices of a model, and their statistics ----------------------------------------------------


def layer_matrices(layer, finetuned: torch.Tensor, base: torch.Tensor):
    """(name, fine-tuned (out, in), base (out, in)) of each matrix `compress.compress_layer` compresses
    for `layer`, under the name it passes to the method (a stack of experts: one per expert)."""
    name = layer.name or "weight"
    if layer.form == "experts":
        mats_ft = finetuned.transpose(-2, -1) if layer.in_out else finetuned
        mats_base = base.transpose(-2, -1) if layer.in_out else base
        return [(f"{name}[{e}]", mats_ft[e], mats_base[e]) for e in range(finetuned.shape[0])]
    if layer.form == "conv1d":
        return [(name, finetuned.t(), base.t())]
    return [(name, finetuned, base)]


def _input_embeddings(root: nn.Module):
    get = getattr(root, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return emb


def _loss(out, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a causal LM's output on its own input ids."""
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def layer_statistics(root: nn.Module, targets, samples, fisher: bool = True) -> dict[str, dict]:
    """{layer key: {"hessian": XᵀX / N (in, in), "fisher": E[(∂ℓ/∂y)²] (out,)}} of every 2-D target
    (`compress.Layer`) that runs on `samples` (input_ids tensors), from the model's own weights: one
    forward (and, with `fisher`, one backward to the targets' outputs) per sample. The model is left as
    it was (no parameter gradient is kept)."""
    wanted = [t for t in targets if t.form in ("linear", "conv1d")]
    sums: dict[str, list] = {}
    outputs: list = []
    device = next(iter(root.parameters())).device

    def make_hook(key):
        def hook(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = sums.setdefault(key, [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0, None, 0])
            acc[0].addmm_(x.T, x)
            acc[1] += x.shape[0]
            if fisher and isinstance(out, torch.Tensor) and out.requires_grad:
                outputs.append((key, out))
        return hook

    def leaf(module, args, out):  # gradients reach the activations without any parameter needing one
        return out.detach().requires_grad_(True) if fisher and isinstance(out, torch.Tensor) else out

    handles = [t.module.register_forward_hook(make_hook(t.key)) for t in wanted]
    emb = _input_embeddings(root)
    if emb is not None:
        handles.append(emb.register_forward_hook(leaf))
    flags = [(p, p.requires_grad) for p in root.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for sample in samples:
            ids = sample["input_ids"] if isinstance(sample, dict) else torch.as_tensor(sample)
            ids = (ids[None] if ids.dim() == 1 else ids).to(device)
            outputs.clear()
            with torch.enable_grad() if fisher else torch.no_grad():
                out = root(input_ids=ids, use_cache=False) if hasattr(getattr(root, "config", None), "use_cache") \
                    else root(input_ids=ids)
                if fisher and outputs:
                    grads = torch.autograd.grad(_loss(out, ids), [o for _, o in outputs], allow_unused=True)
                    for (key, o), g in zip(outputs, grads):
                        if g is None:
                            continue
                        g = g.detach().reshape(-1, g.shape[-1]).float()
                        acc = sums[key]
                        acc[2] = (g * g).sum(0) if acc[2] is None else acc[2] + (g * g).sum(0)
                        acc[3] += g.shape[0]
            outputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    stats = {}
    for key, (xx, n, gg, m) in sums.items():
        stats[key] = {"hessian": xx / max(n, 1), "fisher": None if gg is None else gg / max(m, 1)}
    return stats


def plan_global(root: nn.Module, targets, config: Any, device: Any = None, calibration: Optional[Iterable] = None,
                sensitivity: Optional[str] = None, cap: Optional[float] = None, progress: bool = False):
    """The model-level plan of `config` (allocation "global") over `targets` (`compress.Layer`s) of
    `root` -> (a copy of `config` that compresses each matrix with its planned widths, `GlobalPlan`).

    calibration: input_ids samples for the "output" / "fisher" sensitivities (None: "weight").
    sensitivity: default "fisher" with calibration, else "weight"; cap: default `config.global_cap`
    (else `DEFAULT_CAP`)."""
    options = svd_options(config)
    cap = float(getattr(config, "global_cap", DEFAULT_CAP) if cap is None else cap)
    if sensitivity is None:
        sensitivity = "fisher" if calibration is not None else "weight"
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {sensitivity!r}; choose from {SENSITIVITIES}")
    if sensitivity != "weight" and calibration is None:
        raise ValueError(f"sensitivity {sensitivity!r} needs calibration samples")
    stats = layer_statistics(root, targets, calibration, fisher=sensitivity == "fisher") \
        if sensitivity != "weight" else {}
    tables, unmeasured, changed = [], [], False
    for layer in targets:
        finetuned = getattr(layer.module, layer.param).detach()
        if device is not None:
            finetuned = finetuned.to(device)
        base = config.base[layer.key].to(device=finetuned.device, dtype=finetuned.dtype)
        st = stats.get(layer.key)
        for name, f, b in layer_matrices(layer, finetuned, base):
            delta = weight_delta(f, b, name)
            changed = changed or any_nonzero(delta)
            if sensitivity == "weight":
                tables.append(matrix_table(name, delta, options, config.alpha, cap))
            elif st is None:  # no activations of its own (stacked experts): scaled below
                tables.append(matrix_table(name, delta, options, config.alpha, cap))
                unmeasured.append(len(tables) - 1)
            else:
                weight = st["fisher"] if sensitivity == "fisher" else None
                if weight is not None:
                    weight = weight.to(delta.device, torch.float64)
                tables.append(matrix_table(name, delta, options, config.alpha, cap, hessian=st["hessian"],
                                           out_weight=weight))
    if unmeasured:
        _scale_unmeasured(tables, unmeasured)
    plan = solve_plan(tables, options.candidates, sensitivity)
    if changed and not any(plan.bits.values()):  # every delta dropped: the model would become the base
        cheapest = min((c for t in tables for c in t.costs if c > 0), default=0)
        raise BudgetTooSmallError(
            f"allocation='global': alpha={config.alpha} gives the whole model {plan.budget} bits (at most "
            f"{cap:g}x alpha per matrix), but no matrix can hold a single singular vector (the cheapest costs "
            f"{cheapest} bits: codes, scales, zero-points and S), so every delta would be dropped and the "
            f"fine-tune replaced by the base; raise alpha or lower group_size")
    return with_planned_widths(config, plan.widths), plan


def _scale_unmeasured(tables: list[MatrixTable], unmeasured: list[int]) -> None:
    """Matrices without statistics have weight-space errors: bring them to the others' units by the median
    ratio (output-space energy / weight-space energy) of the measured ones."""
    measured = [i for i in range(len(tables)) if i not in set(unmeasured) and tables[i].errors.numel()]
    warnings.warn(f"{len(unmeasured)} matrices have no calibration activations of their own (e.g. stacked experts); "
                  f"their errors are weight-space errors scaled to the others' units", stacklevel=3)
    if not measured:
        return
    # the dropped column (the largest) is the term's energy in each table's own units
    ratios = []
    for i in measured:
        t = tables[i]
        ratios.append(float(t.errors.max(dim=1).values.sum()))
    ref = sorted(ratios)[len(ratios) // 2]
    weight_energy = sorted(float(tables[i].errors.max(dim=1).values.sum()) for i in unmeasured if tables[i].errors.numel())
    if weight_energy and weight_energy[len(weight_energy) // 2] > 0:
        factor = ref / weight_energy[len(weight_energy) // 2]
        for i in unmeasured:
            tables[i].errors = tables[i].errors * factor
