"""The `quantize_` shortcut against the pinned torchao: what `torchao_walk` reads still exists, and
`quantize_(model, DeltaCoMeConfig(...))` — plain, with `FqnToConfig`, with `device=` — gives what
the core entry point `compress_(model, config)` gives, leaving no state behind.

If a torchao upgrade renames or reshapes these internals, this file fails first, naming what moved.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from torchao import quantize_
from torchao.quantization import quant_api
from torchao.quantization.quant_api import FqnToConfig

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor, compress_, compressed_layers
from deltacome_ao import config as config_module
from deltacome_ao import torchao_walk
from tiny_models import LAYER_NAMES, finetune, ids, tiny


@pytest.fixture(scope="module")
def pair():
    base = tiny("llama")
    return base, finetune(base)


def cfg(base, **kw):
    return DeltaCoMeConfig(base=base, **{"alpha": 1 / 8, "group_size": 32, "progress": False, **kw})


@torch.no_grad()
def logits(model):
    return model(ids()).logits


def same_weights(a, b) -> bool:
    la, lb = compressed_layers(a), compressed_layers(b)
    if list(la) != list(lb):
        return False
    return all(torch.equal(la[n].dequantize(), lb[n].dequantize()) for n in la)


def test_torchao_internals_the_walk_reads():
    walk = inspect.signature(getattr(quant_api, torchao_walk.WALK_FUNCTION)).parameters
    assert {"model", "filter_fn", "device"} <= set(walk), walk
    fqn = inspect.signature(getattr(quant_api, torchao_walk.FQN_FUNCTION)).parameters
    assert "fqn" in fqn, fqn
    q = inspect.signature(getattr(quant_api, torchao_walk.QUANTIZE_FUNCTION)).parameters
    assert {"model", "config", "filter_fn", "device"} <= set(q), q
    assert torchao_walk.current_walk() is None  # outside quantize_


def test_quantize_shortcut_equals_compress_and_leaves_no_state(pair):
    base, ft = pair
    a, b = copy.deepcopy(ft), copy.deepcopy(ft)
    config = cfg(base)
    quantize_(a, config)
    compress_(b, cfg(base))
    assert sorted(compressed_layers(a)) == LAYER_NAMES
    assert same_weights(a, b)
    assert set(vars(config)) == {f.name for f in dataclasses.fields(config)}  # no run state on the config
    assert config_module._RUNS == {}


def test_config_copies_share_the_base_and_copy_no_model(pair):
    base, _ = pair
    config = cfg(base)
    for clone in (copy.copy(config), copy.deepcopy(config)):
        assert clone.base is config.base
        assert clone == config


def test_fqn_to_config_compresses_the_named_layers_only(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    quantize_(model, FqnToConfig({n: cfg(base) for n in names}), filter_fn=None)
    assert sorted(compressed_layers(model)) == sorted(names)
    whole = compress_(copy.deepcopy(ft), cfg(base))
    for n in names:  # the same per-matrix result as the whole-model run
        assert torch.equal(model.get_submodule(n).weight.dequantize(), whole.get_submodule(n).weight.dequantize())
    # regex entries name modules too
    model = copy.deepcopy(ft)
    quantize_(model, FqnToConfig({r"re:model\.layers\.1\.self_attn\.[kv]_proj": cfg(base)}), filter_fn=None)
    assert sorted(compressed_layers(model)) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_fqn_to_config_on_the_whole_model(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    quantize_(model, FqnToConfig({"": cfg(base)}), filter_fn=None)
    assert same_weights(model, compress_(copy.deepcopy(ft), cfg(base)))


def test_fqn_to_config_on_a_non_linear_module_is_a_clear_error(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    before = logits(model)
    with pytest.raises(ValueError, match=r"FqnToConfig maps 'model\.layers\.0\.mlp' \(LlamaMLP\) to a DeltaCoMeConfig"):
        quantize_(model, FqnToConfig({"model.layers.0.mlp": cfg(base)}), filter_fn=None)
    assert not compressed_layers(model) and torch.equal(logits(model), before)


def test_device_argument_reaches_the_plan(pair, monkeypatch):
    base, ft = pair
    seen = []
    real = config_module.plan_compression

    def spy(root, config, targets, device=None, skipped=None):
        seen.append(device)
        return real(root, config, targets, device, skipped)

    monkeypatch.setattr(config_module, "plan_compression", spy)
    model = copy.deepcopy(ft)
    quantize_(model, cfg(base), device="cpu")
    assert seen == ["cpu"]  # planned once, on the device torchao was given
    assert all(w.device.type == "cpu" for w in compressed_layers(model).values())
    assert all(isinstance(w, MixedPrecisionDeltaTensor) for w in compressed_layers(model).values())


def test_compress_device_moves_model_and_weights(pair):
    base, ft = pair
    model = compress_(copy.deepcopy(ft), cfg(base), device=torch.device("cpu"))
    assert all(getattr(w, n).device.type == "cpu" for w in compressed_layers(model).values() for n in w.tensor_data_names)
    torch.testing.assert_close(logits(model), logits(compress_(copy.deepcopy(ft), cfg(base))))


def test_meta_device_is_refused(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    before = logits(model)
    with pytest.raises(ValueError, match="device='meta': compression needs the weights' values"):
        compress_(model, cfg(base), device="meta")
    assert not compressed_layers(model) and torch.equal(logits(model), before)
    # torchao's quantize_ moves each module to `device` before calling the handler (its data is gone
    # by then): the error is still ours and clear, and no run state is left behind
    with pytest.raises(ValueError, match="device='meta': compression needs the weights' values"):
        quantize_(copy.deepcopy(ft), cfg(base), device="meta")
    assert config_module._RUNS == {}


def test_failed_run_leaves_nothing_behind(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    before = logits(model)
    with pytest.raises(ValueError):
        quantize_(model, cfg(base, alpha=1e-5))  # no vector fits the budget
    assert config_module._RUNS == {} and not compressed_layers(model)
    assert torch.equal(logits(model), before)


def test_a_failing_walk_changes_nothing_and_leaves_no_plan_for_the_next_call(pair):
    """A filter that fails part way through torchao's walk fails while the first handler call plans
    (the plan walks the same filter) — before any swap; the next quantize_ plans afresh."""
    base, ft = pair
    model = copy.deepcopy(ft)
    before = logits(model)
    calls = []

    def filter_fn(module, name):
        if isinstance(module, torch.nn.Linear):
            calls.append(name)
            if len(calls) == 3:
                raise RuntimeError("the filter dies")
            return True
        return False

    with pytest.raises(RuntimeError, match="the filter dies"):
        quantize_(model, cfg(base, alpha=1 / 4), filter_fn=filter_fn)
    assert not compressed_layers(model) and torch.equal(logits(model), before)
    assert config_module._RUNS == {}
    quantize_(model, cfg(base, alpha=1 / 32))  # its own plan
    assert config_module._RUNS == {}
    assert same_weights(model, compress_(copy.deepcopy(ft), cfg(base, alpha=1 / 32)))
    with pytest.raises(ValueError, match="already a MixedPrecisionDeltaTensor"):
        quantize_(model, cfg(base, alpha=1 / 32))  # a compressed model is never silently skipped


def test_a_linear_shared_at_two_paths_is_compressed_once(pair):
    base, ft = pair
    shared_base, shared_ft = copy.deepcopy(base), copy.deepcopy(ft)
    for m in (shared_base, shared_ft):
        m.model.layers[1].mlp.up_proj = m.model.layers[0].mlp.up_proj
    a, b = copy.deepcopy(shared_ft), copy.deepcopy(shared_ft)
    quantize_(a, cfg(shared_base))
    compress_(b, cfg(shared_base))
    assert a.model.layers[1].mlp.up_proj is a.model.layers[0].mlp.up_proj
    assert isinstance(a.model.layers[1].mlp.up_proj.weight, MixedPrecisionDeltaTensor)
    assert same_weights(a, b) and config_module._RUNS == {}


def test_fqn_to_config_parameter_entries_and_patterns_follow_the_recipe(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    quantize_(model, FqnToConfig({"model.layers.0.self_attn.q_proj.weight": cfg(base)}), filter_fn=None)
    assert list(compressed_layers(model)) == ["model.layers.0.self_attn.q_proj"]
    model = copy.deepcopy(ft)
    quantize_(model, FqnToConfig({"_default": cfg(base)}), filter_fn=None)
    assert sorted(compressed_layers(model)) == LAYER_NAMES  # lm_head: a linear, but not what the recipe selects
    model = copy.deepcopy(ft)
    quantize_(model, FqnToConfig({"lm_head": cfg(base)}), filter_fn=None)
    assert list(compressed_layers(model)) == ["lm_head"]  # named exactly: the user's choice
