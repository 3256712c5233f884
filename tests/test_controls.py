"""PEFT-style controls: `unload` (single delta and MultiDeltaModel), `disable_deltas`, `add_weighted_delta`.

Covers: unload giving back the base's own parameter objects bit for bit (tied embeddings included,
fingerprint-verified), refusing when nothing (or `keep_originals=False`) was loaded; the multi-delta
model's unload restoring the original modules; `disable_deltas` routing every row to the base while
the deltas stay loaded, per thread; a weighted combination's rows equal to a model built
independently from the weighted dense deltas compressed the same way, its kept tensors combined,
its artifact written when asked, and bad weights refused.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, DeltaCoMeModel, MultiDeltaModel, compress_, compressed_layers, load_delta
from deltacome_ao import save_delta, unload
from deltacome_ao.serving.routing import UnknownDeltaError
from tiny_models import finetune, ids, tiny

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def compressed_delta(base, out, seed: int = 1):
    ft = finetune(base, seed=seed)
    if base.config.tie_word_embeddings:
        ft.tie_weights()
    quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    save_delta(ft, out, base=base, config=DeltaCoMeConfig(base=base, group_size=32))
    return ft


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    base = tiny()
    models = {n: compressed_delta(base, tmp / n, seed) for n, seed in (("a", 1), ("b", 2))}
    return base, models, tmp


@pytest.mark.parametrize("tied", [False, True])
def test_unload_gives_back_the_base_bit_for_bit(tmp_path, tied):
    base = tiny(tie_word_embeddings=tied)
    ft = compressed_delta(base, tmp_path / "d")
    model = copy.deepcopy(base)
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DeltaCoMeModel.from_pretrained(model, tmp_path / "d")
    assert torch.equal(logits(model), logits(ft)) and compressed_layers(model)
    assert unload(model, verify="full") is model
    assert not compressed_layers(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert list(after) == list(params) and all(after[k] is params[k] for k in params)  # the same objects
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), logits(base))
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="nothing to unload"):
        unload(model)
    load_delta(model, tmp_path / "d", keep_originals=False)
    with pytest.raises(ValueError, match="nothing to unload"):
        DeltaCoMeModel.unload(model)


def test_multi_delta_unload_restores_the_original_modules(deltas):
    base, models, tmp = deltas
    plain = copy.deepcopy(base)
    modules = dict(plain.named_modules())
    served = MultiDeltaModel(plain)
    served.load_delta("a", tmp / "a")
    served.load_delta("b", tmp / "b")
    assert served.multi_modules()
    got = served.unload()
    assert got is plain and not served.deltas() and not served.multi_modules()
    assert all(m is modules[n] for n, m in plain.named_modules())
    torch.testing.assert_close(logits(plain), logits(base), rtol=0, atol=0)
    served.load_delta("a", tmp / "a")  # still usable afterwards
    with torch.no_grad():
        torch.testing.assert_close(served(ids(), delta_ids=["a", "a"]).logits, logits(models["a"]), **TOL)


def test_disable_deltas_runs_the_base_per_thread(deltas):
    base, models, tmp = deltas
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("a", tmp / "a")
    served.load_delta("b", tmp / "b")
    x = ids()
    with torch.no_grad():
        on = served(x, delta_ids=["a", "b"]).logits
        other = {}
        with served.disable_deltas():
            off = served(x, delta_ids=["a", "b"]).logits
            gen = served.generate(x, delta_ids=["a", "b"], max_new_tokens=3, do_sample=False)
            thread = threading.Thread(target=lambda: other.setdefault("y", served(x, delta_ids=["a", "b"]).logits))
            thread.start()
            thread.join()
            with pytest.raises(UnknownDeltaError):
                served(x, delta_ids=["nope", None])
        again = served(x, delta_ids=["a", "b"]).logits
    torch.testing.assert_close(off, logits(base, x), **TOL)
    torch.testing.assert_close(gen, base.generate(x, max_new_tokens=3, do_sample=False), rtol=0, atol=0)
    torch.testing.assert_close(other["y"], on, rtol=0, atol=0)  # another thread keeps its deltas
    torch.testing.assert_close(again, on, rtol=0, atol=0)
    torch.testing.assert_close(on[0], logits(models["a"], x)[0], **TOL)
    assert sorted(served.deltas()) == ["a", "b"]


def test_weighted_delta_equals_the_weighted_dense_delta_compressed_the_same_way(deltas, tmp_path):
    base, models, tmp = deltas
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("a", tmp / "a")
    served.load_delta("b", tmp / "b")
    weights = {"a": 0.7, "b": 0.3}
    served.add_weighted_delta("mix", weights, out_dir=tmp_path / "mix")

    # independently: base + Σ w Δ̂ per layer (the deltas as served), kept tensors combined, compressed the same way
    reference = copy.deepcopy(base)
    base_state = base.state_dict()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name in compressed_layers(models["a"]):
                d = sum(w * compressed_layers(models[n])[name].delta_weight() for n, w in weights.items())
                module.weight.copy_(base_state[f"{name}.weight"] + d)
        kept = json.loads((tmp / "a" / "delta_config.json").read_text())["kept"]
        for key in kept:
            value = base_state[key] + sum(w * (models[n].state_dict()[key] - base_state[key]) for n, w in weights.items())
            reference.state_dict()[key].copy_(value)
    compress_(reference, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    x = ids(batch=3)
    with torch.no_grad():
        mixed = served(x, delta_ids=["mix", "a", None]).logits
    torch.testing.assert_close(mixed[0], logits(reference, x)[0], **TOL)
    torch.testing.assert_close(mixed[1], logits(models["a"], x)[1], **TOL)
    torch.testing.assert_close(mixed[2], logits(base, x)[2], **TOL)
    doc = json.loads((tmp_path / "mix" / "delta_config.json").read_text())
    assert doc["user"]["weighted_combination"] == weights and doc["method"] == "deltacome" and doc["group_size"] == 32
    assert sorted(doc["kept"]) == sorted(kept)
    # not the same as either source
    assert not torch.allclose(mixed[0], logits(models["a"], x)[0], atol=1e-3)


def test_weighted_delta_refusals(deltas):
    base, models, tmp = deltas
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("a", tmp / "a")
    with pytest.raises(UnknownDeltaError):
        served.add_weighted_delta("mix", {"a": 0.5, "zzz": 0.5})
    with pytest.raises(ValueError, match="finite"):
        served.add_weighted_delta("mix", {"a": float("nan")})
    with pytest.raises(ValueError, match="already loaded"):
        served.add_weighted_delta("a", {"a": 1.0})
    assert sorted(served.deltas()) == ["a"]
    served.add_weighted_delta("half", {"a": 0.5}, alpha=1 / 8)
    assert sorted(served.deltas()) == ["a", "half"]
