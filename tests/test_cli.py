"""The `deltacome` command line (deltacome_ao/cli.py) on the shipped llama-arith pair."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from deltacome_ao import DeltaCoMeModel
from deltacome_ao.artifact import compressed_layers, read_delta_config
from deltacome_ao.cli import encode_text, main, text_windows

PAIR = Path(__file__).resolve().parents[1] / "assets" / "pairs" / "llama-arith"
BASE, FT = PAIR / "base", PAIR / "finetuned"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "delta"
    result = run("compress", BASE, FT, out, "--group-size", 128, "--alpha", 0.0625)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_compress_writes_artifact_and_summary(delta):
    out, stdout = delta
    doc = read_delta_config(out)
    assert doc["method"] == "deltacome" and doc["group_size"] == 128 and doc["alpha"] == pytest.approx(1 / 16)
    assert len(doc["layers"]) == 28
    assert "model.layers.0.mlp.down_proj" in stdout and "8b×2" in stdout
    assert f"{doc['bytes']['compressed']:,} bytes" in stdout
    assert "on disk" in stdout


def test_inspect_table_and_png(delta, tmp_path):
    out, _ = delta
    png = tmp_path / "alloc.png"
    result = run("inspect", out, "--png", png, "--base", BASE)
    assert result.exit_code == 0, result.output
    assert "model.layers.3.self_attn.k_proj" in result.stdout and "28 compressed layers" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    as_json = run("inspect", out, "--json")
    assert json.loads(as_json.stdout)["layers"] == read_delta_config(out)["layers"]


def test_eval_pair(delta):
    out, _ = delta
    result = run("eval", BASE, out, "--pair", "llama-arith", "--problems", 20)
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert {"base", "fine-tuned", "delta delta"} <= set(rows)
    kl = float(rows["delta delta"][5])
    assert 0 < kl < float(rows["base"][5])  # much closer to the fine-tune than the base is


def test_eval_text_file(delta, tmp_path):
    out, _ = delta
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    result = run("eval", BASE, out, "--text-file", text, "--finetuned", FT, "--seq-len", 64)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "| delta delta |" in result.stdout


def test_merge_matches_compressed_model(delta, tmp_path):
    out, _ = delta
    merged = tmp_path / "merged"
    result = run("merge", BASE, out, merged)
    assert result.exit_code == 0, result.output
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    dense = load(merged)
    assert not compressed_layers(dense)
    served = DeltaCoMeModel.from_pretrained(load(BASE), out)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(ids).logits, served(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    again = run("merge", BASE, out, merged)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert "dequantize:" in result.output  # the progress bar, which --quiet turns off (with transformers')
    quiet = run("merge", BASE, out, tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and "dequantize:" not in quiet.output and "Loading weights" not in quiet.output
    assert quiet.output.startswith("wrote ")


def test_errors_are_one_line_and_nonzero(delta, tmp_path):
    out, _ = delta
    missing = run("compress", tmp_path / "nope", FT, tmp_path / "x")
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
    wrong = run("eval", FT, out, "--pair", "llama-arith")
    assert wrong.exit_code == 1 and "wrong base" in wrong.output and "Traceback" not in wrong.output
    wrong = run("merge", FT, out, tmp_path / "m")
    assert wrong.exit_code == 1 and "made against another base" in wrong.output and not (tmp_path / "m").exists()
    exists = run("compress", BASE, FT, out)
    assert exists.exit_code == 1 and "exists" in exists.output
    empty = tmp_path / "empty"
    empty.mkdir()
    not_delta = run("inspect", empty)
    assert not_delta.exit_code == 1 and "not a delta artifact" in not_delta.output
    no_model = run("compress", empty, FT, tmp_path / "y")
    assert no_model.exit_code == 1 and "no model weights" in no_model.output
    calib_file_alone = run("compress", BASE, FT, tmp_path / "z", "--calib-file", BASE / "config.json")
    assert calib_file_alone.exit_code == 2 and "--calib N" in calib_file_alone.output
    bad_pair = run("eval", BASE, out, "--pair", "nope")
    assert bad_pair.exit_code == 2 and "unknown pair" in bad_pair.output


def test_calibration_text_is_byte_encoded_with_bos():
    config = load(BASE).config
    ids = encode_text("12+34=", BASE, config)
    assert ids == [config.bos_token_id] + list(b"12+34=")
    windows = text_windows(list(range(100)), 3, 10, seed=0)
    assert windows.shape == (3, 10) and all((row[1:] - row[:-1] == 1).all() for row in windows)


def test_compress_calibrated_from_text_file(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("".join(f"{a:02d}+{b:02d}={a + b:03d}"[::-1] + "\n" for a in range(20) for b in range(5)))
    out = tmp_path / "gptq"
    result = run("compress", BASE, FT, out, "--calib", 4, "--calib-file", text, "--calib-len", 32, "--quiet")
    assert result.exit_code == 0, result.output
    doc = read_delta_config(out)
    assert doc["calibrated"] is True and doc["user"]["calibration_windows"] == 4
    assert doc["user"]["calibration_source"] == str(text)
    assert "wrote" in result.stdout


def test_compress_calibrated_on_the_default_corpus(tmp_path):
    """--calib without --calib-file draws its windows from the zoo's corpus (Python source)."""
    out = tmp_path / "gptq-default"
    result = run("compress", BASE, FT, out, "--calib", 2, "--calib-len", 32, "--quiet")
    assert result.exit_code == 0, result.output
    doc = read_delta_config(out)
    assert doc["calibrated"] is True and doc["user"]["calibration_source"].startswith("zoo corpus")


def test_help_and_version():
    assert run("--version").stdout.strip() == "deltacome 0.2.0"
    for command in ("compress", "inspect", "eval", "merge"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout
