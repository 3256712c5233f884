"""A torchao int8 weight-only base under Delta-CoMe deltas (`with_base`, `quantize_base_`)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchao import quantize_
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor
from deltacome_ao.optimum import has_quantized_base, quantize_base_

from tiny_models import ids, structured_finetune, tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compressed_base  # noqa: E402


def _int8(w: torch.Tensor) -> torch.Tensor:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    quantize_(lin, Int8WeightOnlyConfig())
    return lin.weight.detach()


def test_linear_matches_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 160, generator=g)
    ft = base + 0.05 * torch.randn(96, 4, generator=g) @ torch.randn(4, 160, generator=g)
    w = MixedPrecisionDeltaTensor.from_hp(ft, base, alpha=1 / 4, group_size=32)
    q = _int8(base)
    w8 = w.with_base(q)
    assert isinstance(w8.base_weight, Int8Tensor) and w8.shape == w.shape and w8.dtype == w.dtype
    x, bias = torch.randn(2, 5, 160, generator=g), torch.randn(96, generator=g)
    u, s, v = w.delta_factors()
    reference = F.linear(x, q.dequantize(), bias) + x @ ((u * s) @ v).T
    torch.testing.assert_close(F.linear(x, w8, bias), reference, rtol=1e-4, atol=1e-4)
    # the delta is unchanged: the int8 output differs from the fp32-base one by the base error only
    torch.testing.assert_close(F.linear(x, w8) - F.linear(x, w), F.linear(x, q.dequantize() - base), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w8.dequantize(), q.dequantize() + (u * s) @ v, rtol=1e-5, atol=1e-5)


def test_with_base_checks_shape():
    base = torch.randn(32, 64)
    w = MixedPrecisionDeltaTensor.from_hp(base + 0.01 * torch.randn(32, 64), base, alpha=1 / 2, group_size=32)
    with pytest.raises(ValueError, match="does not match"):
        w.with_base(torch.randn(64, 32))


@pytest.fixture(scope="module")
def tiny_pair():
    base = tiny()
    ft = structured_finetune(base)
    model = copy.deepcopy(ft)
    quantize_(model, DeltaCoMeConfig(base=base, alpha=1 / 8, group_size=32, progress=False))
    return base, ft, model


def test_quantize_base_and_compile(tiny_pair):
    base, ft, model = tiny_pair
    model8 = quantize_base_(copy.deepcopy(model))
    assert has_quantized_base(model8) and not has_quantized_base(model)
    for name, m in model8.named_modules():
        if isinstance(getattr(m, "weight", None), MixedPrecisionDeltaTensor):
            assert isinstance(m.weight.base_weight, Int8Tensor), name
    x = ids()
    with torch.no_grad():
        eager = model8(x).logits
        compiled = torch.compile(model8, fullgraph=True)(x).logits
        ref = ft(x).logits
        fp32 = model(x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    err8, err = ((eager - ref).norm() / ref.norm()).item(), ((fp32 - ref).norm() / ref.norm()).item()
    assert err8 < err + 0.01


def test_quantize_base_errors(tiny_pair):
    base, ft, model = tiny_pair
    with pytest.raises(ValueError, match="no compressed layer"):
        quantize_base_(copy.deepcopy(ft))
    model8 = quantize_base_(copy.deepcopy(model))
    with pytest.raises(ValueError, match="already"):
        quantize_base_(model8)


def test_real_pair_quality_stays_close():
    rows = {r["model"]: r for r in compressed_base.measure("llama-arith", n_problems=200)}
    fp, q8 = rows["fp32 base + delta"], rows["int8 base + delta"]
    # measured (docs/optimum.md): fp32 base + delta 90.0 % / KL 0.0313, int8 base + delta 91.0 % / KL 0.0297
    assert q8["accuracy"] >= fp["accuracy"] - 0.04
    assert q8["kl"] <= 1.25 * fp["kl"] + 0.005
    assert q8["accuracy"] >= 0.85 and q8["kl"] < 0.05
    assert rows["int8 base alone"]["accuracy"] < 0.1  # the delta carries the task
    assert rows["int8 fine-tuned"]["kl"] < 0.005
    assert q8["projection_bytes"] < 0.3 * fp["projection_bytes"]
