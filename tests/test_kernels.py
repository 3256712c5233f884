"""Triton kernels of `deltacome::delta_linear`, checked against the reference op.

On a machine without a GPU the kernels run under Triton's CPU interpreter (`TRITON_INTERPRET=1`,
which must be set before the kernel modules are imported: `triton.jit` picks the interpreter at
decoration time). Shapes stay small and ragged (no dimension a multiple of a block size) because
the interpreter costs milliseconds per block step and does not catch out-of-bounds loads — the
masks are what these tests exercise. A separate subprocess compiles the kernels for sm_90 without a
GPU (ahead of time) to catch what the interpreter lets through. GPU-only checks are skipped here.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

# The interpreter must be chosen before triton is first imported (triton.language's own helpers,
# e.g. tl.sum, are jitted at import) — deltacome_ao imports torchao, which imports triton. So: on a
# machine without CUDA, turn it on here if nobody imported triton yet; otherwise (CUDA present, or
# triton already imported in compiled mode) the interpreter tests run in a child pytest process.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)
REPO = Path(__file__).resolve().parents[1]

if INTERPRETED:
    from deltacome_ao.kernels import delta_gemm as gemm_mod  # noqa: E402
    from deltacome_ao.kernels import delta_gemv as gemv_mod  # noqa: E402
    from deltacome_ao.kernels import dequant as dequant_mod  # noqa: E402
    from deltacome_ao.kernels import dispatch as dispatch_mod  # noqa: E402

    assert isinstance(gemv_mod._delta_gemv_kernel, InterpretedFunction)

from deltacome_ao import MixedPrecisionDeltaTensor  # noqa: E402
from deltacome_ao.kernels import configs  # noqa: E402
from deltacome_ao.kernels.layout import band_layout  # noqa: E402

CHILD = os.environ.get("DELTACOME_KERNEL_TESTS_CHILD") == "1"
not_in_child = pytest.mark.skipif(CHILD, reason="runs in the parent test process")
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a child process with TRITON_INTERPRET=1 "
                                 "(see test_interpreter_suite_in_child_process)")

NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False on this machine)"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_child_process():
    env = {k: v for k, v in os.environ.items()}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["DELTACOME_KERNEL_TESTS_CHILD"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


# (out, in) pairs: nothing a multiple of 8·BC, BK, 16 or the group size.
SHAPES = [(200, 136), (77, 300)]
BANDS = {
    "paper": [(8, 2), (3, 31), (2, 33)],  # band sizes 2, 31, 33; bits 8/3/2
    "fp16+4bit": [(16, 2), (4, 1)],  # raw fp16 rows, then a single-row band
    "one": [(2, 1)],
    "rank0": [],
    "odd-bits": [(7, 3), (6, 2), (5, 1), (1, 4)],
}
GROUP = 64


@functools.lru_cache(maxsize=None)
def _weight(out_f, in_f, bands_key, base_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(base_dtype)
    low_rank = torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g) / in_f
    ft = base.float() + 0.05 * low_rank + 0.01 * torch.randn(out_f, in_f, generator=g) / in_f**0.5
    return MixedPrecisionDeltaTensor.from_hp(ft, base, bands=BANDS[bands_key], group_size=GROUP)


def _op_args(w):
    return (w.base_weight, w.v_packed, w.v_scale, w.v_zero, w.u_packed, w.u_scale, w.u_zero, w.s,
            list(w.bits), list(w.counts), w.group_size)


def _layout(w):
    out_f, in_f = w.base_weight.shape
    return band_layout(w.bits, w.counts, out_f, in_f, w.group_size)


def _x(tokens, in_f, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_f, generator=g).to(dtype)


def _check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    scale = ref.float().abs().max().item() + 1e-6
    # The reference rounds the base product to the activation dtype before adding the delta; the
    # kernels round once at the end, so fp16 results may differ by an ulp or two.
    atol = 2e-5 * scale if dtype == torch.float32 else 4e-3 * scale
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)


def _reference(x, w):
    return torch.ops.deltacome.delta_linear.default(x, *_op_args(w))


def _factors(w):
    """(base weight, kernel-ready PackedFactors, layout): the kernels' arguments for weight `w`."""
    return (w.base_weight, dispatch_mod.kernel_factors(w.factors), _layout(w))


# ---------------------------------------------------------------------------------------------
# Dequantisation (every bit-width the packing supports)


@interpreter
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_all_bit_widths_match_reference(shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(3)
    base = torch.randn(out_f, in_f, generator=g)
    ft = base + 0.01 * torch.randn(out_f, in_f, generator=g)
    bands = [(16, 2), (8, 2), (7, 3), (6, 4), (5, 5), (4, 6), (3, 7), (2, 8), (1, 9)]
    w = MixedPrecisionDeltaTensor.from_hp(ft, base, bands=bands, group_size=GROUP)
    lay = _layout(w)
    f = w.factors
    for which in ("v", "u"):
        ref = f.dequantize_factor(which)
        got = dequant_mod.dequantize_factor_triton(f, lay, which)
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
        got = dequant_mod.dequantize_factor_triton(f, lay, which, torch.float32, dequant_mod.MULT_S)
        torch.testing.assert_close(got, ref * w.s[:, None], atol=1e-6, rtol=1e-6)
        sq = dequant_mod.dequantize_factor_triton(f, lay, which, torch.float32, dequant_mod.MULT_SQRT)
        torch.testing.assert_close(sq, ref * w.s.abs().sqrt()[:, None], atol=1e-6, rtol=1e-5)


@interpreter
def test_dequant_small_blocks_cover_every_tile():
    w = _weight(77, 300, "paper")
    lay = _layout(w)
    ref = w.factors.dequantize_factor("v")
    got = dequant_mod.dequantize_factor_triton(w.factors, lay, "v", config={"BLOCK_R": 16, "BLOCK_L": 64})
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Decode: fused GEMV, one launch


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("bands", list(BANDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_matches_reference(shape, bands, tokens, dtype):
    w = _weight(*shape, bands, dtype)
    x = _x(tokens, shape[1], dtype)
    _check(gemv_mod.delta_gemv(x, *_factors(w)), _reference(x, w), dtype)


SMALL_GEMV = {"BC": 2, "BK": 32, "BR_T": 16, "BC_T": 2, "BR_U": 16}


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_gemv_small_blocks_many_programs(tokens, dtype):
    """Many t-programs and output tiles, ragged last tiles in every dimension."""
    w = _weight(200, 136, "paper", dtype)
    x = _x(tokens, 136, dtype)
    _check(gemv_mod.delta_gemv(x, *_factors(w), config=SMALL_GEMV), _reference(x, w), dtype)


@interpreter
def test_gemv_grid_puts_t_programs_first():
    w = _weight(200, 136, "paper")
    x = _x(1, 136, torch.float32)
    kernel, grid, args, kwargs, _ = gemv_mod.gemv_launch_args(x, *_factors(w), config=SMALL_GEMV)
    # chunks of 16 rows: 1 (2 rows) + 2 (31) + 3 (33); 25 packed columns of outputs / BC=2 -> 13 tiles
    assert kwargs["T_STARTS"] == (0, 1, 3, 6) and kwargs["T_PROGS"] == 6
    assert grid == (6 + 13,)


# ---------------------------------------------------------------------------------------------
# Prefill: fused tensor-core GEMM and dequantise + matmul


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [3, 17])
@pytest.mark.parametrize("bands", ["paper", "fp16+4bit", "rank0", "odd-bits"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm_fused_matches_reference(shape, bands, tokens, dtype):
    w = _weight(*shape, bands, dtype)
    x = _x(tokens, shape[1], dtype)
    _check(gemm_mod.delta_gemm_fused(x, *_factors(w)), _reference(x, w), dtype)


@interpreter
def test_gemm_fused_small_blocks_many_tiles():
    dtype = torch.float16
    w = _weight(200, 136, "paper", dtype)
    x = _x(40, 136, dtype)
    got = gemm_mod.delta_gemm_fused(
        x, *_factors(w), tproj={"BM": 16, "BR": 16, "BK": 32},
        gemm={"BM": 16, "BN": 32, "BK": 32, "BR": 16, "GROUP_M": 2},
    )
    _check(got, _reference(x, w), dtype)


@interpreter
@pytest.mark.parametrize("split_k", [2, 3])
def test_gemm_fused_split_k_t_projection(split_k):
    """Split-K partial sums of t are added with fp32 atomics; a ragged last split (136 = 3·48 - 8)."""
    dtype = torch.float16
    w = _weight(200, 136, "paper", dtype)
    x = _x(17, 136, dtype)
    got = gemm_mod.delta_gemm_fused(x, *_factors(w), tproj={"BM": 32, "BR": 32, "BK": 16, "SPLIT_K": split_k})
    _check(got, _reference(x, w), dtype)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [1, 17])
@pytest.mark.parametrize("bands", ["paper", "fp16+4bit", "rank0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm_dequant_matches_reference(shape, bands, tokens, dtype):
    w = _weight(*shape, bands, dtype)
    x = _x(tokens, shape[1], dtype)
    _check(gemm_mod.delta_gemm_dequant(x, *_factors(w)), _reference(x, w), dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch and the registered op


@interpreter
def test_dispatch_thresholds_are_data(monkeypatch):
    th = configs.dispatch_thresholds(None)
    assert dispatch_mod.choose_path(1) == "gemv"
    assert dispatch_mod.choose_path(th["decode_max_tokens"]) == "gemv"
    assert dispatch_mod.choose_path(th["decode_max_tokens"] + 1) == "gemm_fused"
    assert dispatch_mod.choose_path(th["fused_gemm_max_tokens"] + 1) == "gemm_dequant"
    assert dispatch_mod.choose_path(th["decode_max_tokens"] + 1, dtype=torch.float32) == "gemm_dequant"
    monkeypatch.setitem(configs.DISPATCH_BY_GPU, "FakeGPU", {"decode_max_tokens": 4, "fused_gemm_max_tokens": 8})
    assert configs.dispatch_thresholds("NVIDIA FakeGPU 80GB") == {"decode_max_tokens": 4, "fused_gemm_max_tokens": 8}
    monkeypatch.setitem(configs.DISPATCH_BY_GPU, "FakeGPU", {"decode_max_tokens": 64})
    assert configs.dispatch_thresholds("FakeGPU")["decode_max_tokens"] == 16  # capped by the GEMV


@interpreter
@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_dispatch_end_to_end_with_leading_dims(tokens):
    dtype = torch.float16
    w = _weight(77, 300, "paper", dtype)
    x = _x(tokens, 300, dtype).reshape(1, tokens, 300)
    got = dispatch_mod.delta_linear_triton(x, w.base_weight, w.factors)
    assert got.shape == (1, tokens, 77)
    _check(got, _reference(x, w), dtype)


@interpreter
@pytest.mark.parametrize("path", ["gemv", "gemm_fused", "gemm_dequant"])
def test_transposed_weight_and_bf16_base(path):
    """`W.t()` swaps the factors and gives a non-contiguous base; a bf16 base under fp32 activations."""
    w = _weight(200, 136, "paper", torch.bfloat16).t()
    assert not w.base_weight.is_contiguous()
    x = _x(3, 200, torch.float32)
    _check(dispatch_mod.delta_linear_triton(x, w.base_weight, w.factors, path=path), _reference(x, w), torch.float32)


@interpreter
def test_unsupported_dtype_falls_back_to_reference():
    w = _weight(77, 300, "one", torch.float64)
    x = _x(2, 300, torch.float64)
    torch.testing.assert_close(dispatch_mod.delta_linear_triton(x, w.base_weight, w.factors), _reference(x, w))


@not_in_child
def test_cuda_kernel_registered_on_the_op():
    import deltacome_ao.kernels as k

    assert k.registered
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deltacome::delta_linear", "CUDA")


def _run(code, env_extra=None, drop=("TRITON_INTERPRET",), timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


@not_in_child
def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` fails, find_spec returns None
        "import deltacome_ao.kernels as k; assert not k.registered; print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


AOT_CODE = r"""
import torch
from deltacome_ao.kernels.layout import band_layout
from deltacome_ao.kernels import delta_gemv, delta_gemm, dequant
from deltacome_ao.kernels.aot import compile_launch
out_f, in_f = 4096, 4096
lay = band_layout((8, 3, 2), (2, 32, 966), out_f, in_f, 128)
e = lambda dt, n=8: torch.empty(n, dtype=dt)
w = torch.empty(out_f, in_f, dtype=torch.bfloat16)
fac = (e(torch.uint8), e(torch.float16), e(torch.uint8), e(torch.uint8), e(torch.float16), e(torch.uint8))
s = e(torch.float32, 1000)
from deltacome_ao.factors import PackedFactors
pf = PackedFactors(*fac, s, lay.bits, lay.counts, 128, out_f, in_f)
infos = []
for m, dt in ((1, torch.bfloat16), (2, torch.bfloat16), (4, torch.bfloat16), (16, torch.bfloat16),
              (1, torch.float16), (16, torch.float32)):
    x = torch.empty(m, in_f, dtype=dt)
    k, grid, args, kw, _ = delta_gemv.gemv_launch_args(x, w, pf, lay)
    infos.append((f"gemv M={m} {dt}", compile_launch(k, args, kw)))
for m, dt in ((64, torch.bfloat16), (2048, torch.bfloat16), (300, torch.float16), (300, torch.float32)):
    x = torch.empty(m, in_f, dtype=dt)
    k, grid, args, kw, t = delta_gemm.tproj_launch_args(x, pf, lay)
    infos.append((f"tproj M={m} {dt}", compile_launch(k, args, kw)))
    k, grid, args, kw, y = delta_gemm.gemm_launch_args(x, w, t, pf, lay)
    infos.append((f"gemm M={m} {dt}", compile_launch(k, args, kw)))
k, grid, args, kw = dequant.dequant_launch_args(pf, lay, "v", torch.bfloat16, dequant.MULT_SQRT)
infos.append(("dequant", compile_launch(k, args, kw)))
for name, info in infos:
    print(name, info.registers, info.spill_bytes, info.shared_bytes)
"""


@not_in_child
def test_kernels_compile_for_sm90_without_gpu():
    """Ahead-of-time compile (Triton + ptxas) for H100 of the GPU configs: no interpreter involved."""
    r = _run(AOT_CODE)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(rows) == 15
    for *name, regs, spills, shared in rows:
        assert spills in ("0", "None"), f"{' '.join(name)} spills {spills} bytes per thread"


@not_in_child
def test_benchmark_without_cuda_exits_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py")], capture_output=True, text=True,
                       cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert "CUDA" in (r.stderr + r.stdout)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 300])
def test_gpu_registered_op_matches_reference(tokens, dtype):
    import deltacome_ao.kernels  # noqa: F401  (registers the CUDA kernel)

    w = _weight(200, 136, "paper", torch.bfloat16).to("cuda")
    x = _x(tokens, 136, dtype).cuda()
    got = torch.ops.deltacome.delta_linear(x, *_op_args(w))
    ref = _reference(x.cpu(), w.to("cpu"))
    scale = ref.float().abs().max().item()
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(got.cpu().float(), ref.float(), atol=tol * scale, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_compile_fullgraph_and_cuda_graph():
    import deltacome_ao.kernels  # noqa: F401

    w = _weight(200, 136, "paper", torch.bfloat16).to("cuda")
    x = _x(1, 136, torch.bfloat16).cuda()
    f = torch.compile(lambda a: torch.nn.functional.linear(a, w), fullgraph=True)
    eager = torch.ops.deltacome.delta_linear(x, *_op_args(w))
    torch.testing.assert_close(f(x), eager)
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    torch.ops.deltacome.delta_linear(static_x, *_op_args(w))  # warm-up (compiles the kernel)
    with torch.cuda.graph(g):
        static_y = torch.ops.deltacome.delta_linear(static_x, *_op_args(w))
    for _ in range(3):
        static_x.copy_(_x(1, 136, torch.bfloat16, seed=7).cuda())
        g.replay()
        torch.testing.assert_close(static_y, torch.ops.deltacome.delta_linear(static_x, *_op_args(w)))
