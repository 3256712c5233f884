"""`export_lora` / `deltacome export-lora`: a delta artifact as a PEFT LoRA adapter.

Covers: at full rank in fp32, `PeftModel.from_pretrained(base, OUT)` gives deltacome's logits (Llama
with embeddings / lm_head / norms as modules_to_save; Qwen2 with bias deltas as lora_bias; the shipped
real pair); PEFT's key names and config (scaling 1 everywhere, rank_pattern + alpha_pattern); the
vLLM mode's constraints (one r, zero padding, fp16, no modules_to_save / LoRA bias, only LoRA
factors) checked on the files and against PEFT's merged weights; `vllm_problems` catching each
violation; rank caps keeping the top singular directions (never worse than the first stored
vectors), the report's errors equal to the measured ones; the global allocation within the uniform
budget; the base left untouched; the CLI.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, compressed_layers, export_lora, save_delta
from deltacome_ao.cli import main
from deltacome_ao.lora import vllm_problems
from tiny_models import PROJ, finetune, ids, structured_finetune, tiny

peft = pytest.importorskip("peft")
REAL_PAIR = Path(__file__).resolve().parents[1] / "assets" / "pairs" / "llama-arith"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def make_delta(tmp: Path, arch: str = "llama", ft_fn=finetune, name: str = "delta"):
    base = tiny(arch)
    ft = ft_fn(base)
    quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    return base, ft, save_delta(ft, tmp / name, base=base)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_delta(tmp_path_factory.mktemp("llama"))


def peft_logits(base, adapter, x=None):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def assert_same_logits(got, ref, rel=2e-6):
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < rel, err


def test_full_rank_fp32_adapter_is_the_deltacome_model(llama, tmp_path):
    base, ft, delta = llama
    before = {k: v.clone() for k, v in base.state_dict().items()}
    report = export_lora(base, delta, tmp_path / "lora", dtype="float32")
    assert_same_logits(peft_logits(base, tmp_path / "lora"), logits(ft))
    # the base given is not modified
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] and not config["use_rslora"]
    assert config["alpha_pattern"] == config["rank_pattern"]  # scaling 1 for every module
    layers = compressed_layers(ft)
    assert sorted(config["target_modules"]) == sorted(layers)
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm",
                                                 "model.layers.0.post_attention_layernorm",
                                                 "model.layers.1.input_layernorm",
                                                 "model.layers.1.post_attention_layernorm", "model.norm"]
    assert report["not_represented"] == [] and report["linear_rel_error"] < 1e-6
    # B = Û diag(s), A = V̂ under PEFT's key names
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    w = layers[name]
    a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    v, ut = w.factors.dequantize()
    assert torch.equal(a, v) and torch.equal(b, ut.T * w.s)
    assert torch.equal(tensors["base_model.model.model.norm.weight"], ft.model.norm.weight)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert card.startswith("---\n") and "base_model_relation: \"adapter\"" in card and "library_name: \"peft\"" in card


def test_qwen2_bias_deltas_become_lora_bias(tmp_path):
    base, ft, delta = make_delta(tmp_path, "qwen2")
    report = export_lora(base, delta, tmp_path / "lora", dtype="float32")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    biases = [n for n, e in report["dense"].items() if e["as"] == "lora_bias"]
    assert sorted(biases) == sorted(f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in ("q_proj", "k_proj", "v_proj"))
    assert_same_logits(peft_logits(base, tmp_path / "lora"), logits(ft))


def test_vllm_adapter_obeys_vllms_constraints(llama, tmp_path):
    base, ft, delta = llama
    out = tmp_path / "vllm"
    report = export_lora(base, delta, out, vllm=True, max_rank=6)
    assert report["vllm_problems"] == [] and vllm_problems(out) == []
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["rank_pattern"] and not config["modules_to_save"]
    assert not config["lora_bias"] and config["bias"] == "none"
    assert set(config["target_modules"]) == {p.split(".")[-1] for p in PROJ} | {"embed_tokens", "lm_head"}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert t.dtype == torch.float16, key
            assert key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")), key
            assert (t.shape[0] if key.endswith(("lora_A.weight", "lora_embedding_A")) else t.shape[1]) == 6, key
    # what vLLM cannot hold is reported as dropped: the norms
    assert set(report["not_represented"]) == {n for n in base.state_dict() if "norm" in n}
    # PEFT's merged weights are what the report says: each projection its rank-6 approximation (fp16 factors),
    # the embeddings / lm_head the base + a rank-6 approximation of their delta, the norms the base's
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload()
    layers = compressed_layers(ft)
    for name, w in layers.items():
        d_hat = w.delta_weight()
        got = merged.get_submodule(name).weight.detach() - base.get_submodule(name).weight.detach()
        rel = ((got - d_hat).norm() / d_hat.norm()).item()
        assert rel == pytest.approx(report["modules"][name]["rel_error"], rel=0.02, abs=2e-3), name
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        d = ft.state_dict()[n] - base.state_dict()[n]
        got = merged.state_dict()[n] - base.state_dict()[n]
        assert ((got - d).norm() / d.norm()).item() == pytest.approx(report["dense"][n]["rel_error"], rel=0.02, abs=2e-3)
    assert torch.equal(merged.model.norm.weight, base.model.norm.weight)


def test_vllm_problems_catches_each_violation(llama, tmp_path):
    base, ft, delta = llama
    export_lora(base, delta, tmp_path / "peft", dtype="float32", rank=3, allocation="global")
    problems = " ".join(vllm_problems(tmp_path / "peft", max_lora_rank=4))
    for what in ("modules_to_save", "rank_pattern", "F32"):
        assert what in problems
    export_lora(base, delta, tmp_path / "v", vllm=True, max_rank=8)
    assert vllm_problems(tmp_path / "v", max_lora_rank=4) == ["r=8 > max_lora_rank=4"]
    assert any("not a LoRA-capable" in p for p in vllm_problems(tmp_path / "v", lora_modules={"q_proj"}))
    tensors = load_file(tmp_path / "v" / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(4, dtype=torch.float16)
    save_file(tensors, tmp_path / "v" / "adapter_model.safetensors")
    assert any("not a LoRA factor" in p for p in vllm_problems(tmp_path / "v"))
    with pytest.raises(ValueError, match="modules_to_save"):
        export_lora(base, delta, tmp_path / "bad", vllm=True, embeddings="full")
    with pytest.raises(ValueError, match="512"):
        export_lora(base, delta, tmp_path / "bad", vllm=True, max_rank=1024)


def test_rank_cap_keeps_the_top_singular_directions(tmp_path):
    base, ft, delta = make_delta(tmp_path, ft_fn=lambda b: structured_finetune(b, rank=8))
    svd = export_lora(base, delta, tmp_path / "svd", dtype="float32", rank=3, embeddings="drop")
    stored = export_lora(base, delta, tmp_path / "stored", dtype="float32", rank=3, selection="stored", embeddings="drop")
    tensors = load_file(tmp_path / "svd" / "adapter_model.safetensors")
    for name, w in compressed_layers(ft).items():
        assert svd["modules"][name]["rank"] == min(3, svd["modules"][name]["stored_rank"])
        d_hat = w.delta_weight().double()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        measured = ((d_hat - b @ a).norm() / d_hat.norm()).item()
        assert measured == pytest.approx(svd["modules"][name]["rel_error"], rel=1e-4, abs=1e-7)
        # Eckart–Young: the best rank-3 approximation of the dequantized delta
        best = torch.linalg.svdvals(d_hat)
        assert measured == pytest.approx((best[3:].norm() / best.norm()).item(), rel=1e-4, abs=1e-7)
        assert measured <= stored["modules"][name]["rel_error"] + 1e-6
    assert svd["linear_rel_error"] < stored["linear_rel_error"]


def test_global_allocation_spends_the_uniform_budget_where_the_error_is(tmp_path):
    base, ft, delta = make_delta(tmp_path, ft_fn=lambda b: structured_finetune(b, rank=8))
    uniform = export_lora(base, delta, tmp_path / "u", dtype="float32", rank=3, embeddings="drop")
    spent = export_lora(base, delta, tmp_path / "g", dtype="float32", rank=3, allocation="global", embeddings="drop")

    def params(report):
        return sum(m["rank"] * sum(m["shape"]) for m in report["modules"].values())

    assert params(spent) <= params(uniform)
    assert len({m["rank"] for m in spent["modules"].values()}) > 1
    assert spent["linear_rel_error"] < uniform["linear_rel_error"]
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "g"))
    for name, m in spent["modules"].items():
        if m["rank"]:
            layer = model.base_model.model.get_submodule(name)
            assert layer.lora_A["default"].weight.shape[0] == m["rank"] == config["rank_pattern"].get(name, config["r"])
            assert layer.scaling["default"] == 1.0


def test_calibrated_selection_minimises_the_output_error(tmp_path):
    base, ft, delta = make_delta(tmp_path, ft_fn=lambda b: structured_finetune(b, rank=8))
    samples = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))]
    plain = export_lora(base, delta, tmp_path / "plain", dtype="float32", rank=3, embeddings="drop")
    calib = export_lora(base, delta, tmp_path / "calib", dtype="float32", rank=3, embeddings="drop",
                        calibration=samples, damp=0.01)
    assert calib["calibrated"] and not plain["calibrated"]
    layers = compressed_layers(ft)
    inputs = {}  # each layer's inputs in the Delta-CoMe model, gathered here independently
    hooks = [ft.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))) for n in layers]
    with torch.no_grad():
        ft(samples[0])
    for h in hooks:
        h.remove()
    files = {k: load_file(tmp_path / k / "adapter_model.safetensors") for k in ("plain", "calib")}
    better = 0
    for name, w in layers.items():
        x = torch.cat(inputs[name]).double()
        h = x.T @ x / x.shape[0]
        h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        chol = torch.linalg.cholesky(h)
        d_hat = w.delta_weight().double()

        def out_err(k):
            t = files[k]
            b, a = (t[f"base_model.model.{name}.lora_{f}.weight"].double() for f in ("B", "A"))
            return ((d_hat - b @ a) @ chol).norm().item() / (d_hat @ chol).norm().item()

        assert out_err("calib") == pytest.approx(calib["modules"][name]["output_rel_error"], rel=1e-3, abs=1e-6)
        assert out_err("calib") <= out_err("plain") + 1e-6, name
        better += out_err("calib") < out_err("plain") - 1e-4
    assert better >= len(layers) // 2


def test_real_pair_full_rank_peft_equals_deltacome(tmp_path):
    from deltacome_ao.evaluation.pairs import PAIRS, load_pair

    base, finetuned = load_pair("llama-arith")
    compressed = copy.deepcopy(finetuned)
    quantize_(compressed, DeltaCoMeConfig(base=base, progress=False))
    delta = save_delta(compressed, tmp_path / "delta", base=base)
    export_lora(base, delta, tmp_path / "lora", dtype="float32")
    x = PAIRS["llama-arith"].task.text_batches("task")[0]
    assert_same_logits(peft_logits(base, tmp_path / "lora", x), logits(compressed, x), rel=1e-5)


def test_cli_export_lora(llama, tmp_path):
    base, ft, delta = llama
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "adapter"
    r = CliRunner().invoke(main, ["export-lora", str(tmp_path / "base"), str(delta), str(out), "--vllm",
                                  "--max-rank", "4"])
    assert r.exit_code == 0, r.output
    assert "r=4" in r.output and "not represented" in r.output and "model.norm.weight" in r.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    r = CliRunner().invoke(main, ["export-lora", str(tmp_path / "base"), str(delta), str(out)])
    assert r.exit_code == 1 and "exists" in r.output
    r = CliRunner().invoke(main, ["export-lora", str(tmp_path / "base"), str(delta), str(tmp_path / "x"), "--vllm",
                                  "--embeddings", "full"])
    assert r.exit_code == 1 and "modules_to_save" in r.output and "Traceback" not in r.output


def test_gpt2_conv1d_and_tied_embeddings_export_exactly(tmp_path):
    """GPT-2: Conv1D weights stored (in, out), biases changed, wte tied to lm_head. export_lora crashed
    (a compressed weight saved under modules_to_save: 'invalid python storage'; then tied tables sharing
    memory) and wrote lora_A / lora_B in the (in, out) orientation PEFT refuses. Now PEFT's logits are
    the deltacome model's at full rank, the Conv1D biases as LoRA biases."""
    from deltacome_ao.compress import compress_
    from deltacome_ao.evaluation.architectures import ARCHITECTURES, inputs_for, tiny_base, tiny_finetune

    arch = ARCHITECTURES["gpt2"]
    base = tiny_base(arch)
    ft = compress_(tiny_finetune(base), DeltaCoMeConfig(base=base, progress=False))
    delta = save_delta(ft, tmp_path / "delta", base=base)
    report = export_lora(base, delta, tmp_path / "lora", dtype="float32")
    assert report["linear_rel_error"] < 1e-6 and report["not_represented"] == []
    assert report["dense"]["transformer.h.0.attn.c_attn.bias"]["as"] == "lora_bias"
    x = inputs_for(arch, base)["input_ids"]
    assert_same_logits(peft_logits(base, tmp_path / "lora", x), logits(ft, x))


def test_stacked_experts_are_refused_clearly(tmp_path):
    from deltacome_ao.compress import compress_
    from deltacome_ao.evaluation.architectures import ARCHITECTURES, tiny_base, tiny_finetune

    base = tiny_base(ARCHITECTURES["mixtral"])
    ft = compress_(tiny_finetune(base), DeltaCoMeConfig(base=base, progress=False))
    delta = save_delta(ft, tmp_path / "delta", base=base)
    with pytest.raises(NotImplementedError, match=r"stacked MoE experts \(model\.layers\.0\.mlp\.experts"):
        export_lora(base, delta, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    base.save_pretrained(tmp_path / "base")
    r = CliRunner().invoke(main, ["export-lora", str(tmp_path / "base"), str(delta), str(tmp_path / "lora")])
    assert r.exit_code == 1 and "\nError: " in "\n" + r.output and "stacked MoE experts" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "lora").exists()
