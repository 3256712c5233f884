"""Streaming compression (`deltacome_ao.streaming.compress_streaming`): the artifact made tensor by
tensor from two checkpoints on disk equals `save_delta` after `quantize_` of the same pair.

Covers: byte-identical `delta.safetensors` and equal `delta_config.json` (apart from "user") on
sharded tiny Llama pairs (the 8/3/2 schedule, the optimal allocation, BitDelta, tied embeddings)
and on the shipped real pair; identical logits after `load_delta`; mismatched checkpoints refused
before anything is written (and, with strict=False, the same artifact as save_delta); the
`deltacome compress --stream` command.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchao import quantize_
from transformers import AutoModelForCausalLM

from deltacome_ao import DeltaCoMeConfig, DeltaCoMeModel, load_delta, save_delta
from deltacome_ao.artifact import CONFIG_NAME, WEIGHTS_NAME
from deltacome_ao.cli import main
from deltacome_ao.streaming import CheckpointMismatchError, checkpoint_files, compress_streaming
from tiny_models import finetune, ids, tiny

REAL_PAIR = Path(__file__).resolve().parents[1] / "assets" / "pairs" / "llama-arith"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def save_pair(root: Path, dtype=torch.bfloat16, seed: int = 0, **overrides) -> tuple[Path, Path]:
    base = tiny("llama", seed=seed, **overrides).to(dtype)
    ft = finetune(copy.deepcopy(base).float(), seed=seed + 1).to(dtype)
    if base.config.tie_word_embeddings:
        ft.tie_weights()
    base_dir, ft_dir = root / "base", root / "finetuned"
    base.save_pretrained(base_dir, max_shard_size="20KB")
    ft.save_pretrained(ft_dir, max_shard_size="20KB")
    return base_dir, ft_dir


def load(path: Path, dtype):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()


def reference_artifact(base_dir, ft_dir, out, dtype, **options):
    """`quantize_` + `save_delta` of the pair -> (the compressed model, the base model)."""
    base, model = load(base_dir, dtype), load(ft_dir, dtype)
    config = DeltaCoMeConfig(base=base, progress=False, **options)
    with torch.no_grad():
        quantize_(model, config)
    save_delta(model, out, base=base, config=config)
    return model, base


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data bytes): the header's JSON object order (of `__metadata__`) is not fixed by
    safetensors, everything else (keys, offsets, every tensor byte) is."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assert_same_artifact(a: Path, b: Path):
    header_a, data_a = split_safetensors(a / WEIGHTS_NAME)
    header_b, data_b = split_safetensors(b / WEIGHTS_NAME)
    assert header_a == header_b and list(header_a) == list(header_b)
    assert data_a == data_b
    ja, jb = (json.loads((p / CONFIG_NAME).read_text()) for p in (a, b))
    ja.pop("user"), jb.pop("user")
    ja.pop("document_sha256"), jb.pop("document_sha256")  # covers "user" too
    assert ja == jb
    assert list(ja["layers"]) == list(jb["layers"])  # module order too


CASES = {
    "deltacome": dict(alpha=1 / 16, group_size=32),
    "optimal": dict(alpha=1 / 8, group_size=32, allocation="optimal"),
    "bitdelta": dict(method="bitdelta"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_tiny_pair_matches_save_delta(tmp_path, case):
    base_dir, ft_dir = save_pair(tmp_path)
    assert len(checkpoint_files(ft_dir)) > 1  # really sharded (index file)
    model, base = reference_artifact(base_dir, ft_dir, tmp_path / "ref", torch.bfloat16, **CASES[case])
    summary = compress_streaming(base_dir, ft_dir, tmp_path / "stream", progress=False, **CASES[case])
    assert_same_artifact(tmp_path / "ref", tmp_path / "stream")
    assert summary["compressed"] == 14 and summary["kept"] > 0
    served = load_delta(base, tmp_path / "stream")
    with torch.no_grad():
        assert torch.equal(served(ids()).logits, model(ids()).logits)


def test_tied_embeddings(tmp_path):
    base_dir, ft_dir = save_pair(tmp_path, tie_word_embeddings=True)
    model, base = reference_artifact(base_dir, ft_dir, tmp_path / "ref", torch.bfloat16, group_size=32)
    compress_streaming(base_dir, ft_dir, tmp_path / "stream", group_size=32, progress=False)
    assert_same_artifact(tmp_path / "ref", tmp_path / "stream")
    document = json.loads((tmp_path / "stream" / CONFIG_NAME).read_text())
    assert document["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    served = load_delta(base, tmp_path / "stream")
    assert served.lm_head.weight is served.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(served(ids()).logits, model(ids()).logits)


def test_real_pair_matches_save_delta(tmp_path):
    base_dir, ft_dir = REAL_PAIR / "base", REAL_PAIR / "finetuned"
    model, base = reference_artifact(base_dir, ft_dir, tmp_path / "ref", torch.float32)
    summary = compress_streaming(base_dir, ft_dir, tmp_path / "stream", progress=False)
    assert_same_artifact(tmp_path / "ref", tmp_path / "stream")
    assert summary["compressed"] == 28
    served = DeltaCoMeModel.from_pretrained(str(base_dir), tmp_path / "stream")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(served(x).logits, model(x).logits)


def assert_nothing_written(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_mismatched_checkpoints_are_refused(tmp_path):
    base_dir, ft_dir = save_pair(tmp_path / "a")
    other_base, _ = save_pair(tmp_path / "b", intermediate_size=96)
    deeper_base, _ = save_pair(tmp_path / "c", num_hidden_layers=3)
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError, match=r"mlp\.gate_proj\.weight: fine-tuned shape \(128, 64\) but base shape \(96, 64\)"):
        compress_streaming(other_base, ft_dir, out, progress=False)
    assert_nothing_written(tmp_path, out)
    with pytest.raises(CheckpointMismatchError, match=r"only in the base: model\.layers\.2\."):
        compress_streaming(deeper_base, ft_dir, out, progress=False)
    assert_nothing_written(tmp_path, out)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        compress_streaming(tmp_path / "nope", ft_dir, out, progress=False)
    # a failure in the middle of the work (a NaN in one fine-tuned weight) leaves nothing either
    bad = tmp_path / "bad"
    model = load(ft_dir, torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(bad, max_shard_size="20KB")
    with pytest.raises(ValueError, match="NaN"):
        compress_streaming(base_dir, bad, out, group_size=32, progress=False)
    assert_nothing_written(tmp_path, out)
    # an existing output is not replaced without overwrite
    out.mkdir()
    with pytest.raises(FileExistsError):
        compress_streaming(base_dir, ft_dir, out, progress=False)


def test_not_strict_matches_save_delta(tmp_path):
    """strict=False: names only in the base are fingerprinted, as save_delta does with that base."""
    _, ft_dir = save_pair(tmp_path / "a")
    deeper_base, _ = save_pair(tmp_path / "c", num_hidden_layers=3)
    reference_artifact(deeper_base, ft_dir, tmp_path / "ref", torch.bfloat16, group_size=32)
    compress_streaming(deeper_base, ft_dir, tmp_path / "stream", group_size=32, strict=False, progress=False)
    assert_same_artifact(tmp_path / "ref", tmp_path / "stream")
    fingerprint = json.loads((tmp_path / "stream" / CONFIG_NAME).read_text())["base_fingerprint"]["tensors"]
    assert "model.layers.2.mlp.up_proj.weight" in fingerprint


def test_cli_compress_stream(tmp_path):
    base_dir, ft_dir = save_pair(tmp_path)
    reference_artifact(base_dir, ft_dir, tmp_path / "ref", torch.bfloat16, group_size=32)
    result = CliRunner().invoke(main, ["compress", str(base_dir), str(ft_dir), str(tmp_path / "stream"),
                                       "--stream", "--group-size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert_same_artifact(tmp_path / "ref", tmp_path / "stream")
    result = CliRunner().invoke(main, ["compress", str(base_dir), str(ft_dir), str(tmp_path / "x"), "--stream",
                                       "--calib", "4"])
    assert result.exit_code == 2 and "--stream" in result.output


def test_device_option(tmp_path):
    """device= / --device: on the CPU the same artifact bytes as without it; "meta" refused before any work;
    on CUDA (when there is one) the artifact loads and its logits match the CPU one's to rounding."""
    base_dir, ft_dir = save_pair(tmp_path)
    compress_streaming(base_dir, ft_dir, tmp_path / "plain", group_size=32, progress=False)
    compress_streaming(base_dir, ft_dir, tmp_path / "cpu", group_size=32, progress=False, device="cpu")
    assert_same_artifact(tmp_path / "plain", tmp_path / "cpu")
    with pytest.raises(ValueError, match="device='meta'"):
        compress_streaming(base_dir, ft_dir, tmp_path / "meta", group_size=32, progress=False, device="meta")
    assert not (tmp_path / "meta").exists()
    for flags, name in ((["--stream"], "cli-stream"), ([], "cli")):
        result = CliRunner().invoke(main, ["compress", str(base_dir), str(ft_dir), str(tmp_path / name), *flags,
                                           "--group-size", "32", "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        assert_same_artifact(tmp_path / "plain", tmp_path / name)
    result = CliRunner().invoke(main, ["compress", str(base_dir), str(ft_dir), str(tmp_path / "m"), "--stream",
                                       "--device", "meta", "--quiet"])
    assert result.exit_code != 0 and "device='meta'" in result.output
    if torch.cuda.is_available():
        compress_streaming(base_dir, ft_dir, tmp_path / "cuda", group_size=32, progress=False, device="cuda")
        base = load(base_dir, torch.float32)
        x = ids(seed=4)
        with torch.no_grad():
            want = load_delta(copy.deepcopy(base), tmp_path / "plain")(x).logits
            got = load_delta(copy.deepcopy(base), tmp_path / "cuda")(x).logits
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
