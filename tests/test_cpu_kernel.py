"""The CPU kernel (`deltacome_ao/kernels/cpu.py`, `cpu_kernel.c`) against the reference path.

Every comparison is with `ops.delta_linear_reference` / `segmented_delta_linear_reference` on the
same packed factors: ragged shapes (in / out not multiples of 8, 16 or the group size), every
bit-width 1..8 and 16, bands of 1 and of many vectors, an empty band, rank 0, group sizes that do
and do not divide the padded row, 1..40 tokens (the fused kernel, its token blocks of 8/4/2/1 and
the dequantize-blocks path), fp32 / bf16 / fp16 activations, 3-D inputs, several deltas in one call.
Tolerances are fp32 rounding relative to the magnitude of the sums (|x|·|W| terms), since only the
order of the fp32 additions differs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltacome_ao import MixedPrecisionDeltaTensor
from deltacome_ao.factors import PackedFactors
from deltacome_ao.kernels import cpu as K
from deltacome_ao.ops import (delta_linear, delta_linear_reference, delta_only_linear, direct_kernel,
                              segmented_delta, segmented_delta_linear, segmented_delta_linear_reference)
from deltacome_ao.quantize import QuantizedRows

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not K.available(), reason=f"no CPU kernel: {K.build_info.get('error')}")


def factors(out_f, in_f, bands, group_size=32, seed=0) -> PackedFactors:
    """Random packed factors with these (bits, count) bands: every code value, random scales / zeros."""
    g = torch.Generator().manual_seed(seed)

    def rows(length):
        groups = math.ceil(length / group_size)
        out = []
        for bits, count in bands:
            if bits == 16:
                vals = (torch.randn(count, length, generator=g) * 0.1).half()
                out.append(QuantizedRows(16, vals, torch.zeros(count, 0).half(), torch.zeros(count, 0, dtype=torch.uint8)))
                continue
            codes = torch.randint(0, 1 << bits, (count, length), generator=g, dtype=torch.uint8)
            scale = (torch.rand(count, groups, generator=g) * 0.05 / (1 << bits) + 1e-3).half()
            zero = torch.randint(0, 1 << bits, (count, groups), generator=g, dtype=torch.uint8)
            out.append(QuantizedRows(bits, codes, scale, zero))
        return out

    rank = sum(c for _, c in bands)
    s = torch.rand(rank, generator=g) + 0.5
    return PackedFactors.pack(rows(in_f), rows(out_f), s, group_size, out_f, in_f)


def magnitude(x, base, f):
    """|x|·|W_base|ᵀ + ((|x| |V̂|ᵀ)·|s|) |Ûᵀ|: the size of the sums whose rounding may differ."""
    v, ut = f.dequantize()
    xa = x.float().abs().reshape(-1, x.shape[-1])
    m = xa @ base.float().abs().T + ((xa @ v.abs().T) * f.s.abs()) @ ut.abs()
    return m.reshape(*x.shape[:-1], -1)


def assert_matches(got, want, mag, dtype=torch.float32):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 3e-6 * mag
    if dtype != torch.float32:  # both round once to the activation dtype; a tie can land one ulp apart
        tol = tol + want.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
    err = (got.float() - want.float()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst ratio {(err / tol.clamp_min(1e-30)).max().item():.3g}"


BAND_SETS = {
    "paper": [(8, 2), (3, 9), (2, 13)],
    **{f"{b}bit": [(b, 5)] for b in range(1, 9)},
    "fp16": [(16, 3)],
    "mixed16": [(16, 2), (7, 1), (5, 3), (6, 2), (4, 1), (1, 4)],
    "one-vector": [(2, 1)],
}


@pytest.mark.parametrize("bands", sorted(BAND_SETS))
@pytest.mark.parametrize("shape,group", [((77, 300), 32), ((136, 200), 128), ((61, 45), 7), ((5, 3), 2),
                                         ((256, 384), 64)])
def test_delta_linear_matches_reference(bands, shape, group):
    out_f, in_f = shape
    f = factors(out_f, in_f, BAND_SETS[bands], group)
    base = torch.randn(out_f, in_f) * 0.05
    for tokens in (1, 2, 3, 5, 8, 9, 16, 17, 40):
        x = torch.randn(tokens, in_f)
        want = delta_linear_reference(x, base, f)
        got = delta_linear(x, base, *f.op_args())
        assert_matches(got, want, magnitude(x, base, f))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations(dtype):
    f = factors(136, 200, BAND_SETS["paper"], 32)
    base = (torch.randn(136, 200) * 0.05).to(dtype)
    for tokens in (1, 4, 30):
        x = torch.randn(2, tokens, 200).to(dtype)
        want = delta_linear_reference(x, base, f)
        got = delta_linear(x, base, *f.op_args())
        assert_matches(got, want, magnitude(x, base, f), dtype)


def test_fp32_activations_with_a_bf16_base():
    f = factors(72, 100, BAND_SETS["paper"], 32)
    base = (torch.randn(72, 100) * 0.05).bfloat16()
    x = torch.randn(3, 100)
    assert_matches(delta_linear(x, base, *f.op_args()), delta_linear_reference(x, base, f), magnitude(x, base, f))


def test_rank_zero_and_an_empty_band():
    base = torch.randn(40, 24)
    x = torch.randn(3, 24)
    f0 = factors(40, 24, [], 8)
    assert f0.rank == 0
    torch.testing.assert_close(delta_linear(x, base, *f0.op_args()), F.linear(x, base), rtol=0, atol=0)
    f = factors(40, 24, [(3, 4), (2, 5)], 8)
    # a band with no vectors in the middle: same bytes, one more (empty) band
    g = PackedFactors(*f.tensors().values(), bits=(3, 8, 2), counts=(4, 0, 5), group_size=8, out_features=40,
                      in_features=24)
    assert_matches(delta_linear(x, base, *g.op_args()), delta_linear_reference(x, base, f), magnitude(x, base, f))


def test_every_code_position_counts():
    """One nonzero code at a time (every position of a ragged row, each bit-width): the kernel finds
    it exactly where the reference does, in both factors."""
    in_f, out_f, group = 45, 29, 16
    for bits in range(1, 9):
        f = factors(out_f, in_f, [(bits, 1)], group, seed=bits)
        v, ut = f.dequantize()
        x = torch.eye(in_f)  # every input position as its own token row
        base = torch.zeros(out_f, in_f)
        want = delta_linear_reference(x, base, f)
        got = torch.cat([delta_linear(x[i:i + 1], base, *f.op_args()) for i in range(in_f)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(want) > 0


def test_delta_only_linear_matches():
    f = factors(77, 300, BAND_SETS["mixed16"], 32)
    x = torch.randn(2, 5, 300)
    args = (*f.tensors().values(), list(f.bits), list(f.counts), f.out_features, f.in_features, f.group_size)
    v, ut = f.dequantize()
    want = ((x @ v.T) * f.s) @ ut
    got = delta_only_linear(x, *args)
    assert_matches(got, want, magnitude(x, torch.zeros(77, 300), f))


def test_threads_do_not_change_the_result_beyond_rounding():
    f = factors(512, 640, [(8, 2), (3, 20), (2, 200)], 128)
    base = torch.randn(512, 640) * 0.02
    x = torch.randn(2, 640)
    old = torch.get_num_threads(), K.PARALLEL_MIN_MACS
    try:
        K.PARALLEL_MIN_MACS = 0
        torch.set_num_threads(2)
        two = delta_linear(x, base, *f.op_args())
        torch.set_num_threads(1)
        one = delta_linear(x, base, *f.op_args())
    finally:
        torch.set_num_threads(old[0])
        K.PARALLEL_MIN_MACS = old[1]
    assert_matches(two, one, magnitude(x, base, f))
    assert_matches(two, delta_linear_reference(x, base, f), magnitude(x, base, f))


# --- many deltas -------------------------------------------------------------------------------------


def _segmented_inputs(tokens_per_row=1, dtype=torch.float32):
    out_f, in_f = 61, 77
    deltas = [factors(out_f, in_f, BAND_SETS["paper"], 32, seed=1),
              factors(out_f, in_f, [(4, 3), (1, 6)], 16, seed=2),
              factors(out_f, in_f, [], 32, seed=3),  # rank 0
              factors(out_f, in_f, BAND_SETS["mixed16"], 8, seed=4)]
    batch = 40
    ids = torch.tensor([i % 5 - 1 for i in range(batch)])  # -1 = base rows
    ids[20:] = 0  # delta 0 gets 24 rows: above FUSED_MAX_TOKENS, the blockwise path
    rows = [torch.nonzero(ids == d).flatten() for d in range(len(deltas))]
    shape = (batch, out_f) if tokens_per_row == 1 else (batch, tokens_per_row, out_f)
    y = torch.randn(shape).to(dtype)
    x = torch.randn(*shape[:-1], in_f).to(dtype)
    return y, x, rows, deltas


@pytest.mark.parametrize("tokens_per_row", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_matches_reference(tokens_per_row, dtype):
    y, x, rows, deltas = _segmented_inputs(tokens_per_row, dtype)
    groups = list(zip(rows, deltas))
    tensors = [t for f in deltas for t in f.tensors().values()]
    bits = [b for f in deltas for b in f.bits]
    counts = [c for f in deltas for c in f.counts]
    args = (rows, tensors, bits, counts, [len(f.bits) for f in deltas], [f.group_size for f in deltas])
    want = segmented_delta_linear_reference(y, x, *args)
    got = segmented_delta_linear(y, x, *args)
    assert got.dtype == y.dtype and got.data_ptr() != y.data_ptr()
    mag = y.float().abs().clone()
    for r, f in groups:
        mag[r] += magnitude(x[r], torch.zeros(y.shape[-1], x.shape[-1]), f)
    assert_matches(got, want, mag, dtype)
    base_rows = torch.ones(y.shape[0], dtype=torch.bool)
    for r in rows:
        base_rows[r] = False
    assert torch.equal(got[base_rows], y[base_rows])  # untouched rows: bit-identical
    assert torch.equal(segmented_delta(y, x, groups), got)  # the helper MultiDeltaLinear calls


def test_multi_delta_linear_rows_equal_single_delta_models():
    from deltacome_ao.serving import MultiDeltaLinear

    base = torch.nn.Linear(77, 61)
    layer = MultiDeltaLinear(base)
    _, _, _, deltas = _segmented_inputs()
    weights = [MixedPrecisionDeltaTensor.from_factors(base.weight.detach(), f) for f in deltas]
    for d, w in enumerate(weights):
        layer.add(f"d{d}", w, delta_id=d)
    x = torch.randn(9, 77)
    ids = torch.tensor([0, 1, -1, 3, 2, 0, 1, 3, 3])
    with torch.no_grad():
        got = layer(x, ids)
        for i, d in enumerate(ids.tolist()):
            want = F.linear(x[i:i + 1], base.weight) if d < 0 else F.linear(x[i:i + 1], weights[d])
            assert_matches(got[i:i + 1], want + base.bias, magnitude(x[i:i + 1], base.weight, deltas[max(d, 0)]) + 1e-6)


# --- dispatch -----------------------------------------------------------------------------------------


def test_eager_calls_skip_the_dispatcher_only_when_safe():
    f = factors(40, 24, BAND_SETS["paper"], 8)
    base = torch.randn(40, 24)
    x = torch.randn(2, 24)
    assert direct_kernel(delta_linear, x) is K.delta_linear_cpu
    assert direct_kernel(delta_linear, x.requires_grad_()) is None  # autograd: through the op
    with torch.no_grad():
        assert direct_kernel(delta_linear, x) is K.delta_linear_cpu
    assert direct_kernel(delta_linear, torch.nn.Parameter(x.detach())) is None  # not a plain tensor
    w = MixedPrecisionDeltaTensor.from_factors(base, f)
    y = F.linear(x, w)
    y.sum().backward()  # the op's autograd formula: d/dx = W_base + Û diag(s) V̂
    want = (base + f.dense()).sum(0)
    torch.testing.assert_close(x.grad, want.expand_as(x), rtol=1e-5, atol=1e-5)


def test_another_registered_kernel_wins_over_the_shortcut():
    f = factors(40, 24, BAND_SETS["paper"], 8)
    base = torch.randn(40, 24)
    w = MixedPrecisionDeltaTensor.from_factors(base, f)
    x = torch.randn(2, 24)
    calls = []

    def spy(*args):
        calls.append(1)
        return delta_linear_reference(args[0], args[1], PackedFactors(*args[2:9], args[9], args[10], args[11],
                                                                      *args[1].shape))

    delta_linear.register_kernel("cpu")(spy)
    try:
        assert direct_kernel(delta_linear, x) is None
        with torch.no_grad():
            F.linear(x, w)
        assert calls == [1]
    finally:
        K.register(force=True)
    assert direct_kernel(delta_linear, x) is K.delta_linear_cpu


def test_compile_fullgraph_equals_eager():
    f = factors(72, 100, BAND_SETS["paper"], 32)
    base = torch.randn(72, 100) * 0.05
    w = MixedPrecisionDeltaTensor.from_factors(base, f)
    x = torch.randn(3, 100)
    fn = torch.compile(lambda x: F.linear(x, w), fullgraph=True, backend="inductor")
    with torch.no_grad():
        eager = F.linear(x, w)
        compiled = fn(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_disabled_kernel_uses_the_reference():
    f = factors(40, 24, BAND_SETS["paper"], 8)
    base = torch.randn(40, 24)
    x = torch.randn(2, 24)
    previous = K.set_enabled(False)
    try:
        got = delta_linear(x, base, *f.op_args())
    finally:
        K.set_enabled(previous)
    assert torch.equal(got, delta_linear_reference(x, base, f))


def test_dequantize_rows_matches_the_reference_exactly():
    f = factors(61, 45, BAND_SETS["mixed16"], 7)
    v, ut = f.dequantize()
    assert torch.equal(K.dequantize_rows(f, "v", 0, f.rank), v)
    assert torch.equal(K.dequantize_rows(f, "u", 3, 9), ut[3:9])


# --- the build ------------------------------------------------------------------------------------------


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


CHILD_CHECK = """
    import warnings, torch
    warnings.simplefilter("always")
    import deltacome_ao
    from deltacome_ao.kernels import cpu as K
    from deltacome_ao import MixedPrecisionDeltaTensor
    from deltacome_ao.ops import delta_linear_reference
    import sys; sys.path.insert(0, "tests")
    from test_cpu_kernel import factors
    f = factors(40, 24, [(8, 2), (3, 5)], 8)
    base = torch.randn(40, 24); x = torch.randn(2, 24)
    w = MixedPrecisionDeltaTensor.from_factors(base, f)
    y = torch.nn.functional.linear(x, w)
    assert torch.allclose(y, delta_linear_reference(x, base, f), atol=1e-5)
    print("AVAILABLE", K.available(), K.build_info.get("path", ""))
"""


def test_build_is_cached_per_source_and_machine(tmp_path):
    env = {"DELTACOME_KERNEL_CACHE": str(tmp_path)}
    first = _child(CHILD_CHECK, env)
    assert first.returncode == 0, first.stderr[-3000:]
    built = list(tmp_path.glob("cpu_kernel-*.so"))
    assert len(built) == 1 and "AVAILABLE True" in first.stdout
    mtime = built[0].stat().st_mtime_ns
    second = _child(CHILD_CHECK, env)
    assert second.returncode == 0 and "AVAILABLE True" in second.stdout
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("cpu_kernel-*.so")] == [mtime]  # loaded, not rebuilt


def test_without_a_compiler_the_reference_path_runs_with_one_warning(tmp_path):
    r = _child(CHILD_CHECK, {"DELTACOME_KERNEL_CACHE": str(tmp_path), "CC": "/nonexistent/cc",
                             "PATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AVAILABLE False" in r.stdout
    assert r.stderr.count("the CPU kernel could not be built") == 1


def test_inconsistent_factors_are_refused_not_read_past():
    f = factors(40, 24, BAND_SETS["paper"], 8)
    base = torch.randn(40, 24)
    x = torch.randn(1, 24)
    args = list(f.op_args())
    args[0] = args[0][:-3].clone()  # v_packed 3 bytes short of what the bands need
    with pytest.raises(ValueError, match="v_packed"):
        K.delta_linear_cpu(x, base, *args)
    args = list(f.op_args())
    args[7] = [8, 3, 12]  # no such bit width
    with pytest.raises(ValueError, match="inconsistent"):
        K.delta_linear_cpu(x, base, *args)


def test_decode_path_checks_the_factors_on_every_call():
    """The decode path (fp32, up to FUSED_MAX_TOKENS rows) caches its descriptor by every factor tensor's
    address and size and checks dtypes, device and contiguity on each call: after a cached call, a factor
    replaced by a non-contiguous copy of the same values gives the same numbers (reference path), one of
    another dtype too, and a shorter view at the same address is refused, never read past."""
    f = factors(40, 24, BAND_SETS["paper"], 8)
    base = torch.randn(40, 24)
    x = torch.randn(2, 24)
    args = list(f.op_args())
    want = delta_linear_reference(x, base, f)
    mag = magnitude(x, base, f)
    assert_matches(K.delta_linear_cpu(x, base, *args), want, mag)
    scale = args[1]
    transposed = torch.empty(scale.shape[::-1], dtype=scale.dtype).t()
    transposed.copy_(scale)
    assert not transposed.is_contiguous()
    assert_matches(K.delta_linear_cpu(x, base, args[0], transposed, *args[2:]), want, mag)
    as_float = list(args)
    as_float[4] = args[4].float()  # u_scale in fp32 (stored fp16): same values
    assert_matches(K.delta_linear_cpu(x, base, *as_float), want, mag)
    short = list(args)
    short[3] = args[3][:-5]  # same address as the cached u_packed, 5 bytes fewer
    assert short[3].data_ptr() == args[3].data_ptr()
    with pytest.raises(ValueError, match="u_packed"):
        K.delta_linear_cpu(x, base, *short)
