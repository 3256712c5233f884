"""One budget for the whole model: `allocate.global_allocation`, `budget.py` and `allocation="global"`.

Measured on this machine (bounds keep a margin):
- synthetic tables (6 matrices, 40–120 vectors, 5 candidates, sensitivities spread over 100x):
  objective 0.05–0.7 % above the Lagrangian lower bound, 0.62–0.89x the per-matrix optimal
  allocation of the same tables;
- brute force over every allocation of 2 matrices x 3 vectors (5^6): the global answer is the optimum
  in 29 of 40 cases, at most 1.46x it (a budget only a few vectors wide);
- tiny Llama (anisotropic, structured fine-tune), alpha 1/16: weight-space error Σ‖ΔW − ΔŴ‖²_F
  global / per-matrix optimal = 0.50; model-level bytes 1.000 of the budget; matrices at 0.83–1.63
  bits per parameter.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor, compress_, delta_report
from deltacome_ao.allocate import (
    OPTIMAL_CANDIDATES,
    budget_bits,
    candidate_costs,
    global_allocation,
    optimal_allocation,
)
from deltacome_ao.budget import GlobalPlan, MatrixTable, solve_plan
from deltacome_ao.checkpoint import BaseWeights
from tiny_models import ids, logits_error, structured_finetune, tiny

GROUP = 32


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def synthetic(sizes, shapes, seed=0):
    """Error tables shaped like measured ones: σ² decaying per matrix, relative error ≈ 4^-bits;
    matrices differ in scale by up to 100x (the layers' sensitivities)."""
    g = torch.Generator().manual_seed(seed)
    tables, costs = [], []
    typical = torch.tensor([1.0, 0.12, 0.03, 0.008, 3e-5], dtype=torch.float64)
    for r, (m, n) in zip(sizes, shapes):
        sigma2 = (torch.arange(r, dtype=torch.float64) + 1) ** -1.5 * 10 ** (2 * torch.rand(1, generator=g, dtype=torch.float64))
        rel = typical * torch.exp(0.3 * torch.randn(r, 5, generator=g, dtype=torch.float64))
        rel[:, 0] = 1
        tables.append(sigma2[:, None] * rel)
        costs.append(candidate_costs(OPTIMAL_CANDIDATES, m, n, GROUP))
    return tables, costs


SHAPES = [(64, 64), (128, 64), (64, 128), (32, 64), (96, 64), (64, 96)]


@pytest.mark.parametrize("seed", range(5))
def test_meets_the_budget_and_caps_and_beats_per_matrix(seed):
    sizes = [40, 120, 80, 60, 100, 50]
    tables, costs = synthetic(sizes, SHAPES, seed)
    own = [budget_bits(m, n, 1 / 16) for m, n in SHAPES]
    caps = [2 * b for b in own]
    budget = sum(own)
    choices, info = global_allocation(tables, costs, budget, caps)
    spent = [sum(c[int(i)] for i in ch) for c, ch in zip(costs, choices)]
    assert sum(spent) == info["spent"] <= budget
    # nothing affordable is left unspent: less than one vector's cheapest nonzero cost
    assert budget - sum(spent) < max(min(x for x in c if x > 0) for c in costs)
    assert all(s <= cap for s, cap in zip(spent, caps))
    objective = sum(float(t[torch.arange(len(ch)), ch].sum()) for t, ch in zip(tables, choices))
    assert objective == pytest.approx(info["objective"])
    assert info["lower_bound"] <= objective <= info["lower_bound"] * 1.01 + 1e-12
    per_matrix = sum(
        float(t[torch.arange(t.shape[0]), optimal_allocation(torch.ones(t.shape[0], dtype=torch.float64), t, c, b)].sum())
        for t, c, b in zip(tables, costs, own))
    assert objective <= per_matrix


def test_against_enumeration_on_tiny_problems():
    shapes = [(64, 64), (128, 32)]
    exact, ratios = 0, []
    for seed in range(40):
        tables, costs = synthetic([3, 3], shapes, seed)
        budget = budget_bits(64, 64, 1 / 16) // 3 + budget_bits(128, 32, 1 / 16) // 3
        caps = [None, budget_bits(128, 32, 1 / 16) // 4]
        choices, info = global_allocation(tables, costs, budget, caps)
        best = math.inf
        for combo in itertools.product(range(5), repeat=6):
            a, b = combo[:3], combo[3:]
            sa, sb = sum(costs[0][i] for i in a), sum(costs[1][i] for i in b)
            if sa + sb > budget or sb > caps[1]:
                continue
            best = min(best, sum(float(tables[0][k, i]) for k, i in enumerate(a))
                       + sum(float(tables[1][k, i]) for k, i in enumerate(b)))
        assert info["lower_bound"] <= best * (1 + 1e-9) <= info["objective"] * (1 + 2e-9)  # the dual bound holds
        exact += info["objective"] <= best * (1 + 1e-9)
        ratios.append(info["objective"] / best)
    # a Lagrangian answer is near-exact when the budget is many vectors wide (test above: within 1 % of
    # the dual bound); with 6 vectors the granularity shows: measured 29 of 40 exact, worst 1.46x
    assert exact >= 25 and max(ratios) < 2


def test_bad_input_is_refused():
    tables, costs = synthetic([4, 4], SHAPES[:2])
    with pytest.raises(ValueError, match="one entry per matrix"):
        global_allocation(tables, costs[:1], 10_000)
    with pytest.raises(ValueError, match="disagree on the candidates"):
        global_allocation([tables[0][:, :3], tables[1]], costs, 10_000)
    no_drop = [c[1:] for c in costs]
    with pytest.raises(ValueError, match="cheapest candidate"):
        global_allocation([t[:, 1:] for t in tables], no_drop, 10)
    assert global_allocation([], [], 100) == ([], {"spent": 0.0, "objective": 0.0, "lower_bound": 0.0})


def test_solve_plan_keeps_per_matrix_when_it_is_better():
    tables, costs = synthetic([30, 30], SHAPES[:2], seed=3)
    own = [budget_bits(m, n, 1 / 16) for m, n in SHAPES[:2]]
    mts = [MatrixTable(f"m{i}", SHAPES[i], 30, t, c, b, 4 * b) for i, (t, c, b) in enumerate(zip(tables, costs, own))]
    plan = solve_plan(mts, OPTIMAL_CANDIDATES)
    assert isinstance(plan, GlobalPlan)
    assert plan.objective <= plan.per_matrix_objective
    assert sum(plan.bits.values()) <= plan.budget == sum(own)
    assert set(plan.widths) == {"m0", "m1"} and all(len(w) == 30 for w in plan.widths.values())


def _weight_error(model, ft):
    """Σ over compressed matrices of ‖ΔŴ − ΔW‖²_F (ΔW the real delta)."""
    total = 0.0
    modules = dict(ft.named_modules())
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, MixedPrecisionDeltaTensor):
            total += float((w.dequantize().float() - modules[name].weight.detach().float()).pow(2).sum())
    return total


def test_global_end_to_end_meets_the_model_budget_and_beats_per_matrix():
    base = tiny(anisotropic=True)
    ft = structured_finetune(base, rank=8)
    errors, models = {}, {}
    for allocation in ("optimal", "global"):
        model = copy.deepcopy(ft)
        config = DeltaCoMeConfig(base=base, alpha=1 / 16, group_size=GROUP, allocation=allocation, progress=False)
        compress_(model, config)
        models[allocation], errors[allocation] = model, _weight_error(model, ft)
    rows = delta_report(models["global"])
    fp16_bytes = sum(2 * math.prod(r["shape"]) for r in rows)
    stored = sum(r["delta_bytes"] for r in rows)
    budget = sum(budget_bits(*r["shape"], 1 / 16) for r in rows) / 8
    plan = models["global"].deltacome_plan
    # the model-level budget: every stored byte counted, within 1 % below it (measured 0.999)
    assert stored <= budget <= fp16_bytes / 16
    assert stored >= 0.99 * budget
    assert stored * 8 == pytest.approx(sum(plan.bits.values()), abs=8 * len(rows))
    for r in rows:  # per-matrix caps
        assert r["delta_bytes"] * 8 <= 4 * budget_bits(*r["shape"], 1 / 16) + 8
    # bits moved between matrices (not every matrix at its own budget)
    spread = sorted(r["bits_per_param"] for r in rows)
    assert spread[-1] > 1.2 and spread[0] < 0.9  # measured 0.83 .. 1.63
    assert plan.objective <= plan.per_matrix_objective
    assert errors["global"] <= 0.7 * errors["optimal"]  # measured 0.50
    x = ids(99, 8, length=32)
    assert logits_error(models["global"], ft, x) < 0.05


def test_global_with_self_calibration_records_how_it_was_made(tmp_path):
    from deltacome_ao import load_delta, save_delta

    base = tiny(anisotropic=True, max_position_embeddings=128)  # "self" samples 128 tokens: within the context
    ft = structured_finetune(base)
    model = copy.deepcopy(ft)
    config = DeltaCoMeConfig(base=base, alpha=1 / 32, group_size=GROUP, allocation="global",
                             calibration="self", global_cap=3.0, progress=False)
    compress_(model, config)
    assert model.deltacome_plan.sensitivity == "fisher"
    save_delta(model, tmp_path / "d", base=base, config=config)
    document = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert document["allocation"] == "global" and document["calibrated"] is True
    assert document["calibration"]["source"] == "self" and document["calibration"]["samples"] == 64
    assert document["global_allocation"] == {"cap": 3.0, "sensitivity": "fisher"}
    restored = load_delta(copy.deepcopy(base), tmp_path / "d")
    x = ids(7, 2, length=16)
    with torch.no_grad():
        assert torch.equal(restored(x).logits, model(x).logits)


def test_config_refuses_what_global_cannot_do():
    base = tiny()
    with pytest.raises(ValueError, match="unknown allocation 'globl'"):
        DeltaCoMeConfig(base=base, allocation="globl")
    with pytest.raises(ValueError, match=r"allocation='global' needs a method that chooses widths itself"):
        DeltaCoMeConfig(base=base, allocation="global", method="single")
    with pytest.raises(ValueError, match="bands"):
        DeltaCoMeConfig(base=base, allocation="global", bands=((8, 2), (2, 10)))
    with pytest.raises(ValueError, match="global_cap must be a number >= 1"):
        DeltaCoMeConfig(base=base, allocation="global", global_cap=0.5)
    with pytest.raises(ValueError, match="unknown global_sensitivity 'hessian'"):
        DeltaCoMeConfig(base=base, allocation="global", global_sensitivity="hessian")
    with pytest.raises(ValueError, match="global_sensitivity='fisher' needs calibration"):
        DeltaCoMeConfig(base=base, allocation="global", global_sensitivity="fisher")
    # one matrix alone has no model to plan over
    config = DeltaCoMeConfig(base=base, allocation="global")
    w = base.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match="for one matrix alone use allocation='optimal'"):
        config.compress(w + 0.01, w, "model.layers.0.mlp.up_proj")


def test_streaming_refuses_global(tmp_path):
    from deltacome_ao.streaming import compress_streaming

    base = tiny()
    ft = structured_finetune(base)
    base.save_pretrained(tmp_path / "b")
    ft.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="allocation='global' plans one budget over every matrix first"):
        compress_streaming(tmp_path / "b", tmp_path / "f", tmp_path / "out", allocation="global")
    assert not (tmp_path / "out").exists()


def test_an_alpha_that_holds_no_vector_anywhere_is_refused_not_the_base():
    # every matrix's cap too small for one singular vector: the plan would drop every delta and leave
    # the base's weights in place of the fine-tune's; "paper" / "optimal" raise, so must "global"
    from deltacome_ao.methods.mixed_precision import BudgetTooSmallError

    base = tiny()
    ft = structured_finetune(base)
    model = copy.deepcopy(ft)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetTooSmallError, match=r"allocation='global'.*raise alpha"):
        compress_(model, DeltaCoMeConfig(base=base, alpha=1e-5, group_size=GROUP, allocation="global", progress=False))
    assert not hasattr(model, "deltacome_plan")
    assert all(type(v) is torch.Tensor and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_pretrained_records_the_global_allocation(tmp_path):
    # the HF checkpoint's quantization_config says how the delta was made, as delta_config.json does
    from transformers import AutoModelForCausalLM

    base = tiny()
    model = copy.deepcopy(structured_finetune(base))
    compress_(model, DeltaCoMeConfig(base=base, alpha=1 / 16, group_size=GROUP, allocation="global", global_cap=3.0,
                                     progress=False))
    model.save_pretrained(tmp_path / "m")
    how = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert how["allocation"] == "global"
    assert how["global_allocation"] == {"cap": 3.0, "sensitivity": "weight"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.quantization_config.global_allocation == {"cap": 3.0, "sensitivity": "weight"}


def test_global_options_without_global_allocation_are_refused():
    # they would be ignored: the user asked for a cap or a proxy and got the per-matrix allocation
    base = tiny()
    with pytest.raises(ValueError, match="apply only with allocation='global'"):
        DeltaCoMeConfig(base=base, global_cap=8.0)
    with pytest.raises(ValueError, match="apply only with allocation='global'"):
        DeltaCoMeConfig(base=base, allocation="optimal", global_sensitivity="fisher", calibration="self")
    DeltaCoMeConfig(base=base, allocation="optimal", global_cap=4.0)  # the default is fine
