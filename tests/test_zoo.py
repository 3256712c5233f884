"""The zoo: real pairs of three architectures and three tasks are shipped, each fine-tune learned its
task, and Delta-CoMe compresses every one of them better than the baselines at the same bytes.
`benchmarks/quality.py --quick` (the issue's CI mode) runs and its claims hold on llama-arith."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig
from deltacome_ao.evaluate import kl_divergence
from deltacome_ao.pairs import PAIRS, REPO, ZOO, get_pair, load_pair


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_zoo_is_three_architectures_and_three_tasks():
    archs = {PAIRS[n].config().model_type for n in ZOO}
    tasks = {(type(PAIRS[n].task).__name__, getattr(PAIRS[n].task, "style", "")) for n in ZOO}
    assert archs == {"llama", "mistral", "qwen2"} and len(tasks) == 3


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_shipped_pair_learned_its_task(name):
    base_dir, ft_dir = get_pair(name)
    assert ft_dir == REPO / "assets" / "pairs" / name / "finetuned"
    meta = json.loads((ft_dir / "pair.json").read_text())
    assert meta["spec"]["name"] == name
    base, ft = load_pair(name)
    assert type(ft).__name__.lower().startswith(PAIRS[name].config().model_type)
    task = PAIRS[name].task
    assert task.accuracy(ft, n=50, seed=1) >= 0.9
    assert task.accuracy(base, n=50, seed=1) <= 0.1
    for (pname, pb), pf in zip(base.named_parameters(), ft.parameters()):
        assert not torch.equal(pb, pf), f"{name}: {pname} was not fine-tuned"
    if PAIRS[name].config().model_type == "qwen2":
        assert ft.model.layers[0].self_attn.q_proj.bias is not None
    if PAIRS[name].config().model_type == "phi3":  # fused projections: one matrix holds q, k and v
        assert ft.model.layers[0].self_attn.qkv_proj.weight.shape == (3 * ft.config.hidden_size, ft.config.hidden_size)


def test_new_pair_beyond_the_zoo_is_a_new_architecture_and_task():
    zoo_archs = {PAIRS[n].config().model_type for n in ZOO}
    zoo_tasks = {(type(PAIRS[n].task).__name__, getattr(PAIRS[n].task, "style", "")) for n in ZOO}
    spec = PAIRS["phi3-reverse"]
    assert spec.config().model_type not in zoo_archs and ("WordTask", "reverse") not in zoo_tasks
    assert spec.task.format("spoxle") == ("reverse(spoxle)=", "elxops")
    train, held = spec.task.train_items(), spec.task.heldout_items()
    assert len(held) == 1000 and not set(train) & set(held)


@pytest.mark.parametrize("name", ["mistral-code", "qwen2-json"])
def test_deltacome_beats_baselines_on_other_architectures(name):
    base, ft = load_pair(name)
    task = PAIRS[name].task
    batches = task.text_batches("task", n_batches=2)
    got = {}
    for method in ("deltacome", "bitdelta", "lowrank"):
        model = copy.deepcopy(ft)
        with torch.no_grad():
            quantize_(model, DeltaCoMeConfig(base=base, alpha=1 / 16, method=method, progress=False))
        got[method] = kl_divergence(model, ft, batches, start=task.answer_start)
        if method == "deltacome":
            assert task.accuracy(model, n=50, seed=1) >= 0.8 * task.accuracy(ft, n=50, seed=1)
    assert got["deltacome"] < got["bitdelta"] and got["deltacome"] < got["lowrank"], got


def test_quality_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("quality", Path(REPO, "benchmarks", "quality.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "q.json"
    quality.main(["--quick", "--problems", "50", "--json", str(out)])
    results = json.loads(out.read_text())
    claims = results["claims"]["llama-arith"]
    # (a) the deltas are long-tailed, the raw weights are not
    for kind, energy in claims["a_top10pct_energy"].items():
        assert energy["delta"] > 0.7 > 0.45 > energy["weight"], kind
    # (b) at equal bytes Delta-CoMe's activation error is the lowest
    err = claims["b_activation_error"]["1/16"]
    assert err["paper RTN"] < min(err["single 2-bit"], err["BitDelta"], err["low-rank"]), err
    # (c) the optimal allocation lowers the paper schedule's error (RTN)
    assert claims["c_optimal_vs_paper"]["1/16 RTN"]["error_ratio"] < 0.8
    rows = results["pairs"]["llama-arith"]["rows"]
    assert {r["variant"] for r in rows} >= set(quality.METHODS)
    assert all(r["bits_per_param"] <= 1.0 + 1e-9 for r in rows if r["alpha"] and r["variant"] != "bitdelta")
