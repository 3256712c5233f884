"""Calibration without user data: `calibration="self"` / `"base"` / `SelfCalibration(...)`.

Measured on the zoo (docs/results.md, issue 15): llama-arith at alpha 1/32, global allocation +
GPTQ, 200 held-out problems: 83.0 % with 64 sequences sampled from the fine-tune vs 81.0 % with 128
training problems of the task.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deltacome_ao import DeltaCoMeConfig, DeltaTensor, compress_
from deltacome_ao.self_calibration import SelfCalibration, as_self_calibration, sample_sequences, self_calibration_samples
from tiny_models import ids, logits_error, structured_finetune, tiny

GROUP = 32


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_sampling_is_deterministic_for_a_seed_and_leaves_the_model_alone():
    model = tiny(bos_token_id=1, eos_token_id=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = SelfCalibration(samples=5, length=12, batch_size=2, seed=3)
    a, b = sample_sequences(model, spec), sample_sequences(model, spec)
    assert [t.shape for t in a] == [(2, 12), (2, 12), (1, 12)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(bool((t[:, 0] == 1).all()) for t in a)  # every sequence starts at BOS
    other = sample_sequences(model, SelfCalibration(samples=5, length=12, batch_size=2, seed=4))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # batching does not change what one sequence is... only the RNG stream order: same seed, same batches
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(x, y) for x, y in zip(a, sample_sequences(model, spec)))


def test_eos_starts_a_new_document_and_prompts_are_continued():
    model = tiny(bos_token_id=1, eos_token_id=2)
    with torch.no_grad():  # make EOS likely
        model.lm_head.bias = None
        model.lm_head.weight[2] += 5 * model.lm_head.weight.norm(dim=0) / model.lm_head.weight.shape[0] ** 0.5
    seqs = torch.cat(sample_sequences(model, SelfCalibration(samples=4, length=24, seed=0)))
    after_eos = seqs[:, 1:][seqs[:, :-1] == 2]
    assert after_eos.numel() and bool((after_eos == 1).all())
    prompts = ((1, 5, 6), (1, 7))
    seqs = torch.cat(sample_sequences(model, SelfCalibration(samples=4, length=8, prompts=prompts, seed=0)))
    assert seqs[0, :3].tolist() == [1, 5, 6] and seqs[1, :2].tolist() == [1, 7] and seqs[2, :3].tolist() == [1, 5, 6]


def test_base_source_samples_the_base_weights():
    base = tiny(bos_token_id=1, eos_token_id=2)
    ft = structured_finetune(base, scale=0.5)
    spec = SelfCalibration(samples=4, length=16, source="base", seed=0)
    from_base = self_calibration_samples(ft, spec, base.state_dict())
    direct = sample_sequences(base, SelfCalibration(samples=4, length=16, seed=0))
    assert all(torch.equal(x, y) for x, y in zip(from_base, direct))
    with pytest.raises(ValueError, match="needs the base weights"):
        self_calibration_samples(ft, spec, None)


def test_bad_input_is_refused():
    base = tiny()
    for kwargs, match in [
        (dict(samples=0), "samples must be an integer >= 1"),
        (dict(length=1), "length must be an integer >= 2"),
        (dict(source="user"), "source must be 'finetuned' or 'base'"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(prompts=[[1, 2, 3]], length=3), "prompts"),
    ]:
        with pytest.raises(ValueError, match=match):
            SelfCalibration(**kwargs)
    with pytest.raises(ValueError, match="or 'self' / 'base' .* got 'selfie'"):
        DeltaCoMeConfig(base=base, calibration="selfie")
    for method in ("bitdelta",):
        with pytest.raises(ValueError, match="calibration \\(GPTQ\\) applies to methods that quantize singular vectors"):
            DeltaCoMeConfig(base=base, method=method, calibration="self")
    assert as_self_calibration("base") == SelfCalibration(source="base")
    assert DeltaCoMeConfig(base=base, calibration="self").calibration == SelfCalibration()
    no_bos = tiny(bos_token_id=None, eos_token_id=None)
    with pytest.raises(ValueError, match="no bos_token_id"):
        sample_sequences(no_bos, SelfCalibration(samples=1, length=4))


def test_self_calibrated_compression_is_deterministic_and_uses_the_samples():
    base = tiny(anisotropic=True, bos_token_id=1, eos_token_id=2)
    ft = structured_finetune(base)
    spec = SelfCalibration(samples=8, length=24, seed=5)
    models = []
    for calibration in (spec, spec, sample_sequences(ft, spec)):
        model = copy.deepcopy(ft)
        compress_(model, DeltaCoMeConfig(base=base, alpha=1 / 16, group_size=GROUP, calibration=calibration,
                                         allocation="optimal", progress=False))
        models.append(model)
    x = ids(9, 4, length=24)
    with torch.no_grad():
        a, b, c = (m(x).logits for m in models)
    assert torch.equal(a, b)  # same seed, same model: bit-identical
    assert torch.equal(a, c)  # the same as passing the sampled sequences by hand
    assert logits_error(models[0], ft, x) < 0.05


def test_cli_self_calibration_and_global(tmp_path):
    from click.testing import CliRunner

    from deltacome_ao.cli import main

    base = tiny(bos_token_id=1, eos_token_id=2)
    ft = structured_finetune(base)
    base.save_pretrained(tmp_path / "b")
    ft.save_pretrained(tmp_path / "f")
    run = CliRunner().invoke(main, ["compress", str(tmp_path / "b"), str(tmp_path / "f"), str(tmp_path / "d"),
                                    "--allocation", "global", "--calib", "4", "--calib-len", "16",
                                    "--calib-source", "self", "--group-size", "32", "--global-cap", "2",
                                    "--target-correction", "-q"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    document = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert document["allocation"] == "global"
    assert document["calibration"] == {"samples": 4, "length": 16, "source": "self", "temperature": 1.0, "seed": 0,
                                       "prompts": None, "batch_size": 32}
    assert document["global_allocation"] == {"cap": 2.0, "sensitivity": "fisher"}
    for args, match in [
        (["--calib-source", "self"], "--calib-source self needs --calib N"),
        (["--global-cap", "2"], "apply only with --allocation global"),
        (["--allocation", "global", "--stream"], "--allocation global plans over the whole model"),
        (["--allocation", "global", "--global-sensitivity", "fisher"], "needs calibration"),
        (["--allocation", "global", "--global-cap", "0.5"], "global_cap must be a number >= 1"),
    ]:
        run = CliRunner().invoke(main, ["compress", str(tmp_path / "b"), str(tmp_path / "f"), str(tmp_path / "e"),
                                        *args, "-q"])
        assert run.exit_code == 2, (args, run.output)
        assert match in run.output, (args, run.output)


def test_a_length_beyond_the_models_positions_is_refused():
    # sampling past max_position_embeddings gives positions the model never saw (RoPE runs on, so nothing
    # fails): the calibration would silently come from garbage; refuse before sampling, model untouched
    base = tiny(bos_token_id=1, eos_token_id=2)  # max_position_embeddings=64
    ft = structured_finetune(base)
    model = copy.deepcopy(ft)
    with pytest.raises(ValueError, match=r"length=65 is longer than the model.s context \(max_position_embeddings=64\); use length <= 64"):
        sample_sequences(model, SelfCalibration(samples=1, length=65))
    config = DeltaCoMeConfig(base=base, calibration=SelfCalibration(samples=1, length=65), progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        compress_(model, config)
    assert not any(isinstance(p, DeltaTensor) for p in model.parameters())
    assert len(sample_sequences(model, SelfCalibration(samples=1, length=64))[0][0]) == 64


def test_self_calibration_is_public():
    # docs/budget.md: DeltaCoMeConfig(calibration=SelfCalibration(...)); importable as DeltaCoMeConfig is
    import deltacome_ao

    assert deltacome_ao.SelfCalibration is SelfCalibration and "SelfCalibration" in deltacome_ao.__all__
