import io

import pytest
import torch
import torch.nn.functional as F

from deltacome_ao import BitDeltaTensor, MixedPrecisionDeltaTensor


def _pair(m=150, n=200, rank=12, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g) * 0.05
    delta = scale * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / rank
    delta += scale * 0.05 * torch.randn(m, n, generator=g)
    return base, base + delta


@pytest.fixture(scope="module")
def tensor():
    base, ft = _pair()
    return MixedPrecisionDeltaTensor.from_hp(ft, base, alpha=1 / 8, group_size=32)


def test_dequantize_is_base_plus_low_rank_delta(tensor):
    base, ft = _pair()
    u, s, v = tensor.delta_factors()
    assert torch.allclose(tensor.dequantize(), base + (u * s) @ v, atol=1e-6)
    # it approximates the fine-tuned weight: the tail beyond rank 12 alone is 16 % of this delta,
    # 3-bit vectors add the rest (measured 0.24)
    err = (tensor.dequantize() - ft).norm() / (ft - base).norm()
    assert err < 0.3


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 200), (2, 3, 200), (200,)])
def test_linear_matches_dequantized_reference_fp32(tensor, bias, shape):
    x = torch.randn(*shape)
    b = torch.randn(150) if bias else None
    ref = F.linear(x, tensor.dequantize(), b)
    out = F.linear(x, tensor, b)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_linear_low_precision_activations(dtype, tol):
    base, ft = _pair()
    t = MixedPrecisionDeltaTensor.from_hp(ft, base.to(dtype), alpha=1 / 8, group_size=32)
    x = torch.randn(5, 200)
    out = F.linear(x.to(dtype), t)
    assert out.dtype == dtype
    ref = F.linear(x, t.dequantize(torch.float32))
    assert (out.float() - ref).norm() / ref.norm() < tol


def test_compiled_equals_eager(tensor):
    x = torch.randn(4, 200)
    lin = torch.nn.Linear(200, 150, bias=True)
    lin.weight = torch.nn.Parameter(tensor, requires_grad=False)
    eager = lin(x)
    compiled = torch.compile(lin, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_weights_only(tensor):
    lin = torch.nn.Linear(200, 150, bias=False)
    lin.weight = torch.nn.Parameter(tensor, requires_grad=False)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    w = loaded["weight"]
    assert isinstance(w, MixedPrecisionDeltaTensor)
    assert w.bits == tensor.bits and w.counts == tensor.counts
    for name in tensor.tensor_data_names:
        assert torch.equal(getattr(w, name), getattr(tensor, name))
    x = torch.randn(3, 200)
    assert torch.equal(F.linear(x, w), F.linear(x, tensor))


def test_gradients_reach_the_input_and_weight_stays_frozen(tensor):
    x = torch.randn(4, 200, requires_grad=True)
    lin = torch.nn.Linear(200, 150, bias=True)
    lin.weight = torch.nn.Parameter(tensor, requires_grad=False)
    lin(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, tensor.dequantize(), lin.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert lin.weight.grad is None and lin.bias.grad is not None


def test_transpose_swaps_factors(tensor):
    t = tensor.t()
    assert t.shape == (200, 150)
    assert torch.allclose(t.dequantize(), tensor.dequantize().t(), atol=1e-6)


def test_dtype_cast_converts_only_the_base(tensor):
    h = tensor.to(torch.bfloat16)
    assert isinstance(h, MixedPrecisionDeltaTensor) and h.dtype == torch.bfloat16
    assert h.base_weight.dtype == torch.bfloat16 and h.v_packed.dtype == torch.uint8 and h.s.dtype == torch.float32


def test_tiny_delta_keeps_its_relative_accuracy():
    """Scales are per normalised singular vector, so a 1e-4x smaller delta loses nothing extra."""
    base, ft = _pair(scale=0.02)
    errs = []
    for factor in (1.0, 1e-4):
        ft_s = base + (ft - base) * factor
        t = MixedPrecisionDeltaTensor.from_hp(ft_s, base, alpha=1 / 8, group_size=32)
        errs.append(((t.dequantize() - ft_s).norm() / (ft_s - base).norm()).item())
    assert errs[1] == pytest.approx(errs[0], rel=0.05)


def test_zero_delta_gives_an_empty_delta_and_the_base():
    base = torch.randn(40, 30)
    t = MixedPrecisionDeltaTensor.from_hp(base.clone(), base, group_size=16)
    assert t.rank == 0 and t.delta_nbytes() == 0
    x = torch.randn(2, 30)
    assert torch.allclose(F.linear(x, t), F.linear(x, base))


def test_bitdelta_is_sign_times_mean_abs():
    base, ft = _pair()
    t = BitDeltaTensor.from_hp(ft, base)
    d = ft - base
    assert torch.allclose(t.dequantize(), base + d.abs().mean() * torch.sign(d), atol=1e-6)
    x = torch.randn(3, 200)
    assert torch.allclose(F.linear(x, t), F.linear(x, t.dequantize()), rtol=1e-5, atol=1e-5)
    assert t.bits_per_param() == pytest.approx(1.0, abs=0.01)


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", [MixedPrecisionDeltaTensor, BitDeltaTensor])
def test_from_hp_copies_the_base_unless_handed_over(kind):
    """By default the compressed weight shares no memory with the caller's tensors (changing the caller's
    base later does not change it); `copy_base=False` (a caller that made the base for this call) keeps
    the base itself. The packed factors are the same either way."""
    base, ft = _pair()
    kw = dict(alpha=1 / 8, group_size=32) if kind is MixedPrecisionDeltaTensor else {}
    copied = kind.from_hp(ft, base, **kw)
    assert not _shares(copied.base_weight, base) and not _shares(copied.base_weight, ft)
    assert torch.equal(copied.base_weight, base) and copied.base_weight.is_contiguous()
    held = kind.from_hp(ft, base, copy_base=False, **kw)
    assert held.base_weight is base or _shares(held.base_weight, base)
    for n in copied.tensor_data_names:
        assert torch.equal(getattr(copied, n), getattr(held, n)), n
    snapshot = copied.dequantize()
    base.add_(1.0)  # the caller changes its tensor: the copied weight does not move
    assert torch.equal(copied.dequantize(), snapshot)
    # a non-contiguous base: one contiguous copy (held: made contiguous, so a copy as well)
    t = kind.from_hp(ft.t(), base.t(), **kw)
    assert t.base_weight.is_contiguous() and torch.equal(t.base_weight, base.t())
    assert kind.from_hp(ft.t(), base.t(), copy_base=False, **kw).base_weight.is_contiguous()


def test_config_compress_copies_unless_handed_over():
    from deltacome_ao import DeltaCoMeConfig
    from deltacome_ao.methods import base_handed_over, handing_over_base

    base, ft = _pair()
    for method in ("deltacome", "bitdelta"):
        config = DeltaCoMeConfig(base={"w": base}, method=method, alpha=1 / 8, group_size=32, progress=False)
        handed = handing_over_base(config)
        assert base_handed_over(handed) and not base_handed_over(config)  # config itself unchanged
        assert handed.alpha == config.alpha and handed.method == config.method
        w, w_handed = config.compress(ft, base, "w"), handed.compress(ft, base, "w")
        assert not _shares(w.base_weight, base) and _shares(w_handed.base_weight, base)
        for n in w.tensor_data_names:
            assert torch.equal(getattr(w, n), getattr(w_handed, n)), (method, n)
