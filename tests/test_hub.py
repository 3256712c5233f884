"""Artifact metadata and the Hub: which base a delta names, its model card, and Hub repo ids.

Covers: `base_model_name_or_path` / `base_revision` in delta_config.json (from the base directory, a
Hub cache snapshot path, the config of a model loaded from the Hub, or explicit; null when unknown;
the same from streaming compression), the README.md model card (YAML front matter the Hub and
`huggingface_hub.ModelCard` read, the measured sizes), `DeltaCoMeModel.from_pretrained(None, delta)`
loading the recorded base, and Hub ids resolved through `huggingface_hub.snapshot_download` —
mocked (arguments checked) and for real against a local Hub cache in offline mode. No network.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, DeltaCoMeModel, MultiDeltaModel, load_delta, save_delta
from deltacome_ao.hub import base_reference, looks_like_repo_id, resolve_delta_dir, snapshot_reference
from deltacome_ao.streaming import compress_streaming
from tiny_models import finetune, ids, tiny

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def pair():
    base = tiny()
    ft = finetune(base)
    quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    return base, ft


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_repo_ids_and_snapshot_paths():
    assert looks_like_repo_id("org/name") and looks_like_repo_id("meta-llama/Llama-2-7b-hf")
    for bad in ("name", "a/b/c", "/abs/path", "./x", "org/na--me", "org/name.", "", None, "org/"):
        assert not looks_like_repo_id(bad), bad
    path = f"/cache/hub/models--meta-llama--Llama-2-7b-hf/snapshots/{SHA}"
    assert snapshot_reference(path) == ("meta-llama/Llama-2-7b-hf", SHA)
    assert base_reference(path) == ("meta-llama/Llama-2-7b-hf", SHA)
    assert base_reference(path, name="other/base") == ("other/base", None)
    assert base_reference("/some/dir", revision="v1") == ("/some/dir", "v1")
    assert base_reference({"w": torch.zeros(1)}) == (None, None)


def test_base_recorded_and_model_card(pair, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    out = save_delta(ft, tmp_path / "d1", base=loaded, config=DeltaCoMeConfig(base=loaded, group_size=32))
    doc = json.loads((out / "delta_config.json").read_text())
    assert doc["base_model_name_or_path"] == str(tmp_path / "base") and doc["base_revision"] is None
    meta = front_matter(out / "README.md")
    assert "base_model" not in meta  # a local path is no Hub id: named in the text only
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "deltacome_ao"
    assert "deltacome" in meta["tags"] and "method:deltacome" in meta["tags"]
    card = (out / "README.md").read_text()
    assert str(tmp_path / "base") in card and "| alpha | 0.0625" in card
    assert f"{(out / 'delta.safetensors').stat().st_size:,} B" in card  # the measured file size
    assert f"{doc['bytes']['compressed']:,} B" in card

    out = save_delta(ft, tmp_path / "d2", base=base, base_model_name_or_path="org/base-7b", base_revision=SHA)
    doc = json.loads((out / "delta_config.json").read_text())
    assert (doc["base_model_name_or_path"], doc["base_revision"]) == ("org/base-7b", SHA)
    meta = front_matter(out / "README.md")
    assert meta["base_model"] == "org/base-7b"
    # saved without config=: what quantize_ recorded on the model is written (method, alpha, group size)
    assert "method:deltacome" in meta["tags"] and "| method | `deltacome` |" in (out / "README.md").read_text()
    assert (doc["method"], doc["alpha"], doc["group_size"]) == ("deltacome", 1 / 16, 32)
    # nothing recorded anywhere: the card says so and names the layers' tensor kind
    unknown = copy.deepcopy(ft)
    del unknown.__dict__["_deltacome_fields"]
    plain = save_delta(unknown, tmp_path / "d5", base=base)
    assert json.loads((plain / "delta_config.json").read_text())["method"] is None
    assert "| method | not recorded (pass `config=` to `save_delta`); layer kinds: MixedPrecisionDeltaTensor |" \
        in (plain / "README.md").read_text()
    card = huggingface_hub.ModelCard.load(out / "README.md")  # what the Hub parses
    assert card.data.base_model == "org/base-7b" and card.data.library_name == "deltacome_ao"
    # a model loaded from the Hub knows its id and commit
    loaded.config._name_or_path, loaded.config._commit_hash = "org/from-hub", SHA
    doc = json.loads((save_delta(ft, tmp_path / "d3", base=loaded) / "delta_config.json").read_text())
    assert (doc["base_model_name_or_path"], doc["base_revision"]) == ("org/from-hub", SHA)
    # no base, no name: null; no card when asked
    out = save_delta(ft, tmp_path / "d4", model_card=False)
    assert json.loads((out / "delta_config.json").read_text())["base_model_name_or_path"] is None
    assert not (out / "README.md").exists()
    # artifacts of before (no such fields) still load
    from deltacome_ao.format import DOCUMENT_DIGEST, document_digest

    doc = json.loads((tmp_path / "d2" / "delta_config.json").read_text())
    del doc["base_model_name_or_path"], doc["base_revision"], doc[DOCUMENT_DIGEST]
    doc[DOCUMENT_DIGEST] = document_digest(doc)  # as a writer without those fields would have sealed it
    (tmp_path / "d2" / "delta_config.json").write_text(json.dumps(doc))
    assert torch.equal(logits(load_delta(copy.deepcopy(base), tmp_path / "d2")), logits(ft))


def test_streaming_records_the_snapshot_base(tmp_path):
    base = tiny()
    ft = finetune(base)
    snapshot = tmp_path / "hub" / "models--org--base" / "snapshots" / SHA
    base.save_pretrained(snapshot)
    ft.save_pretrained(tmp_path / "ft")
    compress_streaming(snapshot, tmp_path / "ft", tmp_path / "d", group_size=32, progress=False)
    doc = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert (doc["base_model_name_or_path"], doc["base_revision"]) == ("org/base", SHA)
    assert front_matter(tmp_path / "d" / "README.md")["base_model"] == "org/base"


def test_from_pretrained_without_base_loads_the_recorded_one(pair, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    out = save_delta(ft, tmp_path / "d", base=str(tmp_path / "base"))
    model = DeltaCoMeModel.from_pretrained(None, out)
    assert torch.equal(logits(model), logits(ft))
    with pytest.raises(ValueError, match="records no base"):
        DeltaCoMeModel.from_pretrained(None, save_delta(ft, tmp_path / "nobase"))


def test_hub_id_through_a_mocked_snapshot_download(pair, tmp_path, monkeypatch):
    base, ft = pair
    out = save_delta(ft, tmp_path / "d", base=base)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = DeltaCoMeModel.from_pretrained(copy.deepcopy(base), "org/math-delta", revision="v2")
    assert torch.equal(logits(model), logits(ft))
    repo, kwargs = calls[-1]
    assert repo == "org/math-delta" and kwargs["revision"] == "v2"
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "delta.safetensors", "delta_config.json"]
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("math", "org/math-delta")
    assert calls[-1][0] == "org/math-delta" and calls[-1][1]["revision"] is None
    with torch.no_grad():
        torch.testing.assert_close(served(ids(), delta_ids=["math", "math"]).logits, logits(ft), rtol=1e-5, atol=1e-5)
    # a local directory is never looked up, whatever it is called
    load_delta(copy.deepcopy(base), out)
    assert len(calls) == 2


def test_hub_id_from_a_local_cache_offline(pair, tmp_path, monkeypatch):
    base, ft = pair
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--math-delta" / "snapshots" / SHA
    save_delta(ft, tmp_path / "d", base=base)
    shutil.copytree(tmp_path / "d", snapshot)
    (cache / "models--org--math-delta" / "refs").mkdir()
    (cache / "models--org--math-delta" / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_delta_dir("org/math-delta") == snapshot
    assert resolve_delta_dir("org/math-delta", revision=SHA) == snapshot
    assert torch.equal(logits(load_delta(copy.deepcopy(base), "org/math-delta")), logits(ft))
    with pytest.raises(FileNotFoundError, match="offline"):
        load_delta(copy.deepcopy(base), "org/other-delta")
    with pytest.raises(FileNotFoundError, match="not a delta artifact"):
        load_delta(copy.deepcopy(base), tmp_path / "missing")  # a path: no Hub lookup
