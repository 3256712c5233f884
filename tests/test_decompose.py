import pytest
import torch

from deltacome_ao.decompose import delta_svd, weight_delta


def _low_rank_plus_noise(m, n, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, rank)
    a = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    b = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    return (a * spectrum) @ b.T + noise * torch.randn(m, n, generator=g)


def test_exact_svd_reconstructs():
    d = _low_rank_plus_noise(120, 90, 20, 1e-3)
    out = delta_svd(d, method="exact")
    rec = (out.U * out.S) @ out.Vh
    assert (rec - d).norm() / d.norm() < 1e-5
    assert torch.all(out.S[:-1] >= out.S[1:])


@pytest.mark.parametrize("shape", [(512, 384), (300, 700)])
def test_randomized_matches_exact_on_top_subspace(shape):
    d = _low_rank_plus_noise(*shape, rank=64, noise=1e-4, seed=1)
    k = 24
    exact = delta_svd(d, rank=k, method="exact")
    fast = delta_svd(d, rank=k, method="randomized")
    assert torch.allclose(fast.S, exact.S, rtol=1e-3)
    err_exact = (d - (exact.U * exact.S) @ exact.Vh).norm()
    err_fast = (d - (fast.U * fast.S) @ fast.Vh).norm()
    assert err_fast <= err_exact * 1.001
    # auto (exact at this size: min(m, n) < 1024) is deterministic
    a1, a2 = delta_svd(d, rank=k), delta_svd(d, rank=k)
    assert torch.equal(a1.S, a2.S)


def test_rank_deficient_and_zero_deltas():
    d = _low_rank_plus_noise(64, 48, 5, 0.0)
    out = delta_svd(d, rank=40, method="exact")
    assert out.rank == 5
    zero = delta_svd(torch.zeros(10, 7), rank=3)
    assert zero.rank == 0 and zero.U.shape == (10, 0) and zero.Vh.shape == (0, 7)


def test_tiny_delta_is_not_lost_to_rounding():
    """A 1e-5 delta on 0.02-scale weights survives the fp32 subtraction and the SVD."""
    base = 0.02 * torch.randn(64, 64)
    d = 1e-5 * _low_rank_plus_noise(64, 64, 4, 0.0)
    out = delta_svd(weight_delta(base + d, base), rank=4, method="exact")
    assert out.rank == 4
    assert ((out.U * out.S) @ out.Vh - d).norm() / d.norm() < 1e-2


def test_weight_delta_errors_name_the_layer():
    with pytest.raises(ValueError, match="layers.3.q_proj.*shape"):
        weight_delta(torch.zeros(4, 4), torch.zeros(4, 5), "layers.3.q_proj")
    bad = torch.zeros(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="layers.0.up_proj.*NaN"):
        weight_delta(bad, torch.zeros(4, 4), "layers.0.up_proj")


@pytest.mark.parametrize("ft_dtype,base_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64),
])
def test_weight_delta_is_the_fp32_difference_bit_for_bit(ft_dtype, base_dtype):
    """One fp32 result without full-size temporaries (an fp32 fine-tuned tensor is not cast, the base is
    converted inside the subtraction), equal to `ft.float() - base.float()`; the inputs are untouched."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(37, 53, generator=g)).to(base_dtype)
    ft = (base.double() + 1e-4 * torch.randn(37, 53, generator=g, dtype=torch.float64)).to(ft_dtype)
    before = ft.clone(), base.clone()
    delta = weight_delta(ft, base)
    assert delta.dtype == torch.float32
    assert torch.equal(delta.view(torch.int32), (ft.float() - base.float()).view(torch.int32))
    assert torch.equal(ft, before[0]) and torch.equal(base, before[1])
    assert delta.untyped_storage().data_ptr() not in (ft.untyped_storage().data_ptr(), base.untyped_storage().data_ptr())
    # transposed views: the same values as from the contiguous tensors
    assert torch.equal(weight_delta(ft.t(), base.t()), (ft.float() - base.float()).t())


@pytest.mark.parametrize("where", ["fine-tuned", "base"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_weight_delta_names_the_weight_with_nan_or_inf(where, value):
    ft, base = torch.zeros(4, 6), torch.zeros(4, 6)
    (ft if where == "fine-tuned" else base)[2, 3] = value
    with pytest.raises(ValueError, match=f"q_proj: the {where} weight contains NaN or Inf"):
        weight_delta(ft, base, "q_proj")
    # both infinite: the fine-tuned one is named first, as before
    with pytest.raises(ValueError, match="the fine-tuned weight"):
        weight_delta(torch.full((2, 2), float("inf")), torch.full((2, 2), float("inf")))
    # finite weights whose difference overflows fp32 are refused too (they gave an SVD error or, in fp64,
    # a silently empty delta)
    big = torch.full((2, 2), 3e38)
    with pytest.raises(ValueError, match="q_proj: fine-tuned - base overflows fp32"):
        weight_delta(big, -big, "q_proj")
    with pytest.raises(ValueError, match="overflows fp32"):
        weight_delta(torch.full((2, 2), 1e300, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert weight_delta(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)
