"""The delta artifact: `save_delta` / `load_delta` / `DeltaCoMeModel.from_pretrained` on a tiny Llama
pair (random base, fine-tune = base + low-rank delta + noise on every weight, norms changed too).

Covers: bit-exact logits after loading onto a fresh base (base given as a module, as a directory,
or not given), the artifact holding only the delta (size = Σ delta_nbytes + changed tensors +
headers), refusal of a wrong base (other seed, other shapes, other dtype) with the model untouched,
the baselines, a corrupt or newer artifact, and atomic writes (a crash leaves nothing partial).
"""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao import quantize_

import deltacome_ao.artifact as artifact
import deltacome_ao.fingerprint as fingerprint
from deltacome_ao import BitDeltaTensor, DeltaCoMeConfig, DeltaCoMeModel, MixedPrecisionDeltaTensor
from deltacome_ao import delta_size, load_delta, save_delta
from deltacome_ao.artifact import BaseMismatchError, DeltaFormatError
from tiny_models import LAYER_NAMES, PROJ, finetune, ids, tiny

COMPRESSED = (MixedPrecisionDeltaTensor, BitDeltaTensor)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@torch.no_grad()
def logits(model):
    return model(ids()).logits


def bits_of(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_weights(a, b):
    """Every state-dict entry bit-identical; compressed weights: same class, attributes, inner tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k, x in sa.items():
        y = sb[k]
        assert type(x) is type(y), k
        if isinstance(x, COMPRESSED):
            for n in x.tensor_attribute_names:
                assert getattr(x, n) == getattr(y, n), (k, n)
            for n in x.tensor_data_names:
                tx, ty = getattr(x, n), getattr(y, n)
                assert tx.dtype == ty.dtype and tx.shape == ty.shape and torch.equal(bits_of(tx), bits_of(ty)), (k, n)
        else:
            assert x.dtype == y.dtype and torch.equal(bits_of(x), bits_of(y)), k


def snapshot(model):
    return {k: (v.clone() if type(v) is torch.Tensor else v) for k, v in model.state_dict().items()}


def payload_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file size - 8-byte length - JSON header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header


@pytest.fixture(scope="module")
def pair():
    base = tiny()
    ft = finetune(base)
    config = DeltaCoMeConfig(base=base, group_size=32, progress=False)
    quantize_(ft, config)
    return base, ft, config


# --- round trips ---------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(pair, tmp_path):
    base, ft, config = pair
    out = save_delta(ft, tmp_path / "delta", base=base, config=config, metadata={"task": "unit"})
    assert sorted(os.listdir(out)) == ["README.md", "delta.safetensors", "delta_config.json"]  # README: the model card

    fresh = copy.deepcopy(base)
    base_q = fresh.model.layers[0].self_attn.q_proj.weight
    model = DeltaCoMeModel.from_pretrained(fresh, out)
    assert model is fresh
    assert torch.equal(logits(model), logits(ft))
    assert_same_weights(model, ft)
    # the compressed layer wraps the base module's own weight: no second copy of the base
    assert model.model.layers[0].self_attn.q_proj.weight.base_weight.data_ptr() == base_q.data_ptr()

    doc = json.loads((out / "delta_config.json").read_text())
    assert doc["format"] == "deltacome-delta" and doc["format_version"] == 2
    assert (doc["method"], doc["alpha"], doc["group_size"], doc["user"]) == ("deltacome", 1 / 16, 32, {"task": "unit"})
    assert sorted(doc["layers"]) == LAYER_NAMES
    spec = doc["layers"]["model.layers.0.mlp.up_proj"]
    w = ft.model.layers[0].mlp.up_proj.weight
    assert (spec["bits"], spec["counts"], spec["group_size"]) == (list(w.bits), list(w.counts), 32)
    fp = doc["base_fingerprint"]
    assert fp["model_type"] == "llama" and fp["complete"]
    assert set(fp["tensors"]) == set(base.state_dict())
    # only what differs from the base is kept: every fine-tuned tensor here does, except the compressed weights
    assert sorted(doc["kept"]) == sorted(k for k in base.state_dict() if not k.endswith(tuple(f"{p}.weight" for p in PROJ)))


def test_same_delta_same_bytes(pair, tmp_path):
    """safetensors writes `__metadata__` in hash-map order; the header is rewritten sorted, so saving
    the same delta twice gives identical files (reproducible digests, deduplicated uploads)."""
    base, ft, config = pair
    a = save_delta(ft, tmp_path / "a", base=base, config=config)
    b = save_delta(ft, tmp_path / "b", base=base, config=config)
    raw = (a / "delta.safetensors").read_bytes()
    assert raw == (b / "delta.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    pairs = json.loads(raw[8:8 + size], object_pairs_hook=lambda kv: kv)
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys) and "__metadata__" in keys
    metadata = dict(pairs)["__metadata__"]
    assert [k for k, _ in metadata] == sorted(k for k, _ in metadata)
    assert torch.equal(logits(DeltaCoMeModel.from_pretrained(copy.deepcopy(base), a)), logits(ft))


def test_only_changed_tensors_are_kept(tmp_path):
    base = tiny()
    ft = finetune(base)
    with torch.no_grad():  # the fine-tune leaves the embeddings and one norm as they were
        ft.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
        ft.model.norm.weight.copy_(base.model.norm.weight)
    quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    out = save_delta(ft, tmp_path / "d", base=base)
    kept = json.loads((out / "delta_config.json").read_text())["kept"]
    assert "model.embed_tokens.weight" not in kept and "model.norm.weight" not in kept and "lm_head.weight" in kept
    assert torch.equal(logits(load_delta(copy.deepcopy(base), out)), logits(ft))


def test_base_as_directory_and_from_path(pair, tmp_path):
    base, ft, config = pair
    base.save_pretrained(tmp_path / "base")
    out = save_delta(ft, tmp_path / "delta", base=str(tmp_path / "base"))
    model = DeltaCoMeModel.from_pretrained(str(tmp_path / "base"), out)
    assert torch.equal(logits(model), logits(ft))
    assert_same_weights(model, ft)


def test_without_base_everything_else_is_kept(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta")
    doc = json.loads((out / "delta_config.json").read_text())
    fp = doc["base_fingerprint"]
    assert not fp["complete"] and sorted(fp["tensors"]) == [f"{n}.weight" for n in LAYER_NAMES]
    assert len(doc["kept"]) == len(base.state_dict()) - len(LAYER_NAMES)
    model = load_delta(copy.deepcopy(base), out)
    assert torch.equal(logits(model), logits(ft))
    # the fingerprint still covers every base tensor the result depends on
    with pytest.raises(BaseMismatchError, match="other values"):
        load_delta(tiny(seed=9), out)


@pytest.mark.parametrize("method", ["bitdelta", "lowrank", "single"])
def test_baselines_round_trip(method, tmp_path):
    base = tiny()
    ft = finetune(base)
    quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, method=method, progress=False))
    out = save_delta(ft, tmp_path / method, base=base)
    model = load_delta(copy.deepcopy(base), out)
    assert torch.equal(logits(model), logits(ft))
    assert_same_weights(model, ft)


# --- size ----------------------------------------------------------------------------------------


def test_size_is_the_delta_plus_kept_tensors(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    doc = json.loads((out / "delta_config.json").read_text())
    compressed = sum(m.weight.delta_nbytes() for m in ft.modules() if isinstance(getattr(m, "weight", None), COMPRESSED))
    kept = sum(v.numel() * v.element_size() for k, v in ft.state_dict().items() if k in doc["kept"])
    assert doc["bytes"] == {"compressed": compressed, "kept": kept}
    assert payload_bytes(out / "delta.safetensors") == compressed + kept  # nothing else stored, no base weight
    size = delta_size(out)
    assert size == sum(f.stat().st_size for f in out.iterdir())
    assert size - (compressed + kept) < 48_000  # the safetensors header, delta_config.json and the model card
    fp32_bytes = sum(v.numel() * v.element_size() for v in base.state_dict().values())
    assert size < fp32_bytes / 2


# --- wrong base ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_base, message",
    [
        (lambda: tiny(seed=5), r"other values \(full sha256\): model\.embed_tokens\.weight"),
        (lambda: tiny(seed=0, intermediate_size=96), r"shape\(s\) differ: model\.layers\.0\.mlp\.gate_proj\.weight \(96, 64\) \(expected \(128, 64\)\)"),
        (lambda: tiny(seed=0).to(torch.bfloat16), r"dtype\(s\) differ: .* bfloat16 \(expected float32\)"),
        (lambda: tiny(seed=0, num_hidden_layers=3), r"tensor\(s\) the original base did not have: model\.layers\.2\."),
    ],
    ids=["other_seed", "other_shapes", "other_dtype", "extra_layer"],
)
def test_wrong_base_is_refused_untouched(pair, tmp_path, make_base, message):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    wrong = make_base()
    before = snapshot(wrong)
    with pytest.raises(BaseMismatchError, match=message):
        load_delta(wrong, out)
    after = wrong.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(bits_of(after[k]), bits_of(v)) for k, v in before.items())


def test_one_changed_value_is_caught(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    near = copy.deepcopy(base)
    with torch.no_grad():
        near.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3
    with pytest.raises(BaseMismatchError, match=r"1 tensor\(s\) have other values .*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_delta(near, out)
    # tensors this small are hashed whole by the sampled check too; "none" checks structure only
    with pytest.raises(BaseMismatchError, match="sample sha256"):
        load_delta(copy.deepcopy(near), out, verify="sample")
    assert torch.equal(logits(load_delta(copy.deepcopy(base), out, verify="sample")), logits(ft))


def test_sample_hash_covers_large_tensors_sparsely():
    big = torch.zeros(2048, 1024)  # 8 MiB > the 1 MiB sampled
    digest = fingerprint.sample_hash(big)
    first, last = big.clone(), big.clone()
    first[0, 0], last[-1, -1] = 1.0, 1.0
    assert fingerprint.sample_hash(first) != digest and fingerprint.sample_hash(last) != digest
    assert fingerprint.full_hash(big) != fingerprint.full_hash(first)


def test_save_refuses_another_base(pair, tmp_path):
    _, ft, _ = pair
    with pytest.raises(BaseMismatchError, match="not this base's weight"):
        save_delta(ft, tmp_path / "delta", base=tiny(seed=3))
    assert not (tmp_path / "delta").exists()


def test_loading_twice_is_refused(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta")
    model = load_delta(copy.deepcopy(base), out)
    with pytest.raises(ValueError, match="already holds compressed weights"):
        load_delta(model, out)


# --- bad artifacts -------------------------------------------------------------------------------


def test_corrupt_or_newer_artifact(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    tensors = load_file(out / "delta.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight:s"]
    save_file(tensors, out / "delta.safetensors")
    with pytest.raises(DeltaFormatError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight:s"):
        load_delta(copy.deepcopy(base), out)

    out = save_delta(ft, tmp_path / "delta2", base=base)
    tensors = load_file(out / "delta.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight:v_scale"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, out / "delta.safetensors")
    with pytest.raises(DeltaFormatError, match=r"q_proj: v_scale is"):
        load_delta(copy.deepcopy(base), out)

    doc = json.loads((out / "delta_config.json").read_text())
    doc["format_version"] = 99
    (out / "delta_config.json").write_text(json.dumps(doc))
    with pytest.raises(DeltaFormatError, match="format_version 99"):
        load_delta(copy.deepcopy(base), out)
    with pytest.raises(FileNotFoundError, match="not a delta artifact"):
        load_delta(copy.deepcopy(base), tmp_path)


def test_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no compressed layer"):
        save_delta(tiny(), tmp_path / "d")


# --- atomic writes -------------------------------------------------------------------------------


def _crashing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 100)  # a partial file, then the crash
    raise KeyboardInterrupt("simulated crash mid-write")


def test_crash_mid_write_leaves_no_partial_directory(pair, tmp_path, monkeypatch):
    base, ft, _ = pair
    monkeypatch.setattr(artifact, "save_file", _crashing_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_delta(ft, tmp_path / "delta", base=base)
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic(pair, tmp_path, monkeypatch):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    with pytest.raises(FileExistsError):
        save_delta(ft, out, base=base)
    original = {f.name: f.read_bytes() for f in out.iterdir()}

    monkeypatch.setattr(artifact, "save_file", _crashing_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_delta(ft, out, overwrite=True)
    assert os.listdir(tmp_path) == ["delta"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == original
    monkeypatch.undo()

    save_delta(ft, out, overwrite=True)  # now without base: a different artifact replaces the old one
    assert os.listdir(tmp_path) == ["delta"]
    assert not json.loads((out / "delta_config.json").read_text())["base_fingerprint"]["complete"]


def test_only_safetensors_and_json_are_read(pair, tmp_path):
    base, ft, _ = pair
    out = save_delta(ft, tmp_path / "delta", base=base)
    with safe_open(str(out / "delta.safetensors"), framework="pt") as f:
        assert f.metadata()["deltacome"] == "deltacome-delta"
        assert not any(k.endswith(":base_weight") for k in f.keys())
