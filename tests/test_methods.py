"""Conformance: every registered method (built-in, dropped into deltacome_ao/methods/, or registered
by a test module collected earlier) passes the same checks — a new method gets tested by existing.

For each method on a tiny Llama: the compressed weight matches its class's layout, `F.linear` equals
`x @ dequantize().T`, the delta report describes it, the compressed model is closer to the fine-tune
than the base is, and the artifact, the Hugging Face checkpoint, a `weights_only` state dict and
multi-delta serving all give the compressed model's logits back.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from deltacome_ao import DeltaCoMeConfig, MultiDeltaModel, compress_, compressed_layers, delta_report, load_delta, save_delta
from deltacome_ao.hf import save_pretrained
from deltacome_ao.methods import get_method, method_names
from tiny_models import LAYER_NAMES, ids, structured_finetune, tiny

METHODS = method_names()


@pytest.fixture(scope="module")
def pair():
    base = tiny("llama", seed=0)
    return base, structured_finetune(base, seed=40)


@pytest.fixture(scope="module")
def compressed(pair):
    base, ft = pair
    cache = {}

    def get(method):
        if method not in cache:
            config = DeltaCoMeConfig(base=base, method=method, alpha=1 / 8, group_size=32, progress=False)
            cache[method] = compress_(copy.deepcopy(ft), config), config
        return cache[method]

    return get


@torch.no_grad()
def logits(model):
    return model(ids(seed=9, batch=3, length=8)).logits


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", METHODS)
def test_compress_layout_linear_and_report(pair, compressed, method):
    base, ft = pair
    model, _ = compressed(method)
    kind = get_method(method).tensor
    layers = compressed_layers(model)
    assert sorted(layers) == LAYER_NAMES and all(type(w) is kind for w in layers.values())
    for w in layers.values():
        assert w.layout_mismatch() is None
        x = torch.randn(5, w.shape[1])
        want = x @ w.dequantize().T
        torch.testing.assert_close(F.linear(x, w), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    report = delta_report(model)
    assert {r["tensor"] for r in report} == {kind.__name__} and all(r["structure"] for r in report)
    assert rel(logits(model), logits(ft)) < rel(logits(base), logits(ft))


@pytest.mark.parametrize("method", METHODS)
def test_every_stored_form_round_trips(pair, compressed, method, tmp_path):
    base, _ = pair
    model, config = compressed(method)
    want = logits(model)
    save_delta(model, tmp_path / "delta", base=base, config=config)
    assert torch.equal(logits(load_delta(copy.deepcopy(base), tmp_path / "delta")), want)
    save_pretrained(copy.deepcopy(model), tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), want)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = compress_(copy.deepcopy(pair[1]), config)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(logits(fresh), want)


@pytest.mark.parametrize("method", METHODS)
def test_served_per_row(pair, compressed, method, tmp_path):
    base, _ = pair
    model, config = compressed(method)
    save_delta(model, tmp_path / "delta", base=base, config=config)
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("d", tmp_path / "delta")
    x = ids(seed=9, batch=3, length=8)
    with torch.no_grad():
        got = served(x, delta_ids=["d", None, "d"]).logits
        alone, base_only = model(x).logits, base(x).logits
    for row, want in ((0, alone[0]), (1, base_only[1]), (2, alone[2])):
        torch.testing.assert_close(got[row], want, atol=2e-5 * want.abs().max().item(), rtol=0)
