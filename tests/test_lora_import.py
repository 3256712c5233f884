"""`compress_lora` / `deltacome compress-lora`: a PEFT LoRA adapter compressed into a delta artifact.

Covers: reading adapters exactly as PEFT applies them (scaling lora_alpha / r and rsLoRA's / √r,
rank_pattern / alpha_pattern, fan_in_fan_out on GPT-2's Conv1D: our delta == PEFT's
`get_delta_weight`); the artifact against PEFT's logits (fp16 vectors at alpha 1: ≈ exact;
Delta-CoMe at 1/16: smaller than the adapter), embedding LoRA, modules_to_save and lora_bias kept
dense; the result loading through load_delta and MultiDeltaModel; DoRA and shape mismatches refused;
the CLI. Adapters are made here with PEFT (random factors: a few ms).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltacome_ao import MultiDeltaModel, compress_lora, load_delta
from deltacome_ao.cli import main
from deltacome_ao.fingerprint import BaseMismatchError
from deltacome_ao.lora import AdapterFormatError, read_adapter
from tiny_models import ids, tiny

peft = pytest.importorskip("peft")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def make_adapter(base, out: Path, scale: float = 0.3, seed: int = 0, **config):
    """A PEFT LoRA adapter with random (non-zero) factors, saved with PEFT's own save_pretrained."""
    kwargs = dict(r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False)
    kwargs.update(config)
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
            elif "modules_to_save" in n:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return model.eval()


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def effect_error(got, ref, base_logits) -> float:
    """Error relative to what the adapter changes in the logits."""
    return ((got - ref).norm() / (ref - base_logits).norm()).item()


@pytest.mark.parametrize("config", [
    dict(r=8, lora_alpha=16),
    dict(r=8, lora_alpha=4, use_rslora=True),
    dict(r=8, lora_alpha=16, rank_pattern={"model.layers.0.mlp.down_proj": 3}, alpha_pattern={"model.layers.1.self_attn.q_proj": 40}),
])
def test_read_adapter_applies_peft_scaling(tmp_path, config):
    base = tiny()
    model = make_adapter(base, tmp_path / "a", **config)
    adapter = read_adapter(tmp_path / "a")
    assert len(adapter.modules) == 14
    for name, m in adapter.modules.items():
        layer = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(m.delta(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)


def test_fan_in_fan_out_conv1d_matches_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    model = make_adapter(base, tmp_path / "a", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapter = read_adapter(tmp_path / "a")
    for name, m in adapter.modules.items():
        assert m.fan_in_fan_out
        layer = model.base_model.model.get_submodule(name)
        expected = layer.get_delta_weight("default")  # in the Conv1D's (in, out) layout
        assert tuple(m.delta().shape) == tuple(layer.base_layer.weight.shape) == tuple(expected.shape)
        torch.testing.assert_close(m.delta(), expected, rtol=1e-5, atol=1e-7)


def test_fp16_vectors_at_alpha_1_reproduce_the_adapter(tmp_path):
    base = tiny()
    model = make_adapter(base, tmp_path / "a")
    report = compress_lora(base, tmp_path / "a", tmp_path / "d", method="lowrank", alpha=1.0)
    got = logits(load_delta(copy.deepcopy(base), tmp_path / "d"))
    assert effect_error(got, logits(model), logits(base)) < 1e-3
    assert all(m["lora_rank"] == 8 and m["structure"] == "16b×8" for m in report["modules"].values())
    doc = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert doc["user"]["source"] == "peft-lora" and doc["user"]["lora_r"] == 8 and doc["kept"] == []


def test_deltacome_compression_is_smaller_than_the_adapter(tmp_path):
    base = tiny(hidden_size=128, intermediate_size=256)
    model = make_adapter(base, tmp_path / "a", scale=0.1)
    report = compress_lora(base, tmp_path / "a", tmp_path / "d", group_size=32, allocation="optimal", alpha=1 / 8)
    assert report["compressed_bytes"] * 3 < report["adapter_tensor_bytes"]
    for m in report["modules"].values():  # never more vectors than the LoRA's rank
        assert sum(int(c.split("×")[1]) for c in m["structure"].split()) <= 8
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    got = logits(load_delta(copy.deepcopy(base), tmp_path / "d"), x)
    assert effect_error(got, logits(model, x), logits(base, x)) < 0.05
    # a normal artifact: served next to the base in a mixed batch
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("lora", tmp_path / "d")
    with torch.no_grad():
        mixed = served(x[:2], delta_ids=["lora", None]).logits
    torch.testing.assert_close(mixed[0], got[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits(base, x)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, kept", [
    (dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head", "model.norm"]),
     {"model.embed_tokens.weight": "embedding", "lm_head.weight": "modules_to_save", "model.norm.weight": "modules_to_save"}),
    (dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),  # PEFT: lora_bias not with embeddings
     {f"model.layers.{i}.self_attn.{p}.bias": "lora_bias" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}),
])
def test_embedding_lora_modules_to_save_and_lora_bias_are_kept(tmp_path, config, kept):
    base = tiny("qwen2")
    model = make_adapter(base, tmp_path / "a", **config)
    with torch.no_grad():  # lora_bias starts at zero: give it a value
        for n, p in model.named_parameters():
            if n.endswith("lora_B.default.bias"):
                p.add_(0.05)
    model.save_pretrained(str(tmp_path / "a"))
    report = compress_lora(base, tmp_path / "a", tmp_path / "d", method="lowrank", alpha=1.0)
    assert report["kept"] == kept
    doc = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert sorted(doc["kept"]) == sorted(kept)
    got = logits(load_delta(copy.deepcopy(base), tmp_path / "d"))
    assert effect_error(got, logits(model), logits(base)) < 1e-3


def test_shipped_trained_adapter_compresses_smaller_at_the_same_accuracy(tmp_path):
    """The real LoRA trained here (assets/lora/llama-json-r16; benchmarks/lora_import.py has the numbers)."""
    from deltacome_ao.evaluation.metrics import kl_divergence
    from deltacome_ao.evaluation.pairs import PAIRS, load_pair

    adapter = Path(__file__).resolve().parents[1] / "assets" / "lora" / "llama-json-r16"
    base, _ = load_pair("llama-json")
    task = PAIRS["llama-json"].task
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    report = compress_lora(base, adapter, tmp_path / "d")
    assert report["adapter_tensor_bytes"] > 4 * report["compressed_bytes"]  # fp32 factors vs packed
    model = load_delta(copy.deepcopy(base), tmp_path / "d")
    assert task.accuracy(model, n=50) == task.accuracy(lora, n=50) == 1.0
    assert kl_divergence(model, lora, task.text_batches("task", n_batches=1), start=task.answer_start) < 1e-3
    doc = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert doc["base_model_name_or_path"] == "assets/pairs/llama-arith/base"  # from the adapter's config


def test_refusals(tmp_path):
    base = tiny()
    make_adapter(base, tmp_path / "a")
    with pytest.raises(BaseMismatchError, match="the base weight"):
        compress_lora(tiny(hidden_size=32), tmp_path / "a", tmp_path / "d")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        compress_lora(base, tmp_path / "a", tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="adapter"):
        compress_lora(base, tmp_path / "nothing", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_cli_compress_lora(tmp_path):
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    make_adapter(base, tmp_path / "a")
    r = CliRunner().invoke(main, ["compress-lora", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "d"),
                                  "--group-size", "32", "--alpha", "0.25"])
    assert r.exit_code == 0, r.output
    assert "smaller" in r.output and (tmp_path / "d" / "delta.safetensors").is_file()
    r = CliRunner().invoke(main, ["compress-lora", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "e")])
    assert r.exit_code == 1 and "not a PEFT adapter" in r.output


def test_lora_train_writes_a_peft_adapter(tmp_path):
    """The trainer behind assets/lora (two tiny steps here): a PEFT adapter with no machine-specific path."""
    from deltacome_ao.evaluation.lora_train import LoraRecipe, train_lora

    model, facts = train_lora(LoraRecipe(steps=2, batch=4), tmp_path / "a", progress=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "assets/pairs/llama-arith/base" and config["r"] == 16
    adapter = read_adapter(tmp_path / "a")
    assert len(adapter.modules) == 4 * 7 + 1 and not adapter.saved  # lm_head's base weight not copied
    assert facts["recipe"]["steps"] == 2 and 0.0 <= facts["accuracy_200_heldout"] <= 1.0


def test_cli_compress_lora_says_larger_when_the_artifact_is_larger(tmp_path):
    """A rank-1 adapter on two modules: the artifact (JSON with a fingerprint of every base tensor) is
    larger than the adapter file; the CLI says so instead of '0.Nx smaller'."""
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    make_adapter(base, tmp_path / "a", r=1, target_modules=["q_proj"], layers_to_transform=[0])
    r = CliRunner().invoke(main, ["compress-lora", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "d"),
                                  "--group-size", "32"])
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("adapter ")][0]
    assert "x larger)" in line and "smaller" not in line, line
