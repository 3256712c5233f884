"""Files written by deltacome_ao 0.1 (before the redesign) load with today's code, bit-exactly.

`tests/fixtures/v0.1/` was written by commit 5bc4c20 (the last 0.1 layout): a Delta-CoMe delta
artifact of a tiny Llama fine-tune, and a BitDelta model saved through the HF path, with the logits
the 0.1 code computed. Today's readers must give the same logits, bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import deltacome_ao.hf  # noqa: F401  (registers quant_method "deltacome")
from deltacome_ao import BitDeltaTensor, MixedPrecisionDeltaTensor, load_delta
from deltacome_ao.kernels import cpu as cpu_kernel
from tiny_models import LAYER_NAMES, ids, tiny

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1"


def test_v01_delta_artifact_loads_bit_exactly():
    """Bit for bit on the reference path (the 0.1 arithmetic); the CPU kernel computes the same terms
    with another order of fp32 additions, so it matches to fp32 rounding."""
    expected = load_file(FIXTURES / "expected.safetensors")["delta_logits"]
    model = load_delta(copy.deepcopy(tiny("llama", seed=0)), FIXTURES / "delta")
    assert all(type(model.get_submodule(n).weight) is MixedPrecisionDeltaTensor for n in LAYER_NAMES)
    previous = cpu_kernel.set_enabled(False)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids(seed=2)).logits, expected)
    finally:
        cpu_kernel.set_enabled(previous)
    with torch.no_grad():
        torch.testing.assert_close(model(ids(seed=2)).logits, expected, rtol=1e-5, atol=1e-5)


def test_v01_hf_checkpoint_loads_bit_exactly():
    expected = load_file(FIXTURES / "expected.safetensors")["hf_bitdelta_logits"]
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "hf_bitdelta")
    assert all(type(model.get_submodule(n).weight) is BitDeltaTensor for n in LAYER_NAMES)
    with torch.no_grad():
        assert torch.equal(model(ids(seed=2)).logits, expected)
