"""transformers integration: a model compressed with `quantize_` goes through `save_pretrained` and
`AutoModelForCausalLM.from_pretrained` (quant_method "deltacome", registered by `deltacome_ao.hf`).

Covers: bit-exact logits and every tensor (inner tensors of each compressed weight, plain weights,
buffers) identical after reloading — nothing left at random init; sharded checkpoints; re-saving a
reloaded model; another load dtype; `generate()` and `torch.compile`; the baselines; checkpoints
that do not match their `quantization_config`; `dequantize()`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchao import quantize_
from transformers import AutoModelForCausalLM

from deltacome_ao import BitDeltaTensor, DeltaCoMeConfig, MixedPrecisionDeltaTensor
from deltacome_ao.artifact import DeltaFormatError
from deltacome_ao.hf import DeltaCoMeHfConfig, enable_save_pretrained, save_pretrained, verification
from tiny_models import LAYER_NAMES, finetune, ids, tiny

COMPRESSED = (MixedPrecisionDeltaTensor, BitDeltaTensor)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def compressed(method: str = "deltacome", **overrides):
    base = tiny(**overrides)
    ft = finetune(base)
    config = DeltaCoMeConfig(base=base, group_size=32, method=method, progress=False)
    quantize_(ft, config)
    return ft, config


@torch.no_grad()
def logits(model, x=None):
    return model(ids() if x is None else x).logits


def bits_of(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_model(a, b):
    """Every state-dict entry bit-identical (compressed weights: class, attributes, every inner
    tensor incl. dtype), every buffer too, no tensor left on the meta device."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k, x in sa.items():
        y = sb[k]
        assert type(x) is type(y), k
        pairs = [(x, y)]
        if isinstance(x, COMPRESSED):
            for n in x.tensor_attribute_names:
                assert getattr(x, n) == getattr(y, n), (k, n)
            pairs = [(getattr(x, n), getattr(y, n)) for n in x.tensor_data_names]
        for tx, ty in pairs:
            assert ty.device.type != "meta", k
            assert tx.dtype == ty.dtype and tx.shape == ty.shape and torch.equal(bits_of(tx), bits_of(ty)), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb) and all(torch.equal(ba[k], bb[k]) for k in ba)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, config = compressed()
    path = tmp_path_factory.mktemp("hf") / "model"
    enable_save_pretrained(model, config)
    model.save_pretrained(path)
    return model, path


def test_round_trip_every_tensor(saved):
    model, path = saved
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert sorted(n for n, m in loaded.named_modules() if isinstance(getattr(m, "weight", None), COMPRESSED)) == LAYER_NAMES
    assert torch.equal(logits(loaded), logits(model))
    assert_same_model(model, loaded)
    assert loaded.config.quantization_config.quant_method == "deltacome"

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "deltacome" and qc["method"] == "deltacome" and qc["alpha"] == 1 / 16
    assert sorted(qc["modules"]) == LAYER_NAMES
    w = model.model.layers[1].mlp.down_proj.weight
    spec = qc["modules"]["model.layers.1.mlp.down_proj"]
    assert (spec["bits"], spec["counts"], spec["group_size"], spec["shape"]) == (list(w.bits), list(w.counts), 32, [64, 128])
    stored = load_file(path / "model.safetensors")  # a standalone model: the base weights are in it
    assert torch.equal(stored["model.layers.1.mlp.down_proj.weight:base_weight"], w.base_weight)
    assert "model.layers.1.mlp.down_proj.weight" not in stored


@pytest.mark.filterwarnings("ignore:.*_stable_hash_for_caching")
def test_generate_and_compile_after_reload(saved):
    model, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path)
    prompt = ids(seed=5, batch=1, length=6)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] > prompt.shape[1] and torch.equal(out, expected)

    compiled = torch.compile(loaded, fullgraph=True)
    x = ids()
    with torch.no_grad():
        y = compiled(x).logits
    torch.testing.assert_close(y, logits(model, x), rtol=1e-4, atol=1e-5)


def test_resave_and_sharded(saved, tmp_path):
    model, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(logits(again), logits(model))
    assert_same_model(model, again)


def test_load_in_another_dtype(saved):
    model, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    w = loaded.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and w.base_weight.dtype == torch.bfloat16 and w.s.dtype == torch.float32
    # the same as converting the compressed model: the dtype applies to the base weight only
    sa, sb = copy.deepcopy(model).to(torch.bfloat16).state_dict(), loaded.state_dict()
    for k, x in sa.items():
        inner = x.tensor_data_names if isinstance(x, COMPRESSED) else [None]
        for n in inner:
            tx, ty = (x, sb[k]) if n is None else (getattr(x, n), getattr(sb[k], n))
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), (k, n)


@pytest.mark.parametrize("method", ["bitdelta", "lowrank"])
def test_baselines(method, tmp_path):
    model, _ = compressed(method)
    save_pretrained(model, tmp_path / method)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    assert torch.equal(logits(loaded), logits(model))
    assert_same_model(model, loaded)


def test_tied_embeddings(tmp_path):
    model, _ = compressed(tie_word_embeddings=True)
    save_pretrained(model, tmp_path / "tied")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def _rewrite(path, tmp_path, edit):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "generation_config.json"):
        (bad / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_checkpoint_missing_an_inner_tensor(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight:s"))
    with pytest.raises(DeltaFormatError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight:s'\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_checkpoint_with_a_wrong_shape(saved, tmp_path):
    _, path = saved
    key = "model.layers.0.self_attn.k_proj.weight:u_zero"
    bad = _rewrite(path, tmp_path, lambda t: t.update({key: t[key][:-1].clone()}))
    with pytest.raises(DeltaFormatError, match=r"k_proj\.weight:u_zero: the tensor does not match its recorded sha256"):
        AutoModelForCausalLM.from_pretrained(bad)
    with verification("none"), pytest.raises(DeltaFormatError, match=r"k_proj: u_zero is \(2, 1\) uint8, the layer's structure"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_config_naming_another_module(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path, lambda t: None)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.mlp.act_fn"] = config["quantization_config"]["modules"].pop(
        "model.layers.0.mlp.up_proj")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaFormatError, match="act_fn"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_needs_a_compressed_checkpoint(tmp_path):
    tiny().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=DeltaCoMeHfConfig())


def test_dequantize(saved):
    model, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path)
    expected = {n: model.get_submodule(n).weight.dequantize() for n in LAYER_NAMES}
    loaded.dequantize()
    assert all(type(loaded.get_submodule(n).weight.data) is torch.Tensor for n in LAYER_NAMES)
    assert all(torch.equal(loaded.get_submodule(n).weight, expected[n]) for n in LAYER_NAMES)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)
