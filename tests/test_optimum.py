"""The optimum-quanto-style wrapper `DeltaCoMeModelForCausalLM` and the `optimum-cli deltacome` plugin."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltacome_ao import MixedPrecisionDeltaTensor
from deltacome_ao.optimum import REGISTER_COMMANDS, DeltaCoMeModelForCausalLM, quantize_base_

from tiny_models import ids, structured_finetune, tiny


@pytest.fixture(scope="module")
def pair():
    base = tiny()
    return base, structured_finetune(base)


@pytest.fixture(scope="module")
def qmodel(pair):
    base, ft = pair
    return DeltaCoMeModelForCausalLM.quantize(copy.deepcopy(ft), base=base, alpha=1 / 8, group_size=32, progress=False)


def test_quantize_wraps_and_forwards(pair, qmodel):
    base, ft = pair
    assert isinstance(qmodel.wrapped, torch.nn.Module)
    assert qmodel.config.model_type == "llama"  # attribute access reaches the model
    assert isinstance(qmodel.model.layers[0].mlp.up_proj.weight, MixedPrecisionDeltaTensor)
    assert qmodel.lm_head.weight is qmodel.wrapped.lm_head.weight
    x = ids()
    with torch.no_grad():
        a, b = qmodel(x).logits, qmodel.wrapped(x).logits
        assert torch.equal(a, b) and torch.equal(qmodel.forward(x).logits, b)
        err = ((b - ft(x).logits).norm() / ft(x).logits.norm()).item()
    assert err < 0.05
    assert "DeltaCoMeModelForCausalLM(" in repr(qmodel)


def test_quantize_needs_base_and_refuses_a_wrapper(pair, qmodel):
    with pytest.raises(ValueError, match="base="):
        DeltaCoMeModelForCausalLM.quantize(copy.deepcopy(pair[1]))
    with pytest.raises(ValueError, match="already"):
        DeltaCoMeModelForCausalLM.quantize(qmodel, base=pair[0])


def test_save_from_pretrained_identical_logits_and_generate(qmodel, tmp_path):
    qmodel.save_pretrained(tmp_path / "ckpt")
    loaded = DeltaCoMeModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, DeltaCoMeModelForCausalLM)
    assert isinstance(loaded.model.layers[1].self_attn.o_proj.weight, MixedPrecisionDeltaTensor)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, qmodel(x).logits)
    prompt = x[:1, :5]
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    out = loaded.generate(prompt, **kw)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, qmodel.generate(prompt, **kw))


def test_from_pretrained_refuses_plain_checkpoint(pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a deltacome checkpoint"):
        DeltaCoMeModelForCausalLM.from_pretrained(tmp_path / "plain")


def test_save_with_quantized_base_is_refused(pair, tmp_path):
    base, ft = pair
    q = DeltaCoMeModelForCausalLM.quantize(copy.deepcopy(ft), base=base, alpha=1 / 8, group_size=32, progress=False)
    quantize_base_(q.wrapped)
    with pytest.raises(NotImplementedError, match="torchao-quantized"):
        q.save_pretrained(tmp_path / "x")


def test_cli_command_delegates_to_deltacome(capsys):
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    root = RootOptimumCLICommand("optimum-cli")
    for command in REGISTER_COMMANDS:
        register_optimum_cli_subcommand(command, parent_command=root)
    args = root.parser.parse_args(["deltacome", "inspect", "--help"])
    with pytest.raises(SystemExit) as exit_:
        args.func(args).run()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Usage: optimum-cli deltacome inspect" in out


def test_optimum_cli_discovers_the_installed_plugin(tmp_path):
    """The package ships `optimum/commands/register/deltacome.py` (a namespace portion), so the
    installed `optimum-cli` has the `deltacome` command; run outside the repository."""
    cli = Path(sys.executable).parent / "optimum-cli"
    assert cli.exists(), "optimum-cli missing: install the dev extra (bash scripts/setup.sh)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(cli), "deltacome", "compress", "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Usage: optimum-cli deltacome compress" in run.stdout and "--alpha" in run.stdout
