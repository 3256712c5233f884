"""The segmented multi-delta kernel (`kernels/segmented.py`) against `ops.segmented_reference`.

Without a GPU the kernels run under Triton's CPU interpreter on CPU tensors (see test_kernels.py for
why the interpreter must be chosen before triton is imported; if triton was already imported in
compiled mode, the tests run in a child pytest process). Shapes are small and ragged (in 72, out
136: nothing a multiple of a block) so every mask is exercised.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)
REPO = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("DELTACOME_SEGMENTED_TESTS_CHILD") == "1"

if INTERPRETED:
    from deltacome_ao.kernels import segmented as seg_mod  # noqa: E402

from deltacome_ao import MixedPrecisionDeltaTensor  # noqa: E402
from deltacome_ao.ops import segmented_delta_linear, segmented_delta_linear_reference, segmented_reference  # noqa: E402
from deltacome_ao.serving import MultiDeltaLinear, Routing  # noqa: E402

interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a child process with TRITON_INTERPRET=1")

OUT, IN = 136, 72
GROUP = 32
BANDS = {
    0: [(8, 2), (3, 31), (2, 33)],  # counts 2 / 31 / 33, bits 8 / 3 / 2
    1: [(2, 1)],  # one singular vector
    2: [(8, 2), (3, 31), (2, 33)],  # same layout as 0: two segments in one launch
    3: [],  # rank 0
    4: [(16, 2), (3, 2)],  # raw fp16 band + small 3-bit band
}
FMA = dict(BM=4, BR=16, BC=4, use_dot=False)
DOT = dict(BM=16, BR=16, BC=4, use_dot=True)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.skipif(INTERPRETED or CHILD, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", DELTACOME_SEGMENTED_TESTS_CHILD="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


@functools.lru_cache(maxsize=None)
def _base():
    g = torch.Generator().manual_seed(0)
    return torch.randn(OUT, IN, generator=g) / IN**0.5


@functools.lru_cache(maxsize=None)
def _tensor(d):
    g = torch.Generator().manual_seed(10 + d)
    base = _base()
    ft = base + 0.05 * (torch.randn(OUT, 8, generator=g) @ torch.randn(8, IN, generator=g)) / IN \
        + 0.01 * torch.randn(OUT, IN, generator=g) / IN**0.5
    return MixedPrecisionDeltaTensor.from_hp(ft, base, bands=BANDS[d], group_size=GROUP)


def _groups(r, ids):
    """[(rows, PackedFactors)] of the routing's groups whose delta is in `ids`."""
    return [(rows, _tensor(d).factors) for d, rows in r.groups if d in ids]


def _run(ids, tokens_per_row, dtype, config, delta_set=None):
    ids = torch.tensor(ids)
    r = Routing(ids)
    groups = _groups(r, delta_set if delta_set is not None else sorted(set(ids.tolist()) - {-1}))
    g = torch.Generator().manual_seed(5)
    shape = (len(ids),) + ((tokens_per_row,) if tokens_per_row else ())
    x = torch.randn(*shape, IN, generator=g).to(dtype)
    y0 = torch.randn(*shape, OUT, generator=g).to(dtype)
    ref = segmented_reference(y0.clone(), x, groups)
    y = y0.clone()
    got = seg_mod.segmented_delta_triton(y, x, groups, config=config)
    assert got is y  # in place
    return y0, ref, got, ids


def _check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape and torch.isfinite(got).all()
    scale = ref.float().abs().max().item()
    atol = 2e-5 * scale if dtype == torch.float32 else 2e-3 * scale  # fp16: one rounding, ≤ 1 ulp apart
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [None, FMA, DOT], ids=["default", "fma-small", "dot"])
def test_mixed_batch_matches_reference(dtype, config):
    # 4 deltas with 3 layouts + a rank-0 delta + base rows; segments of 1 and of several rows
    ids = [0, -1, 2, 1, 0, 3, 0, 4, -1, 2, 0, 0]
    y0, ref, got, ids_t = _run(ids, 0, dtype, config)
    _check(got, ref, dtype)
    untouched = (ids_t == -1) | (ids_t == 3)
    assert torch.equal(got[untouched], y0[untouched])  # base rows and the rank-0 delta: bit-identical
    assert not torch.equal(got[ids_t == 1], y0[ids_t == 1])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_tokens_per_row(dtype):
    # x (B, S, in): prefill-like rows, 21 tokens in the largest segment -> tl.dot path by default
    y0, ref, got, ids_t = _run([1, 0, -1, 0, 0, 2], 7, dtype, None)
    _check(got, ref, dtype)
    assert torch.equal(got[ids_t == -1], y0[ids_t == -1])


@interpreter
def test_single_delta_single_row_and_multiple_token_blocks():
    _check(*_run([0], 0, torch.float32, FMA)[1:3], torch.float32)
    # 11 rows of one delta with BM=4: three token blocks, the last one partial
    _check(*_run([2] * 11, 0, torch.float32, FMA)[1:3], torch.float32)


@interpreter
def test_nothing_to_do_leaves_y_alone():
    for ids in ([-1, -1], [3, -1, 3]):
        y0, ref, got, _ = _run(ids, 0, torch.float32, None, delta_set=[3])
        assert torch.equal(got, y0)


@interpreter
def test_segment_table_is_cached_by_content():
    seg_mod._META_CACHE.clear()
    _run([0, 2, 0], 0, torch.float32, FMA)
    n = len(seg_mod._META_CACHE)
    _run([0, 2, 0], 0, torch.float32, FMA)
    assert n == 1 and len(seg_mod._META_CACHE) == 1


@interpreter
def test_as_backend_of_multi_delta_linear():
    """Registered for "cpu" for the duration of the test: MultiDeltaLinear gives what it gives
    with the reference path, including biases and dense-replacement rows."""
    base = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight.copy_(_base())
    ref_layer = MultiDeltaLinear(base)
    for d in (0, 1, 4):
        ref_layer.add(f"d{d}", _tensor(d), delta_id=d)
    ref_layer.add("dense", weight=torch.randn(OUT, IN) / IN**0.5, bias=torch.randn(OUT), delta_id=5)
    x = torch.randn(6, IN)
    ids = torch.tensor([0, 5, -1, 4, 1, 0])
    want = ref_layer(x, ids)
    import deltacome_ao.kernels as k

    segmented_delta_linear.register_kernel("cpu")(k.segmented_delta_linear_cuda)
    try:
        got = ref_layer(x, ids)
    finally:
        segmented_delta_linear.register_kernel("cpu")(segmented_delta_linear_reference)
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)


@interpreter
def test_unsupported_dtype_falls_back_to_reference():
    ids = torch.tensor([0, 1])
    r = Routing(ids)
    groups = _groups(r, [0, 1])
    x = torch.randn(2, IN, dtype=torch.float64)
    y0 = torch.randn(2, OUT, dtype=torch.float64)
    ref = segmented_reference(y0.clone(), x, groups)
    got = seg_mod.segmented_delta_triton(y0.clone(), x, groups)
    torch.testing.assert_close(got, ref)


def test_registered_for_cuda():
    import deltacome_ao.kernels as k

    assert k.HAS_TRITON and k.registered
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deltacome::segmented_delta_linear", "CUDA")
