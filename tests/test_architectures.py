"""The architecture matrix (deltacome_ao.evaluation.architectures): 17 tiny models of 16 model types,
each with a fine-tune that moves every parameter, checked end to end —

- ≥ 95% of the changed parameters outside the input/output embeddings compressed;
- logits close to the fine-tune's (error ≤ 0.25 of the base–fine-tune gap);
- torch.compile(fullgraph=True) == eager (backend "aot_eager" here: the same full-graph capture, a few
  times faster; benchmarks/architectures.py runs inductor);
- delta artifact and the model's own save_pretrained -> from_pretrained: bit-identical logits;
- MultiDeltaModel rows == each model alone (MoE blocks with compressed experts served per row as units);
- compressed bytes ≤ 1/16 of the covered parameters' fp16 size;

and the pieces behind them: stacked experts (grouped operator == a loop over experts, padding of
experts of lower rank, the eager and batched_mm experts paths), a bf16 MoE fine-tune's delta size,
GPT-2's Conv1D under calibration, streaming on Conv1D / MoE checkpoints, the coverage report, the
fine-tune's config applied (RoPE scaling) or refused, and the embeddings option on a tied Gemma.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor, MultiDeltaModel, compress_, load_delta, save_delta
from deltacome_ao.compress import compressed_layers, coverage_report, delta_report
from deltacome_ao.evaluation.architectures import ARCHITECTURES, check, inputs_for, tiny_base, tiny_finetune
from deltacome_ao.finetune_config import ConfigMismatchError
from deltacome_ao.methods.mixed_precision_experts import MixedPrecisionExpertsTensor
from deltacome_ao.serving import UnsupportedDeltaError

MODEL_TYPES = {a.model_type for a in ARCHITECTURES.values()}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_the_matrix_covers_the_required_types():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "falcon",
                "starcoder2", "olmo2", "mixtral", "qwen3_moe", "llava"}
    assert required <= MODEL_TYPES and len(MODEL_TYPES) >= 15
    tied = {a.config.get("tie_word_embeddings") for a in ARCHITECTURES.values() if a.model_type == "llama"}
    assert tied == {True, False}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture(name, tmp_path):
    arch = ARCHITECTURES[name]
    row = check(arch, backend="aot_eager", workdir=tmp_path)
    errors = {k: v for k, v in row.errors.items() if k != "serving_refusal"}
    assert not errors, errors
    assert row.share >= 0.95, (row.share, row.uncompressed)
    assert set(row.uncompressed) <= {"embedding", "lm_head", "norm", "bias", "router", "budget", "convolution", "vector"}
    assert row.error_ratio < 0.25, row.error_ratio
    assert row.compile_diff < 1e-5, row.compile_diff
    assert row.artifact_exact is True and row.hf_exact is True
    assert row.serving == "per row" and row.serving_diff < 1e-5, (row.serving, row.serving_diff, row.errors)
    assert 0.05 < row.delta_bytes / row.fp16_bytes <= 1 / 16


# --- stacked experts -----------------------------------------------------------------------------------


def _experts(seed=0, experts=4, out=64, inn=32, rank=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(experts, out, inn, generator=g)
    ft = base + 0.1 * torch.randn(experts, out, rank, generator=g) @ torch.randn(experts, rank, inn, generator=g)
    return base, ft


def test_stack_is_each_expert_and_pads_lower_ranks():
    base, ft = _experts()
    ws = [MixedPrecisionDeltaTensor.from_hp(ft[e], base[e], alpha=1 / 4, group_size=32) for e in range(4)]
    ws[2] = MixedPrecisionDeltaTensor.from_hp(base[2], base[2], alpha=1 / 4, group_size=32)  # unchanged expert
    ws[3] = MixedPrecisionDeltaTensor.from_hp(ft[3], base[3], group_size=32, bands=[(3, 2)])  # other widths
    stack = MixedPrecisionDeltaTensor.stack(ws)
    assert isinstance(stack, MixedPrecisionExpertsTensor) and stack.shape == (4, 64, 32)
    assert stack.bits == (8, 3) and stack.counts == (2, 2)  # merged bands: max count per width
    for e in range(4):
        torch.testing.assert_close(stack[e].dequantize(), ws[e].dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(stack.dequantize(), torch.stack([w.dequantize() for w in ws]), rtol=0, atol=0)
    t = stack.transpose(-2, -1)
    assert t.shape == (4, 32, 64) and t.in_out == 1
    torch.testing.assert_close(t[1].dequantize(), ws[1].dequantize().T, rtol=1e-5, atol=1e-6)


def test_grouped_operator_equals_a_loop_over_experts():
    base, ft = _experts(seed=1)
    stack = MixedPrecisionDeltaTensor.stack(
        [MixedPrecisionDeltaTensor.from_hp(ft[e], base[e], alpha=1 / 4, group_size=32) for e in range(4)])
    dense = stack.dequantize()
    x = torch.randn(11, 32)
    offs = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # expert 1 has no rows; rows 9, 10 belong to none
    y = torch.nn.functional.grouped_mm(x, stack.transpose(-2, -1), offs=offs)
    ref = torch.zeros(11, 64)
    for e, (a, b) in enumerate([(0, 3), (3, 3), (3, 7), (7, 9)]):
        ref[a:b] = x[a:b] @ dense[e].T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[9:], torch.zeros(2, 64))


def test_bmm_on_stacked_experts_equals_each_expert():
    """torch.bmm(x (E, T, in), experts (E, in, out)) — Llama 4's experts forward — on a compressed stack
    equals each expert's dense product (it raised NotImplementedError aten.bmm at the first forward)."""
    base, ft = _experts(seed=2)
    stack = MixedPrecisionDeltaTensor.stack(
        [MixedPrecisionDeltaTensor.from_hp(ft[e], base[e], alpha=1 / 4, group_size=32) for e in range(4)])
    in_out = stack.transpose(-2, -1)  # (E, in, out), as Llama 4 stores gate_up_proj / down_proj
    dense = in_out.dequantize()
    x = torch.randn(4, 5, 32)
    torch.testing.assert_close(torch.bmm(x, in_out), torch.bmm(x, dense), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="bmm"):
        torch.bmm(torch.randn(3, 5, 32), in_out)  # not one block per expert


def test_llama4_text_experts_compress_and_run():
    """Llama 4 (text): experts stored (E, in, out) and applied with torch.bmm are compressed and run."""
    from deltacome_ao.evaluation.architectures import Arch, _COMMON

    arch = Arch("llama4_text", "llama4_text", dict(_COMMON, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
                                                   num_experts_per_tok=1, interleave_moe_layer_step=1,
                                                   no_rope_layers=[1, 1], bos_token_id=1, eos_token_id=2,
                                                   pad_token_id=0), moe=True)
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    assert isinstance(model.model.layers[0].feed_forward.experts.gate_up_proj, MixedPrecisionExpertsTensor)
    x = inputs_for(arch, base)
    dense = copy.deepcopy(model)
    for module in dense.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p.data, MixedPrecisionExpertsTensor):
                setattr(module, name, torch.nn.Parameter(p.data.dequantize(), requires_grad=False))
    with torch.no_grad():
        got, ref, before = model(**x).logits, dense(**x).logits, base(**x).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        target = ft(**x).logits
    assert (got - target).norm() < 0.5 * (before - target).norm()


def _mixtral_pair():
    arch = ARCHITECTURES["mixtral"]
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    return arch, base, ft, model


def test_experts_implementations():
    """grouped_mm (the default) and transformers' eager loop (w[e] per expert) agree; batched_mm, which
    would gather one weight per token, is refused with a clear message."""
    arch, base, ft, model = _mixtral_pair()
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer.gate_up_proj, MixedPrecisionExpertsTensor)
    x = inputs_for(arch, base)
    with torch.no_grad():
        grouped = model(**x).logits
        model.set_experts_implementation("eager")
        torch.testing.assert_close(model(**x).logits, grouped, rtol=1e-5, atol=1e-5)
        model.set_experts_implementation("batched_mm")
        with pytest.raises(NotImplementedError, match="batched_mm"):
            model(**x)


def test_bf16_moe_delta_is_a_sixteenth_of_the_changed_experts(tmp_path):
    arch, base, ft, _ = _mixtral_pair()
    base, ft = base.to(torch.bfloat16), ft.to(torch.bfloat16)
    sizes = {}
    for label, kwargs in (("now", {}), ("linear only", {"filter_fn": lambda m, n: isinstance(m, torch.nn.Linear)})):
        model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False), **kwargs)
        save_delta(model, tmp_path / label, base=base)
        doc = json.loads((tmp_path / label / "delta_config.json").read_text())
        sizes[label] = doc
    now, before = sizes["now"], sizes["linear only"]
    experts = [k for k, v in now["layers"].items() if len(v["shape"]) == 3]
    assert len(experts) == 4  # 2 layers x (gate_up_proj, down_proj)
    covered = sum(2 * torch.Size(s["shape"]).numel() for s in now["layers"].values())
    assert now["bytes"]["compressed"] <= covered / 16
    assert now["coverage"]["share_outside_embeddings"] > 0.99
    changed_outside = sum(v["params"] for k, v in now["coverage"]["uncompressed"].items()
                          if v["reason"] not in ("embedding", "lm_head"))
    # all that is not compressed outside the embeddings: routers and norms
    assert {v["reason"] for v in now["coverage"]["uncompressed"].values()} == {"embedding", "lm_head", "router", "norm"}
    assert changed_outside < 0.01 * now["coverage"]["changed_params"]
    # without the stacked experts (nn.Linear only), most of the fine-tune is stored dense
    assert before["coverage"]["share_outside_embeddings"] < 0.2
    assert before["bytes"]["kept"] > 5 * (now["bytes"]["kept"] + now["bytes"]["compressed"])


# --- Conv1D, streaming, coverage -------------------------------------------------------------------------


def test_gpt2_conv1d_with_calibration_and_moe_warning():
    arch = ARCHITECTURES["gpt2"]
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    x = inputs_for(arch, base, batch=4, length=16)
    rtn = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    gptq = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False, calibration=[x["input_ids"]]))
    w = compressed_layers(gptq)["transformer.h.0.attn.c_attn"]
    assert w.shape == (64, 192)  # Conv1D's (in, out), compressed as the (out, in) matrix
    assert w.transposed().shape == (192, 64)
    with torch.no_grad():
        ref, base_l = ft(**x).logits, base(**x).logits
        err = [(m(**x).logits - ref).norm() / (base_l - ref).norm() for m in (rtn, gptq)]
    assert err[1] < 0.25 and err[0] < 0.25
    # Qwen2-MoE under calibration: the experts data-free (warned), the (1, 64) shared-expert gate dense
    mbase = tiny_base(ARCHITECTURES["qwen2_moe"])
    mft = tiny_finetune(mbase)
    with pytest.warns(UserWarning, match="stacked expert parameters are compressed without calibration"):
        m = compress_(copy.deepcopy(mft), DeltaCoMeConfig(base=mbase, progress=False,
                                                         calibration=[torch.randint(3, 120, (2, 8))]))
    assert isinstance(m.model.layers[1].mlp.experts.down_proj, MixedPrecisionExpertsTensor)
    assert isinstance(m.model.layers[1].mlp.shared_expert.up_proj.weight, MixedPrecisionDeltaTensor)
    assert m.deltacome_skipped["model.layers.1.mlp.shared_expert_gate.weight"] == "budget"


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])
def test_streaming_writes_the_same_artifact(name, tmp_path):
    from deltacome_ao.streaming import compress_streaming

    arch = ARCHITECTURES[name]
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    compress_streaming(tmp_path / "base", tmp_path / "ft", tmp_path / "streamed", progress=False)
    config = DeltaCoMeConfig(base=base, progress=False)
    save_delta(compress_(copy.deepcopy(ft), config), tmp_path / "saved", base=base, config=config)
    a = json.loads((tmp_path / "streamed" / "delta_config.json").read_text())
    b = json.loads((tmp_path / "saved" / "delta_config.json").read_text())
    assert a["layers"] == b["layers"] and a["kept"] == b["kept"] and a["coverage"] == b["coverage"]
    assert a["base_fingerprint"] == b["base_fingerprint"]
    with safe_open(str(tmp_path / "streamed" / "delta.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "saved" / "delta.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    x = inputs_for(arch, base)
    with torch.no_grad():
        assert torch.equal(load_delta(copy.deepcopy(base), tmp_path / "streamed")(**x).logits,
                           load_delta(copy.deepcopy(base), tmp_path / "saved")(**x).logits)


def test_coverage_report_and_cli(tmp_path):
    from deltacome_ao.cli import main

    arch = ARCHITECTURES["qwen2_moe"]
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    cov = coverage_report(model, base)
    reasons = {k: v["reason"] for k, v in cov["uncompressed"].items()}
    assert reasons["model.layers.0.mlp.gate.weight"] == "router"
    assert reasons["model.layers.0.mlp.shared_expert_gate.weight"] == "budget"  # (1, 64): no vector fits 1/16
    assert reasons["model.layers.0.self_attn.q_proj.bias"] == "bias"
    assert reasons["model.embed_tokens.weight"] == "embedding" and reasons["lm_head.weight"] == "lm_head"
    assert cov["embedding_params"] == 2 * 128 * 64
    rows = delta_report(model, base)
    dense = {r["name"]: r for r in rows if not r["compressed"]}
    assert set(dense) == set(cov["uncompressed"]) and dense["model.layers.0.mlp.gate.weight"]["reason"] == "router"
    assert {r["name"] for r in rows if r["compressed"]} == set(compressed_layers(model))
    save_delta(model, tmp_path / "d", base=base)
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "d")]).output
    assert "coverage:" in out and "uncompressed (router)" in out and "uncompressed (budget)" in out
    assert "model.layers.0.mlp.experts.gate_up_proj" in out and "4x128x64" in out


# --- the fine-tune's config ---------------------------------------------------------------------------------


def test_finetune_config_is_applied_or_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltacome_ao.cli import main

    arch = ARCHITECTURES["llama"]
    base = tiny_base(arch)
    config = copy.deepcopy(base.config)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": config.rope_parameters["rope_theta"]}
    config.rms_norm_eps = 1e-3
    ft = type(base)(config).eval()
    ft.load_state_dict(tiny_finetune(base).state_dict())
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    save_delta(model, tmp_path / "d", base=base)
    x = inputs_for(arch, base)
    loaded = load_delta(copy.deepcopy(base), tmp_path / "d")
    assert loaded.config.rope_parameters["factor"] == 4.0 and loaded.config.rms_norm_eps == 1e-3
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
        # what the base's config gives with the fine-tune's weights: far off (what load_delta used to serve)
        as_base = type(base)(base.config).eval()
        as_base.load_state_dict(ft.state_dict())
        ref = ft(**x).logits
        assert (as_base(**x).logits - ref).norm() > 5 * (model(**x).logits - ref).norm()
    # merge writes the fine-tune's config
    base.save_pretrained(tmp_path / "base")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "d"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters["factor"] == 4.0 and merged.config.rms_norm_eps == 1e-3
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, model(**x).logits, rtol=1e-4, atol=1e-4)
    # one batch runs one config: refused per row
    with pytest.raises(UnsupportedDeltaError, match="rope_parameters"):
        MultiDeltaModel(copy.deepcopy(base)).load_delta("a", tmp_path / "d")
    # a structural difference cannot be applied: refused before anything changes
    from deltacome_ao.format import DOCUMENT_DIGEST, document_digest

    doc = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    doc["model_config"]["tie_word_embeddings"] = True
    del doc[DOCUMENT_DIGEST]
    doc[DOCUMENT_DIGEST] = document_digest(doc)  # as if written so, not a corrupted file
    (tmp_path / "d" / "delta_config.json").write_text(json.dumps(doc))
    target = copy.deepcopy(base)
    with pytest.raises(ConfigMismatchError, match="tie_word_embeddings"):
        load_delta(target, tmp_path / "d")
    assert not compressed_layers(target)


# --- the embeddings option ------------------------------------------------------------------------------


def test_embeddings_option_on_tied_gemma(tmp_path):
    from transformers import AutoModelForCausalLM

    arch = ARCHITECTURES["gemma3_text"]
    base = tiny_base(arch)
    fts = [tiny_finetune(base, seed=s) for s in (1, 2)]
    x = inputs_for(arch, base)
    models = [compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False, embeddings=True)) for ft in fts]
    model = models[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie holds
    assert isinstance(model.model.embed_tokens.weight, MixedPrecisionDeltaTensor)
    assert coverage_report(model, base)["share"] > 0.99
    with torch.no_grad():
        got, ref, base_l = model(**x).logits, fts[0](**x).logits, base(**x).logits
        assert (got - ref).norm() / (base_l - ref).norm() < 0.25
        for i, m in enumerate(models):
            save_delta(m, tmp_path / str(i), base=base)
        assert torch.equal(load_delta(copy.deepcopy(base), tmp_path / "0")(**x).logits, got)
        model.save_pretrained(tmp_path / "hf")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(**x).logits, got)
        served = MultiDeltaModel(copy.deepcopy(base))
        served.load_delta("a", tmp_path / "0")
        served.load_delta("b", tmp_path / "1")
        out = served(**x, delta_ids=["a", "b", None]).logits
        torch.testing.assert_close(out[0], got[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], models[1](**x).logits[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[2], base_l[2], rtol=1e-5, atol=1e-5)


def test_weight_on_the_left_of_a_matmul():
    """`W @ X` with a compressed W (Jamba's Mamba mixer: dt_proj.weight @ time_step (B, in, S)) raised
    NotImplementedError aten.expand at the first forward; it equals the dense product now."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(48, 80, generator=g)
    w = MixedPrecisionDeltaTensor.from_hp(base + 0.05 * torch.randn(48, 4, generator=g) @ torch.randn(4, 80, generator=g),
                                          base, alpha=1 / 4, group_size=16)
    dense = w.dequantize()
    for shape in [(80, 7), (3, 80, 7), (80,), (2, 3, 80, 5)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(w @ x, dense @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.matmul(w, x), dense @ x, rtol=1e-5, atol=1e-4)


def test_jamba_compresses_and_runs():
    from deltacome_ao.evaluation.architectures import Arch, _COMMON

    arch = Arch("jamba", "jamba", dict(_COMMON, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                                       attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                       mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0), moe=True)
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    assert isinstance(model.model.layers[0].mamba.dt_proj.weight.data, MixedPrecisionDeltaTensor)
    x = inputs_for(arch, base)
    with torch.no_grad():
        got, before, target = model(**x).logits, base(**x).logits, ft(**x).logits
    assert (got - target).norm() < 0.5 * (before - target).norm()


def test_dbrx_flattened_experts_are_reported_truthfully(tmp_path):
    """DBRX stores its experts flattened, `ffn.experts.mlp.w1 / v1 / w2` of shape (E·ffn, hidden), viewed to
    (E, ffn, hidden) in the forward. They are not compressed (yet): the coverage report says so with its
    own reason ("experts_layout", not "other: not a matmul weight"), and nothing is wrong — the experts
    are kept exactly, the artifact round trip and per-row serving equal the model alone."""
    from deltacome_ao.compress import REASONS
    from deltacome_ao.evaluation.architectures import Arch, _COMMON

    arch = Arch("dbrx", "dbrx", dict(_COMMON, d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                     attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                                     ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)), moe=True)
    base = tiny_base(arch)
    ft = tiny_finetune(base)
    model = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, progress=False))
    report = coverage_report(model, base)
    experts = {k: v for k, v in report["uncompressed"].items() if ".ffn.experts.mlp." in k}
    assert sorted(k.rpartition(".")[2] for k in experts) == ["v1", "v1", "w1", "w1", "w2", "w2"]
    assert {v["reason"] for v in experts.values()} == {"experts_layout"}
    assert "other" not in report["uncompressed_by_reason"]
    assert "flattened stacked experts" in REASONS["experts_layout"]
    rows = {r["name"]: r for r in delta_report(model, base)}
    assert all(rows[k]["reason"] == "experts_layout" for k in experts)
    for k in experts:  # kept exactly as the fine-tune has them
        assert torch.equal(model.get_parameter(k), ft.get_parameter(k))
    x = inputs_for(arch, base, batch=2)
    path = save_delta(model, tmp_path / "ft", base=base)
    with torch.no_grad():
        got = model(**x).logits
        assert torch.equal(load_delta(copy.deepcopy(base), path)(**x).logits, got)
        served = MultiDeltaModel(copy.deepcopy(base))
        served.load_delta("ft", path)
        out = served(**x, delta_ids=["ft", None]).logits
        torch.testing.assert_close(out[0], got[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], base(**x).logits[1], rtol=1e-5, atol=1e-5)
