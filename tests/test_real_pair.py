"""On the shipped real base/fine-tuned pair, Delta-CoMe must beat the baselines at equal bytes."""

import copy

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, delta_report
from deltacome_ao.evaluate import kl_divergence
from deltacome_ao.pairs import PAIRS, load_pair

ALPHA = 1 / 16


@pytest.fixture(scope="module")
def results():
    base, finetuned = load_pair("llama-arith")
    batches = PAIRS["llama-arith"].task.text_batches("task", n_batches=2)
    out = {}
    for method in ("deltacome", "lowrank", "bitdelta"):
        model = copy.deepcopy(finetuned)
        with torch.no_grad():
            quantize_(model, DeltaCoMeConfig(base=base, alpha=ALPHA, method=method, progress=False))
        report = delta_report(model)
        out[method] = {
            "kl": kl_divergence(model, finetuned, batches),
            "bytes": sum(r["delta_bytes"] for r in report),
            "params": sum(r["shape"][0] * r["shape"][1] for r in report),
        }
    out["base"] = {"kl": kl_divergence(base, finetuned, batches)}
    return out


def test_every_method_stays_within_the_same_budget(results):
    for method in ("deltacome", "lowrank", "bitdelta"):
        r = results[method]
        assert 8 * r["bytes"] / r["params"] <= 16 * ALPHA * 1.001, method


def test_deltacome_beats_bitdelta_and_lowrank_in_kl(results):
    kl = {m: results[m]["kl"] for m in ("deltacome", "lowrank", "bitdelta", "base")}
    assert kl["deltacome"] < kl["bitdelta"], kl
    assert kl["deltacome"] < kl["lowrank"], kl
    assert kl["deltacome"] < 0.2 * kl["base"], kl
