"""The public API end to end: `quantize_(model, DeltaCoMeConfig(base=...))` on tiny Hugging Face
causal LMs (random init, fine-tune = base + low-rank delta + noise on every weight).

Covers which layers get compressed, what stays bit-exact, accuracy against the fine-tuned model,
the byte budget, the three ways to pass the base, the baselines, torch.compile / generate /
state-dict round trips, all-or-nothing failure on bad input, and training on top.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchao import quantize_

from deltacome_ao import (
    BitDeltaTensor,
    DeltaCoMeConfig,
    compress_,
    MixedPrecisionDeltaTensor,
    delta_report,
    deltacome_config,
)
from deltacome_ao.allocate import budget_bits
from deltacome_ao import config as config_module
from deltacome_ao.checkpoint import CheckpointMismatchError
from deltacome_ao.config import BaseWeights
from deltacome_ao.mixed_precision_delta_tensor import BudgetTooSmallError
from deltacome_ao.recipes import Recipe
from tiny_models import ARCHS, HIDDEN, LAYER_NAMES, LAYERS, VOCAB, finetune, ids, tiny

EXPECTED = LAYER_NAMES
ALPHA = 1 / 16
GROUP = 32
COMPRESSED = (MixedPrecisionDeltaTensor, BitDeltaTensor)
# Measured relative logits error vs. the fine-tuned model, seeds 0-2: 0.0057-0.0074 for all three
# architectures (the base model's logits: 0.70-0.84). Bound with ~3x margin.
LOGITS_RTOL = 0.02


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def cfg(base, **kwargs) -> DeltaCoMeConfig:
    return DeltaCoMeConfig(base=base, **{"alpha": ALPHA, "group_size": GROUP, "progress": False, **kwargs})





@torch.no_grad()
def logits(model, x=None):
    return model(ids() if x is None else x).logits


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so NaN == NaN and -0.0 != 0.0 (bit-exact comparison)."""
    return t.detach().contiguous().view(torch.uint8)


def assert_unchanged(model, snap):
    sd = model.state_dict()
    assert list(sd) == list(snap)
    for k, v in sd.items():
        assert type(v) is torch.Tensor, f"{k} is a {type(v).__name__}"
        assert torch.equal(bits_of(v), bits_of(snap[k])), f"{k} changed"
    for name, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter, name
    assert delta_report(model) == []


def assert_no_run_state(config):
    """The quantize_ run left nothing behind: no state on the config, none in the handler's module."""
    import dataclasses

    assert set(vars(config)) == {f.name for f in dataclasses.fields(config)}
    assert config_module._RUNS == {}


def compressed_names(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), COMPRESSED))


def compressed_state(w) -> dict:
    out = {n: getattr(w, n) for n in w.tensor_data_names}
    out.update({n: getattr(w, n) for n in w.tensor_attribute_names})
    return out


@pytest.fixture(scope="module")
def llama():
    base = tiny("llama")
    return base, finetune(base)


def compress(base, ft, **kwargs):
    model = copy.deepcopy(ft)
    quantize_(model, cfg(base, **kwargs))
    return model


# --- 1. the three architectures ------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_hf_causal_lm(arch):
    base = tiny(arch)
    ft = finetune(base)
    if arch == "llama":
        assert ft.config.num_key_value_heads < ft.config.num_attention_heads  # GQA: k/v are 32x64
    before = snapshot(ft)
    ref, base_logits = logits(ft), logits(base)

    config = cfg(base)
    quantize_(ft, config)

    assert compressed_names(ft) == EXPECTED
    assert all(type(getattr(ft.get_submodule(n), "weight")) is MixedPrecisionDeltaTensor for n in EXPECTED)
    assert_no_run_state(config)  # nothing left over for the next quantize_ call

    # Everything but the projection weights is the fine-tuned model's, bit for bit, as plain tensors.
    sd = ft.state_dict()
    untouched = [k for k in sd if k.removesuffix(".weight") not in EXPECTED]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(untouched)
    for k in untouched:
        assert type(sd[k]) is torch.Tensor, k
        assert torch.equal(bits_of(sd[k]), bits_of(before[k])), k
    # The fine-tune changed embeddings and lm_head, so "untouched" really means "not the base's".
    assert not torch.equal(sd["lm_head.weight"], base.state_dict()["lm_head.weight"])

    biases = [k for k in untouched if k.endswith(".bias")]
    if arch == "qwen2":
        assert sorted(biases) == sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(LAYERS) for p in "qkv")
        for k in biases:
            assert isinstance(ft.get_submodule(k.removesuffix(".bias")).weight, MixedPrecisionDeltaTensor)
    else:
        assert biases == []

    out = logits(ft)
    err, base_err = rel(out, ref), rel(base_logits, ref)
    assert err < LOGITS_RTOL, (arch, err)
    assert err < base_err / 20, (arch, err, base_err)

    report = delta_report(ft)
    assert sorted(r["name"] for r in report) == EXPECTED
    for r in report:
        out_f, in_f = r["shape"]
        assert 0 < r["bits_per_param"] <= 16 * ALPHA, r
        assert 8 * r["delta_bytes"] <= budget_bits(out_f, in_f, ALPHA), r
        assert r["bands"][0][0] == 8, r  # the paper schedule starts with 8-bit vectors


# --- 2. three ways to pass the base ---------------------------------------------------------------


def test_base_as_module_state_dict_or_directory(llama, tmp_path):
    base, ft = llama
    base.save_pretrained(tmp_path / "one")
    base.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert BaseWeights(tmp_path / "sharded").model_type == "llama"

    sources = {
        "module": base,
        "state_dict": {k: v.clone() for k, v in base.state_dict().items()},
        "directory": tmp_path / "one",
        "directory_str_sharded": str(tmp_path / "sharded"),
    }
    models = {label: compress(src, ft) for label, src in sources.items()}
    reference = models.pop("module")
    for label, model in models.items():
        assert compressed_names(model) == EXPECTED, label
        for name in EXPECTED:
            a = compressed_state(reference.get_submodule(name).weight)
            b = compressed_state(model.get_submodule(name).weight)
            assert a.keys() == b.keys()
            for key in a:
                same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
                assert same, (label, name, key)
        assert torch.equal(logits(model), logits(reference)), label


def test_compressed_weights_never_share_the_callers_base_memory(llama, tmp_path):
    """The compressed model holds its own copy of each base weight given in memory (the caller may change
    or reload its base later), a fresh read of a directory's tensor too (a memory-mapped file can change
    under it); a base cast to the fine-tuned dtype is the compressed weight's as it is (no second copy)."""
    base, ft = llama
    base.save_pretrained(tmp_path / "base")
    storages = {p.untyped_storage().data_ptr() for p in base.parameters()}
    for source in (base, {k: v for k, v in base.state_dict().items()}, tmp_path / "base"):
        model = compress(source, ft)
        for name in EXPECTED:
            w = model.get_submodule(name).weight
            assert w.base_weight.untyped_storage().data_ptr() not in storages, name
            assert torch.equal(w.base_weight, base.get_submodule(name).weight), name
        if isinstance(source, dict):
            before = logits(model)
            with torch.no_grad():  # the caller changes its base in place (x2 and back: exact)
                base.model.layers[0].self_attn.q_proj.weight.mul_(2)
            try:
                assert torch.equal(logits(model), before)
            finally:
                with torch.no_grad():
                    base.model.layers[0].self_attn.q_proj.weight.div_(2)
    # a bf16 base for an fp32 fine-tune: the fp32 cast made by compress_ is held, values as copied
    low = copy.deepcopy(base).to(torch.bfloat16)
    model = compress(low, ft)
    w = model.get_submodule(EXPECTED[0]).weight
    assert w.base_weight.dtype == torch.float32
    assert torch.equal(w.base_weight, low.get_submodule(EXPECTED[0]).weight.float())


# --- 3. shorthand and baselines at the same budget ------------------------------------------------


@pytest.mark.parametrize("method", ["deltacome", "single", "lowrank", "bitdelta"])
def test_methods_share_the_budget(llama, method):
    base, ft = llama
    model = copy.deepcopy(ft)
    quantize_(model, deltacome_config(base, alpha=ALPHA, method=method, group_size=GROUP, progress=False))

    kind = BitDeltaTensor if method == "bitdelta" else MixedPrecisionDeltaTensor
    assert compressed_names(model) == EXPECTED
    assert all(type(model.get_submodule(n).weight) is kind for n in EXPECTED)
    report = delta_report(model)
    assert len(report) == len(EXPECTED)
    for r in report:
        out_f, in_f = r["shape"]
        if method == "bitdelta":
            assert r["bands"] is None and r["structure"] == "sign+scale" and r["tensor"] == "BitDeltaTensor"
            assert r["delta_bytes"] == out_f * -(-in_f // 8) + 4, r  # sign bits + one fp32 scale
            assert 1.0 <= r["bits_per_param"] <= 1.02, r
        else:
            assert 8 * r["delta_bytes"] <= budget_bits(out_f, in_f, ALPHA), r
            widths = {b for b, _ in r["bands"]}
            assert widths == {"single": {2}, "lowrank": {16}}.get(method, widths), r
    total = sum(r["delta_bytes"] for r in report)
    params = sum(r["shape"][0] * r["shape"][1] for r in report)
    assert 8 * total / params <= (1.02 if method == "bitdelta" else 16 * ALPHA)
    # Measured: deltacome 0.0065, lowrank (1 fp16 vector fits) 0.19, single 0.30, bitdelta 0.33; base 0.79.
    ref = logits(ft)
    err, base_err = rel(logits(model), ref), rel(logits(base), ref)
    assert err < (base_err / 20 if method == "deltacome" else 0.6 * base_err), err


# --- 4. compile, generate, save / load ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*_stable_hash_for_caching")
def test_compile_matches_eager(llama):
    base, ft = llama
    model = compress(base, ft)
    x = ids()
    eager = logits(model, x)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(x).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_generate_matches_greedy_forward(llama):
    base, ft = llama
    model = compress(base, ft)
    prompt = ids(seed=5, batch=1, length=6)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt)
    # The KV-cache path (one token at a time through the compressed layers) == full forwards.
    seq = prompt
    for _ in range(out.shape[1] - prompt.shape[1]):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_state_dict_round_trip(llama, tmp_path):
    base, ft = llama
    model = compress(base, ft)
    path = tmp_path / "compressed.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert all(isinstance(loaded[f"{n}.weight"], MixedPrecisionDeltaTensor) for n in EXPECTED)

    # A freshly quantized model of *another* fine-tune: same layout, different weights until loaded.
    fresh = compress(base, finetune(base, seed=7))
    assert not torch.equal(logits(fresh), logits(model))
    fresh.load_state_dict(loaded)
    assert torch.equal(logits(fresh), logits(model))
    assert all(isinstance(fresh.get_submodule(n).weight, MixedPrecisionDeltaTensor) for n in EXPECTED)


# --- 5. bad input: clear error, model untouched -----------------------------------------------------


def _nan_in_later_finetuned_layer(base, ft):
    with torch.no_grad():
        ft.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    return base


def _inf_in_later_base_layer(base, ft):
    bad = copy.deepcopy(base)
    with torch.no_grad():
        bad.model.layers[1].self_attn.v_proj.weight[0, 1] = float("inf")
    return bad


def _missing_projection(base, ft):
    sd = dict(base.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    return sd


BAD_INPUTS = {
    "mistral_base_for_llama": (
        lambda base, ft: tiny("mistral"), {}, ValueError,
        r"base is a 'mistral' model but the fine-tuned model is 'llama'",
    ),
    "qwen2_state_dict_for_llama": (
        lambda base, ft: tiny("qwen2").state_dict(), {}, ValueError,
        r"model\.layers\.0\.self_attn\.q_proj: the base has a bias but the fine-tuned layer has none",
    ),
    "other_hidden_size": (
        lambda base, ft: tiny("llama", hidden_size=2 * HIDDEN), {}, ValueError,
        r"model\.embed_tokens\.weight: fine-tuned shape \(128, 64\) but base shape \(128, 128\);",
    ),
    "other_vocabulary": (
        lambda base, ft: tiny("llama", vocab_size=VOCAB + 32), {}, ValueError,
        r"model\.embed_tokens\.weight: .* base shape \(160, 64\) \(the vocabulary sizes differ\)",
    ),
    "missing_base_weight": (
        _missing_projection, {}, CheckpointMismatchError,
        r"the base has no tensor model\.layers\.1\.mlp\.up_proj\.weight; the base is missing weights",
    ),
    "nan_in_finetuned_layer_1": (
        _nan_in_later_finetuned_layer, {}, ValueError,
        r"model\.layers\.1\.mlp\.down_proj: the fine-tuned weight contains NaN or Inf",
    ),
    "inf_in_base_layer_1": (
        _inf_in_later_base_layer, {}, ValueError,
        r"model\.layers\.1\.self_attn\.v_proj: the base weight contains NaN or Inf",
    ),
    "budget_too_small": (
        lambda base, ft: base, {"alpha": 1e-4}, BudgetTooSmallError,
        r"model\.layers\.0\.self_attn\.q_proj: alpha=0\.0001 gives \d+ bits .* cheapest singular vector costs",
    ),
    "recipe_selects_nothing": (
        lambda base, ft: base, {"recipe": Recipe("none", targets=r"no_such_layer$")}, ValueError,
        r"recipe 'none' selects none of the",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_leaves_model_unchanged(llama, case):
    make_base, kwargs, error, match = BAD_INPUTS[case]
    base, ft = llama
    model = copy.deepcopy(ft)
    bad_base = make_base(base, model)
    snap = snapshot(model)
    config = cfg(bad_base, **kwargs)
    with pytest.raises(error, match=match):
        quantize_(model, config)
    assert_unchanged(model, snap)
    assert_no_run_state(config)


def test_model_is_usable_after_a_failed_attempt(llama):
    base, ft = llama
    model = copy.deepcopy(ft)
    with pytest.raises(ValueError, match="'mistral' model"):
        quantize_(model, cfg(tiny("mistral")))
    quantize_(model, cfg(base))
    assert torch.equal(logits(model), logits(compress(base, ft)))
    with pytest.raises(ValueError, match=r"q_proj: the weight is already a MixedPrecisionDeltaTensor"):
        quantize_(model, cfg(base))  # a second pass would compress the compressed weights


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "gptq"}, r"unknown method 'gptq'; choose from \('deltacome', 'bitdelta', 'lowrank', 'single'"),
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\] .* got 0\.0"),
        ({"alpha": -0.5}, r"alpha must be in \(0, 1\] .* got -0\.5"),
        ({"alpha": float("nan")}, r"alpha must be in \(0, 1\] .* got nan"),
        ({"alpha": float("inf")}, r"alpha must be in \(0, 1\] .* got inf"),
        ({"alpha": 10}, r"alpha must be in \(0, 1\] .* got 10"),
        ({"group_size": 0}, r"group_size must be an integer >= 2"),
        ({"group_size": 1}, r"group_size must be an integer >= 2"),
        ({"bands": [(3, -2)]}, r"bands: the count of singular vectors must be an integer >= 1, got -2"),
        ({"damp": float("inf")}, r"damp must be a finite number >= 0"),
        ({"svd": "fast"}, r"unknown svd 'fast'"),
        ({"method": "single", "single_bits": 9}, r"single_bits: unsupported bit-width 9"),
        ({"bands": [(8, 2), (12, 4)]}, r"bands: unsupported bit-width 12"),
    ],
)
def test_invalid_config_values(llama, kwargs, match):
    base, ft = llama
    with pytest.raises(ValueError, match=match):
        cfg(base, **kwargs)


def test_missing_or_unreadable_base(tmp_path):
    with pytest.raises(ValueError, match="needs base="):
        DeltaCoMeConfig()
    with pytest.raises(FileNotFoundError, match="holds no \\*\\.safetensors file"):
        DeltaCoMeConfig(base=tmp_path)
    with pytest.raises(TypeError, match="base must be an nn.Module, a state dict or a directory path, got int"):
        DeltaCoMeConfig(base=3)


# --- 6. training on top of the compressed model -----------------------------------------------------


def test_train_a_head_on_the_compressed_model(llama):
    base, ft = llama
    model = compress(base, ft).train()
    weights = {n: model.get_submodule(n).weight for n in EXPECTED}
    frozen = {n: {k: v.clone() for k, v in compressed_state(w).items() if isinstance(v, torch.Tensor)}
              for n, w in weights.items()}
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, 3))
    head_before = copy.deepcopy(head)
    # A typical script hands every parameter to the optimizer; frozen ones must simply be skipped.
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-2)
    x, labels = ids(seed=11, batch=4), torch.tensor([0, 1, 2, 1])

    def step():
        embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
        loss = F.cross_entropy(head(hidden.mean(1)), labels)
        opt.zero_grad()
        loss.backward()
        return loss.item(), embeds

    first, embeds = step()
    # Gradients reach the inputs through every compressed layer, and match the dense equivalent.
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert model.model.layers[0].input_layernorm.weight.grad.abs().sum() > 0
    dense = copy.deepcopy(ft).train()
    with torch.no_grad():
        for n, w in weights.items():
            dense.get_submodule(n).weight.copy_(w.dequantize())
    ref_embeds = dense.get_input_embeddings()(x).detach().requires_grad_(True)
    F.cross_entropy(head_before(dense.model(inputs_embeds=ref_embeds).last_hidden_state.mean(1)), labels).backward()
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, rtol=1e-3, atol=1e-6)

    for n, w in weights.items():
        assert not w.requires_grad and w.grad is None, n
    opt.step()
    losses = [first]
    for _ in range(5):
        losses.append(step()[0])
        opt.step()
    assert losses[-1] < losses[0]
    assert not torch.equal(head[1].weight, head_before[1].weight)
    for n, w in weights.items():
        assert model.get_submodule(n).weight is w, n
        for k, v in frozen[n].items():
            assert torch.equal(getattr(w, k), v), (n, k)


def test_filter_selecting_parent_modules_says_to_select_the_layers(llama):
    """A filter that matches `...mlp` (a parent module) selects no matmul weight (the walk does not
    descend into a match): the error says that, not 'pass recipe='."""
    base, ft = llama
    model = copy.deepcopy(ft)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"the filter selects no matmul weight .*'model\.layers\.0\.mlp' \(LlamaMLP\)"):
        compress_(model, DeltaCoMeConfig(base=base, progress=False), filter_fn=lambda m, name: "mlp" in name)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model = copy.deepcopy(ft)
    compress_(model, DeltaCoMeConfig(base=base, progress=False),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "mlp" in name)
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if isinstance(p.data, MixedPrecisionDeltaTensor)} \
        == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
