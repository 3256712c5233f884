"""Trust the bytes: the artifact's content digests, defensive reading, all-or-nothing loads, dtype
harmonisation, meta-device bases, unsupported operations on compressed weights (issue 11).

Each test covers one kind of bad input: a corrupted tensor or field is a `DeltaFormatError` naming
it, a failed load leaves the base bit-identical, a mixed-dtype delta loads (and serves) in the
base's dtype, and operations a compressed weight does not implement say so in one short message.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor, compress_, load_delta, save_delta
from deltacome_ao.artifact import BaseMismatchError, DeltaFormatError
from deltacome_ao.format import (
    CONFIG_NAME,
    DOCUMENT_DIGEST,
    WEIGHTS_NAME,
    IntegrityWarning,
    document_digest,
    document_text,
    read_delta_config,
    tensor_record,
    verify_artifact,
)
from deltacome_ao.serving import MultiDeltaModel
from tiny_models import finetune, ids, tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pair():
    base = tiny(tie_word_embeddings=True)
    ft = finetune(base)
    compress_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    return base, ft


@pytest.fixture
def artifact(pair, tmp_path):
    base, ft = pair
    return save_delta(ft, tmp_path / "delta", base=base)


def raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def state(model):
    """{name: (type, dtype, bytes)}: compressed weights by inner tensor."""
    out = {}
    for k, v in model.state_dict().items():
        parts = {n: getattr(v, n) for n in v.tensor_data_names} if isinstance(v, MixedPrecisionDeltaTensor) else {"": v}
        for n, t in parts.items():
            out[f"{k}:{n}"] = (type(v).__name__, t.dtype, raw(t).clone())
    return out


def assert_untouched(model, before):
    after = state(model)
    assert list(after) == list(before)
    for k, (kind, dtype, data) in before.items():
        assert after[k][0] == kind and after[k][1] == dtype and torch.equal(after[k][2], data), k


def rewrite(out, edit_document=None, edit_tensors=None, redigest=True):
    """Edit an artifact as a tool would that keeps it self-consistent (tensor records and the
    document digest recomputed), so that the check under test is the one that fires."""
    document = json.loads((out / CONFIG_NAME).read_text())
    tensors = load_file(out / WEIGHTS_NAME)
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "deltacome": "deltacome-delta",
                                                         "format_version": str(document["format_version"])})
        document["integrity"]["tensors"] = {k: tensor_record(v) for k, v in sorted(tensors.items())}
    if edit_document:
        edit_document(document)
    if redigest:
        document[DOCUMENT_DIGEST] = document_digest(document)
    (out / CONFIG_NAME).write_text(document_text(document))


# --- content digests -----------------------------------------------------------------------------


def test_document_records_every_tensor_and_itself(artifact):
    document = json.loads((artifact / CONFIG_NAME).read_text())
    assert document["format_version"] == 2
    stored = load_file(artifact / WEIGHTS_NAME)
    assert document["integrity"]["tensors"] == {k: tensor_record(v) for k, v in sorted(stored.items())}
    assert document[DOCUMENT_DIGEST] == document_digest(document)
    # formatting does not matter, values do
    (artifact / CONFIG_NAME).write_text(json.dumps(document, sort_keys=True))
    assert verify_artifact(artifact)["kept"] == document["kept"]


def test_flipped_tensor_bit_is_named(pair, artifact):
    base, _ = pair
    data = bytearray((artifact / WEIGHTS_NAME).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = "model.layers.1.mlp.up_proj.weight:u_packed"
    data[8 + n + header[name]["data_offsets"][0] + 3] ^= 0x10
    (artifact / WEIGHTS_NAME).write_bytes(bytes(data))
    target = copy.deepcopy(base)
    before = state(target)
    with pytest.raises(DeltaFormatError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight:u_packed' does not match its recorded sha256"):
        load_delta(target, artifact)
    assert_untouched(target, before)
    with pytest.raises(DeltaFormatError, match="u_packed"):
        verify_artifact(artifact)
    # verify="none" skips the content checks, explicitly: the load succeeds (with the corrupted codes)
    loaded = load_delta(copy.deepcopy(base), artifact, verify="none")
    assert isinstance(loaded.model.layers[1].mlp.up_proj.weight, MixedPrecisionDeltaTensor)


@pytest.mark.parametrize("field, value", [("user", {"task": "other"}), ("alpha", 0.5), ("kept", []),
                                          ("integrity", None)])
def test_changed_field_is_detected(pair, artifact, field, value):
    base, _ = pair
    document = json.loads((artifact / CONFIG_NAME).read_text())
    document[field] = value
    (artifact / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(DeltaFormatError, match="does not match its document_sha256"):
        load_delta(copy.deepcopy(base), artifact)


@pytest.mark.parametrize("field, value, message", [
    ("kept", "model.norm.weight", r"field 'kept' must be a list of distinct tensor names, got str"),
    ("kept", ["model.norm.weight", "model.norm.weight"], r"field 'kept' must be a list of distinct"),
    ("aliases", {"lm_head.weight": 3}, r"field 'aliases' must be an object"),
    ("aliases", {"lm_head.weight": "lm_head.weight"}, r"field 'aliases' entry"),
    ("layers", [], r"field 'layers' must be an object"),
    ("model_config", "llama", r"field 'model_config' must be an object or null"),
    ("bytes", {"compressed": "1"}, r"field 'bytes' must be an object"),
    ("base_fingerprint", {"tensors": {"x": {"shape": [1], "dtype": "float32", "sha256": "nope"}}},
     r"field 'base_fingerprint' tensors\['x'\]\.sha256 must be a sha256 hex digest"),
    ("base_fingerprint", None, r"field 'base_fingerprint' must be an object"),
    ("format_version", "2", r"field 'format_version' must be an integer"),
    ("integrity", {"tensors": {}}, r"field 'integrity\.tensors' does not list the stored tensors"),
])
def test_malformed_field_is_named_even_unhashed(pair, artifact, field, value, message):
    """With the digest recomputed (or verify="none"), every field's type is still checked, naming
    the file and the field."""
    base, _ = pair
    rewrite(artifact, lambda d: d.__setitem__(field, value))
    for verify in ("full", "none"):
        target = copy.deepcopy(base)
        before = state(target)
        with pytest.raises(DeltaFormatError, match=message) as info:
            load_delta(target, artifact, verify=verify)
        assert CONFIG_NAME in str(info.value)
        assert_untouched(target, before)


def test_layer_spec_fields_are_checked(pair, artifact):
    base, _ = pair
    layer = "model.layers.0.mlp.down_proj"
    original = (artifact / CONFIG_NAME).read_bytes()
    for key, value, message in [("bits", [8.0, 3], "bad bands"), ("counts", "2", "bits and counts"),
                                ("delta_bytes", 1, "delta_bytes 1 does not match"), ("dtype", "int8", "floating-point"),
                                ("shape", [64], "bad shape"), ("tensor", "Nope", "Nope")]:
        (artifact / CONFIG_NAME).write_bytes(original)
        rewrite(artifact, lambda d: d["layers"][layer].__setitem__(key, value))
        with pytest.raises(DeltaFormatError, match=message):
            load_delta(copy.deepcopy(base), artifact)


def test_truncated_or_garbled_tensor_file(pair, artifact):
    base, _ = pair
    data = (artifact / WEIGHTS_NAME).read_bytes()
    for broken in (data[:100], data[:-1], data + b"\0", b"", data[:8] + b"[" + data[9:]):
        (artifact / WEIGHTS_NAME).write_bytes(broken)
        with pytest.raises(DeltaFormatError, match=r"delta\.safetensors: not a readable safetensors file"):
            read_delta_config(artifact)
        with pytest.raises(DeltaFormatError):
            load_delta(copy.deepcopy(base), artifact)


def test_version_1_artifact_loads_with_a_warning(pair, artifact):
    base, ft = pair
    reference = load_delta(copy.deepcopy(base), artifact)

    def downgrade(d):
        d["format_version"] = 1
        del d["integrity"], d[DOCUMENT_DIGEST]

    rewrite(artifact, downgrade, redigest=False)
    tensors = load_file(artifact / WEIGHTS_NAME)
    save_file(tensors, artifact / WEIGHTS_NAME, metadata={"format": "pt", "deltacome": "deltacome-delta", "format_version": "1"})
    with pytest.warns(IntegrityWarning, match="integrity is not checked"):
        model = load_delta(copy.deepcopy(base), artifact)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)
    # a version 2 document without its digests is refused, not read as version 1
    rewrite(artifact, lambda d: d.__setitem__("format_version", 2), redigest=False)
    with pytest.raises(DeltaFormatError, match="'document_sha256' is missing"):
        load_delta(copy.deepcopy(base), artifact)


# --- all or nothing ------------------------------------------------------------------------------


def test_bad_alias_leaves_the_base_untouched(pair, artifact):
    base, _ = pair
    assert json.loads((artifact / CONFIG_NAME).read_text())["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    original = (artifact / CONFIG_NAME).read_bytes()
    for aliases, error, message in [
        ({"lm_head.weight": "model.nothing.weight"}, DeltaFormatError, "which is no tensor"),
        ({"model.nothing.weight": "model.embed_tokens.weight"}, BaseMismatchError, "no such tensor"),
        ({"lm_head.weight": "model.norm.weight"}, BaseMismatchError, "has shape"),
    ]:
        (artifact / CONFIG_NAME).write_bytes(original)
        rewrite(artifact, lambda d: d.__setitem__("aliases", aliases))
        target = copy.deepcopy(base)
        before = state(target)
        with pytest.raises(error, match=message):
            load_delta(target, artifact)
        assert_untouched(target, before)


def test_kept_tensor_of_another_shape_is_refused_before_the_swap(pair, artifact):
    base, _ = pair

    def shrink(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()

    rewrite(artifact, edit_tensors=shrink)
    target = copy.deepcopy(base)
    before = state(target)
    with pytest.raises(BaseMismatchError, match=r"model\.norm\.weight: the delta stores a \(63,\) tensor, the base model's is \(64,\)"):
        load_delta(target, artifact)
    assert_untouched(target, before)


def test_sharded_base_directory_fingerprint(pair, tmp_path):
    """A base saved in many small shards: the fingerprint covers every base tensor (tied ones once),
    and loading onto that same base (full hashing) works."""
    base, ft = pair
    base.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 5
    out = save_delta(ft, tmp_path / "delta", base=str(tmp_path / "base"))
    fp = json.loads((out / CONFIG_NAME).read_text())["base_fingerprint"]
    expected = {k for k in base.state_dict() if k != "lm_head.weight"}  # tied to the embeddings: stored once
    assert fp["complete"] and set(fp["tensors"]) == expected
    model = load_delta(copy.deepcopy(base), out, verify="full")
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, ft(ids()).logits)


# --- dtypes and devices --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A bf16 base and an fp32 fine-tune of it, compressed and saved."""
    base = tiny().to(torch.bfloat16)
    ft = finetune(copy.deepcopy(base).float())
    compress_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    out = save_delta(ft, tmp_path_factory.mktemp("mixed") / "delta", base=base)
    return base, ft, out


def test_mixed_dtypes_load_in_the_base_dtype(mixed):
    base, ft, out = mixed
    target = copy.deepcopy(base)
    base_up = target.model.layers[0].mlp.up_proj.weight
    with pytest.warns(UserWarning, match="cast to the base's dtype"):
        model = load_delta(target, out)
    floats = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.bfloat16}, floats
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and w.base_weight.data_ptr() == base_up.data_ptr()  # no fp32 copy of the base
    with torch.no_grad():
        logits = model(ids()).logits
        reference = ft(ids()).logits
    assert logits.dtype == torch.bfloat16
    assert ((logits.float() - reference).norm() / reference.norm()).item() < 0.05


def test_mixed_dtypes_serve_like_load_delta(mixed):
    base, _, out = mixed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = load_delta(copy.deepcopy(base), out)
        served = MultiDeltaModel(copy.deepcopy(base))
        served.load_delta("ft", out)
    x = ids(batch=3)
    with torch.no_grad():
        mixed_rows = served(x, delta_ids=["ft", None, "ft"]).logits
        alone = single(x).logits
        plain = base(x).logits
    assert mixed_rows.dtype == torch.bfloat16
    torch.testing.assert_close(mixed_rows[[0, 2]], alone[[0, 2]], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mixed_rows[1], plain[1], rtol=2e-2, atol=2e-2)


def test_meta_base_is_refused(pair, artifact):
    base, _ = pair
    with torch.device("meta"):
        on_meta = tiny(tie_word_embeddings=True)
    for verify in ("none", "full"):
        with pytest.raises(BaseMismatchError, match="meta device"):
            load_delta(on_meta, artifact, verify=verify)
    assert all(p.device.type == "meta" for p in on_meta.parameters())


def test_to_empty_on_a_compressed_model(pair):
    _, ft = pair
    model = copy.deepcopy(ft)
    model.to_empty(device="cpu")
    w = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(w, MixedPrecisionDeltaTensor) and w.attributes == ft.model.layers[0].mlp.up_proj.weight.attributes
    model.load_state_dict(ft.state_dict())
    for name, buffer in ft.named_buffers():  # non-persistent (rotary) buffers are not in a state dict
        model.get_buffer(name).copy_(buffer)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, ft(ids()).logits)


# --- operations a compressed weight does not support ----------------------------------------------


def test_torchao_quantize_on_a_compressed_model_says_what_to_do(pair):
    from torchao import quantize_
    from torchao.quantization import Int8WeightOnlyConfig

    _, ft = pair
    with pytest.raises(NotImplementedError, match=r"does not support aten\.\w+.*quantize_base_") as info:
        quantize_(copy.deepcopy(ft), Int8WeightOnlyConfig())
    assert len(str(info.value)) < 1000


def test_state_dict_into_plain_or_other_bands_is_short(pair):
    base, ft = pair
    plain = copy.deepcopy(base)
    with pytest.raises(RuntimeError, match=r"copy_: cannot copy a compressed MixedPrecisionDeltaTensor .* into a plain") as info:
        plain.load_state_dict(ft.state_dict())
    assert "dequantize()" in str(info.value) and len(str(info.value)) < 20_000
    other = finetune(base, seed=7)
    compress_(other, DeltaCoMeConfig(base=base, group_size=32, alpha=1 / 4, progress=False))
    with pytest.raises(RuntimeError, match="same kind, shape and bands") as info:
        other.load_state_dict(ft.state_dict())
    assert len(str(info.value)) < 20_000
    same = copy.deepcopy(ft)
    same.load_state_dict(ft.state_dict())  # the same structure still copies


# --- the Hugging Face checkpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoint(pair, tmp_path_factory):
    from deltacome_ao.hf import save_pretrained

    _, ft = pair
    model = copy.deepcopy(ft)
    path = tmp_path_factory.mktemp("hf") / "model"
    save_pretrained(model, path)
    return model, path


def _copy_checkpoint(path, dest, edit_config=None, edit_tensors=None):
    dest.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    config = json.loads((dest / "config.json").read_text())
    if edit_config:
        edit_config(config["quantization_config"])
    (dest / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_hf_checkpoint_records_digests_and_guard(hf_checkpoint):
    model, path = hf_checkpoint
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    stored = load_file(path / "model.safetensors")
    inner = {k: v for k, v in stored.items() if ":" in k}
    assert qc["format_version"] == 2 and set(qc["digests"]) == set(inner)
    assert all(qc["digests"][k] == tensor_record(v)["sha256"] for k, v in inner.items())
    assert qc["guard"] == "model.layers.0.self_attn.q_proj.weight"
    assert stored[qc["guard"]].dtype == torch.uint8 and stored[qc["guard"]].dim() == 1


def test_hf_corrupted_inner_tensor_is_named(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltacome_ao.hf import verification

    _, path = hf_checkpoint
    key = "model.layers.1.mlp.gate_proj.weight:base_weight"

    def flip(tensors):
        raw(tensors[key])[5] ^= 0x01

    bad = _copy_checkpoint(path, tmp_path / "bad", edit_tensors=flip)
    with pytest.raises(DeltaFormatError, match=r"gate_proj\.weight:base_weight: the tensor does not match its recorded sha256"):
        AutoModelForCausalLM.from_pretrained(bad)
    with verification("none"):  # skipped explicitly
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight",
                                 "model.layers.0.input_layernorm.weight"])
def test_hf_corrupted_uncompressed_tensor_is_named(hf_checkpoint, tmp_path, key):
    """The tensors transformers loads itself (norms, embeddings) have digests too: a flipped byte in
    the stored file is a `DeltaFormatError` naming the tensor, not a silently different model."""
    from transformers import AutoModelForCausalLM

    from deltacome_ao.hf import verification

    _, path = hf_checkpoint
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    stored = load_file(path / "model.safetensors")
    assert key in qc["tensors"] and qc["tensors"][key] == tensor_record(stored[key])

    def flip(tensors):
        raw(tensors[key])[3] ^= 0x10

    bad = _copy_checkpoint(path, tmp_path / "bad", edit_tensors=flip)
    with pytest.raises(DeltaFormatError, match=re.escape(repr(key)) + ".* does not match its recorded sha256"):
        AutoModelForCausalLM.from_pretrained(bad)
    with verification("none"):  # skipped explicitly: loads the changed tensor
        loaded = AutoModelForCausalLM.from_pretrained(bad)
    assert not torch.equal(loaded.state_dict()[key], stored[key])


def test_hf_checkpoint_records_every_stored_tensor(hf_checkpoint, tmp_path):
    """Every stored tensor is covered: the compressed layers' inner tensors by `digests`, every other one
    (but the guard) by `tensors` (dtype, shape, sha256 of the stored bytes); the unmodified checkpoint
    loads bit-exactly. A changed dtype in the header, a missing or an extra tensor are errors."""
    from transformers import AutoModelForCausalLM

    model, path = hf_checkpoint
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    stored = load_file(path / "model.safetensors")
    assert set(qc["tensors"]) | set(qc["digests"]) | {qc["guard"]} == set(stored)
    assert not set(qc["tensors"]) & (set(qc["digests"]) | {qc["guard"]})
    loaded = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    for k, v in loaded.state_dict().items():
        if k in qc["tensors"]:
            assert torch.equal(v, stored[k]), k

    def retype(tensors):  # same bytes, another dtype of the same size
        tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int32)

    bad = _copy_checkpoint(path, tmp_path / "retyped", edit_tensors=retype)
    with pytest.raises(DeltaFormatError, match="'model.norm.weight' is int32"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy_checkpoint(path, tmp_path / "extra", edit_tensors=lambda t: t.__setitem__("extra.weight", torch.ones(2)))
    with pytest.raises(DeltaFormatError, match="extra.weight"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy_checkpoint(path, tmp_path / "missing", edit_tensors=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(DeltaFormatError, match="model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_hf_checkpoint_without_tensor_records_still_loads(hf_checkpoint, tmp_path):
    """A version 2 checkpoint written before `tensors` existed loads, with a warning that the
    uncompressed tensors are not checked."""
    from transformers import AutoModelForCausalLM

    model, path = hf_checkpoint
    old = _copy_checkpoint(path, tmp_path / "old", edit_config=lambda qc: qc.pop("tensors"))
    with pytest.warns(IntegrityWarning, match="uncompressed tensors"):
        loaded = AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("field, value, message", [
    ("modules", "x", "field 'modules' must be an object"),
    ("digests", {"a": "b"}, "field 'digests' must be an object"),
    ("digests", None, "field 'digests' must list every stored inner tensor"),
    ("guard", "lm_head.weight", "field 'guard'"),
    ("tensors", {"model.norm.weight": "x"}, r"field tensors\['model.norm.weight'\] must be an object"),
    ("tensors", [], "field 'tensors' must be an object"),
    ("format_version", "2", "field 'format_version' must be an integer"),
])
def test_hf_malformed_quantization_config(hf_checkpoint, tmp_path, field, value, message):
    from transformers import AutoModelForCausalLM

    _, path = hf_checkpoint
    bad = _copy_checkpoint(path, tmp_path / "bad", edit_config=lambda qc: qc.__setitem__(field, value))
    with pytest.raises(DeltaFormatError, match=message):
        AutoModelForCausalLM.from_pretrained(bad)


def test_hf_version_1_checkpoint_still_loads(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = hf_checkpoint
    guard = json.loads((path / "config.json").read_text())["quantization_config"]["guard"]

    def downgrade(qc):
        qc["format_version"] = 1
        del qc["digests"], qc["guard"]

    old = _copy_checkpoint(path, tmp_path / "v1", downgrade, lambda t: t.pop(guard))
    with pytest.warns(IntegrityWarning, match="no tensor digests"):
        loaded = AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_hf_checkpoint_without_deltacome_ao_fails_loudly(hf_checkpoint):
    """transformers alone skips the unknown quant_method: the guard tensor's size mismatch makes the
    load fail instead of leaving the compressed layers at random init."""
    import subprocess
    import sys

    _, path = hf_checkpoint
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "print('LOADED', 'deltacome_ao' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode != 0 and "LOADED" not in r.stdout, r.stdout + r.stderr[-2000:]
    assert "ignore_mismatched_sizes" in r.stderr and "q_proj.weight" in r.stderr


# --- configuration, validated up front ------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": "0.1"}, r"alpha must be in \(0, 1\] .* got '0\.1'"),
    ({"alpha": True}, r"alpha must be in \(0, 1\]"),
    ({"alpha": 10}, r"alpha must be in \(0, 1\]"),
    ({"group_size": 32.0}, r"group_size must be an integer >= 2"),
    ({"method": ["deltacome"]}, r"method must be a string"),
    ({"svd": ["exact"]}, r"unknown svd"),
    ({"method": "single", "single_bits": 2.0}, r"single_bits: unsupported bit-width 2\.0"),
    ({"bands": 3}, r"bands must be a sequence of \(bits, count\) pairs"),
    ({"bands": []}, r"bands: give at least one"),
    ({"bands": [(8.0, 2)]}, r"bands: unsupported bit-width 8\.0"),
    ({"bands": [(8, 2.5)]}, r"count of singular vectors must be an integer >= 1"),
    ({"recipe": "llama"}, r"recipe must be a deltacome_ao\.recipes\.Recipe or None, got str"),
    ({"progress": "no"}, r"progress must be True or False"),
    ({"act_order": 1}, r"act_order must be True or False"),
    ({"embeddings": "yes"}, r"embeddings must be True or False"),
    ({"allocation": "optimal", "candidates": 8}, r"candidates 8: a sequence of 0 \(dropped\) and widths"),
    ({"allocation": "optimal", "candidates": (0, 9)}, r"candidates \(0, 9\)"),
    ({"calibration": "some text"}, r"calibration must be None or an iterable of input_ids"),
    ({"calibration": []}, r"calibration= is empty"),
    ({"calibration": [torch.randn(2, 8)]}, r"calibration\[0\]: expected input_ids .* got a \(2, 8\) torch\.float32 tensor"),
    ({"calibration": [{"attention_mask": torch.ones(2, 8)}]}, r"calibration\[0\]: expected input_ids .* got NoneType"),
    ({"calibration": torch.arange(8)}, r"calibration: a tensor must be batch x seq integer input_ids"),
    ({"damp": -1}, r"damp must be a finite number >= 0"),
])
def test_config_types_and_ranges(pair, kwargs, match):
    base, _ = pair
    with pytest.raises(ValueError, match=match):
        DeltaCoMeConfig(base=base, **kwargs)
    with pytest.raises(ValueError, match=match):  # the same check without a base (the CLI's, before loading)
        DeltaCoMeConfig.check_options(**kwargs)


def test_check_options_accepts_defaults_and_refuses_unknown_names():
    DeltaCoMeConfig.check_options()
    DeltaCoMeConfig.check_options(alpha=1 / 32, method="bitdelta", group_size=64)
    with pytest.raises(TypeError, match="unknown DeltaCoMeConfig option"):
        DeltaCoMeConfig.check_options(alhpa=0.1)


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_dirs(pair, tmp_path_factory):
    """A tiny base and fine-tune as save_pretrained directories, and the fine-tune's artifact."""
    from click.testing import CliRunner

    from deltacome_ao.cli import main

    base, _ = pair
    root = tmp_path_factory.mktemp("cli")
    base.save_pretrained(root / "base")
    finetune(base).save_pretrained(root / "ft")
    result = CliRunner().invoke(main, ["compress", str(root / "base"), str(root / "ft"), str(root / "delta"),
                                       "--group-size", "32", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def cli(*args):
    from click.testing import CliRunner

    from deltacome_ao.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_error_line(result, code=1):
    """Exit status 1, no traceback, one `Error:` message (a wrong base lists its differences below
    it; a progress bar of loading the base may come before it)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _broken_copy(root, name, edit):
    import shutil

    dest = root / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "delta", dest)
    edit(dest)
    return dest


def test_cli_corrupt_truncated_or_incomplete_artifact(cli_dirs):
    root = cli_dirs
    ok = cli("inspect", root / "delta")
    assert ok.exit_code == 0 and "stored tensors match their sha256" in ok.output

    def flip(d):
        data = bytearray((d / WEIGHTS_NAME).read_bytes())
        data[-10] ^= 0xFF
        (d / WEIGHTS_NAME).write_bytes(bytes(data))

    line = _one_error_line(cli("inspect", _broken_copy(root, "flipped", flip)))
    assert "bad delta artifact" in line and "does not match its recorded sha256" in line

    def truncate(d):
        (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100])

    line = _one_error_line(cli("inspect", _broken_copy(root, "truncated", truncate)))
    assert "not a readable safetensors file" in line

    def no_fingerprint(d):
        rewrite(d, lambda doc: doc.pop("base_fingerprint"))

    bad = _broken_copy(root, "nofp", no_fingerprint)
    for command in (["merge", root / "base", bad, root / "merged-nofp"], ["eval", root / "base", bad, "--text-file",
                                                                          root / "base" / "config.json"]):
        result = cli(*command)
        line = _one_error_line(result)
        assert "field 'base_fingerprint' must be an object" in line and not (root / "merged-nofp").exists()
        assert "Loading weights" not in result.output  # the artifact is checked before the base is loaded


def test_cli_refuses_a_zero_delta(cli_dirs, tmp_path):
    root = cli_dirs
    same = cli("compress", root / "base", root / "base", tmp_path / "zero")
    assert same.exit_code == 2 and "same directory" in same.output and not (tmp_path / "zero").exists()
    import shutil

    shutil.copytree(root / "base", tmp_path / "copy")
    for extra in ([], ["--stream"]):
        line = _one_error_line(cli("compress", root / "base", tmp_path / "copy", tmp_path / "zero", "--quiet", *extra))
        assert "no delta to store" in line and not (tmp_path / "zero").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging directory left


def test_cli_options_are_checked_before_loading(cli_dirs, tmp_path, monkeypatch):
    import deltacome_ao.cli as cli_module

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cli_module, "_load", no_load)
    root = cli_dirs
    for option, value, message in [("--alpha", 0, r"alpha must be in \(0, 1\]"), ("--alpha", 10, "alpha must be in"),
                                   ("--group-size", 1, "group_size must be an integer >= 2")]:
        result = cli("compress", root / "base", root / "ft", tmp_path / "x", option, value)
        assert result.exit_code == 2 and f"Invalid value for {option}" in result.output, result.output
        assert re.search(message, result.output) and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_cli_merge_permissions_and_overwrite(cli_dirs, tmp_path):
    import os

    root = cli_dirs
    out = tmp_path / "merged"
    assert cli("merge", root / "base", root / "delta", out).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~umask for f in out.iterdir()}
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    # a failing merge (another base) leaves the old output as it was, even with --overwrite
    line = _one_error_line(cli("merge", root / "ft", root / "delta", out, "--overwrite"))
    assert "wrong base" in line
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert cli("merge", root / "base", root / "delta", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_cli_quiet_and_no_library_noise(cli_dirs, tmp_path):
    import subprocess
    import sys

    root = cli_dirs
    result = cli("compress", root / "base", root / "ft", tmp_path / "q", "--group-size", "32", "--quiet")
    assert result.exit_code == 0
    assert "Loading weights" not in result.output and "Writing" not in result.output and "%|" not in result.output
    assert result.output.strip().startswith("wrote")
    r = subprocess.run([sys.executable, "-m", "deltacome_ao.cli", "inspect", str(root / "delta")], capture_output=True,
                       text=True, timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "Failed to load" not in r.stderr and "Enum subclass" not in r.stderr and "deprecated" not in r.stderr, r.stderr


def test_corrupt_base_directory_is_a_clear_error(pair, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    f = tmp_path / "base" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        DeltaCoMeConfig(base=str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        save_delta(ft, tmp_path / "delta", base=str(tmp_path / "base"))
    assert not (tmp_path / "delta").exists()


def test_model_config_value_the_config_class_refuses_is_a_documented_error(pair, artifact):
    """A self-consistent artifact whose model_config holds a value transformers' strict config refuses
    (attention_dropout "") raises ConfigMismatchError naming the field, not huggingface_hub's
    StrictDataclassFieldValidationError; the base stays untouched."""
    from deltacome_ao.finetune_config import ConfigMismatchError

    base, _ = pair
    rewrite(artifact, lambda d: d["model_config"].__setitem__("attention_dropout", ""))
    for verify in ("full", "none"):
        target = copy.deepcopy(base)
        before = state(target)
        with pytest.raises(ConfigMismatchError, match=r"attention_dropout"):
            load_delta(target, artifact, verify=verify)
        assert_untouched(target, before)
