#!/usr/bin/env python
"""Benchmark the delta_linear kernels on a GPU.

    python benchmarks/kernels.py              # kernel table, writes benchmarks/results/kernels-<gpu>.json
    python benchmarks/kernels.py --e2e        # + generate() tokens/s on a Llama-7B-shaped model (random weights)
    python benchmarks/kernels.py --tune       # time the candidate launch configs of configs.py, print the best
    python benchmarks/kernels.py --aot        # no GPU needed: compile for sm_90 and print registers / spills

Kernel table, per (out × in) shape and token count, median over many CUDA-graph replays, L2
flushed (256 MB write) before each replay:
  base_us     F.linear(x, W_base) with cuBLAS (bf16), the floor we build on
  fused_us    torch.ops.deltacome.delta_linear on CUDA = our Triton kernels (dispatcher's choice, `path`)
  unfused_us  the reference PyTorch path: dequantise the factors, then three matmuls
  roofline_us bytes moved (base + packed delta + x + y) ÷ HBM bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200)
plus `paths_us` (every applicable kernel path, to set the dispatch thresholds in configs.py) and
`compute_floor_us` (FLOPs ÷ dense bf16 peak) for the large token counts.

Without CUDA the script exits with an error message, except for:
  --aot     compiles for sm_90 on any machine (run it WITHOUT TRITON_INTERPRET=1)
  --smoke   CPU check of the script's own logic on tiny shapes (136×200, tokens 1 and 17, a 2-layer
            256-wide Llama for e2e): the kernel table with every Triton path run by Triton's CPU
            interpreter (TRITON_INTERPRET=1, set by the script when triton is not imported yet),
            two --tune candidates per kernel, and e2e. Writes to a temporary directory unless
            --out is given; its numbers are meaningless.

    python benchmarks/kernels.py --smoke --out /tmp/k.json     # ~15 s on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out, in)
TOKENS = [1, 4, 16, 64, 2048]
# (substring of torch.cuda.get_device_name(), HBM bytes/s, dense bf16 FLOP/s); first match wins.
GPU_SPECS = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
]


def gpu_specs(name: str):
    for key, bw, flops in GPU_SPECS:
        if key in name:
            return bw, flops
    return None, None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# weights


def make_weight(out_f, in_f, alpha, device, seed=0, base=None):
    """bf16 base (random, or `base`) + a random low-rank-plus-noise delta, compressed with from_hp."""
    from deltacome_ao import MixedPrecisionDeltaTensor

    g = torch.Generator(device=device).manual_seed(seed)
    if base is None:
        base = (0.02 * torch.randn(out_f, in_f, generator=g, device=device)).to(torch.bfloat16)
    rank = 64
    low = torch.randn(out_f, rank, generator=g, device=device) @ torch.randn(rank, in_f, generator=g, device=device)
    delta = 2e-3 / math.sqrt(rank) * low + 2e-4 * torch.randn(out_f, in_f, generator=g, device=device)
    return MixedPrecisionDeltaTensor.from_hp(base.float() + delta, base, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# timing


class CudaTimer:
    """Median GPU time of `fn`, captured in a CUDA graph when possible, L2 flushed before each run."""

    def __init__(self, device, reps: int, flush_mb: int = 256):
        self.reps = reps
        self.flush = torch.empty(flush_mb * 2**20 // 4, dtype=torch.float32, device=device)

    def __call__(self, fn) -> tuple[float, bool]:
        fn()  # compile / warm up
        torch.cuda.synchronize()
        run, graphed = fn, False
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, graphed = graph.replay, True
        except Exception as e:  # e.g. a host sync inside fn: time it eagerly instead
            print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
            torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            self.flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), graphed


class CpuTimer:
    def __init__(self, device, reps: int):
        self.reps = reps

    def __call__(self, fn):
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), False


# ---------------------------------------------------------------------------------------------
# kernel table


def kernel_rows(args, device, gpu):
    import deltacome_ao.kernels  # noqa: F401  (registers the Triton kernel for CUDA)
    from deltacome_ao.kernels.dispatch import choose_path, delta_linear_triton
    from deltacome_ao.kernels.configs import interpreting
    from deltacome_ao.ops import delta_linear_reference

    triton_paths = device.type == "cuda" or interpreting()

    bw, peak = gpu_specs(gpu) if device.type == "cuda" else (None, None)
    if args.bandwidth:
        bw = args.bandwidth * 1e12
    timer = (CudaTimer if device.type == "cuda" else CpuTimer)(device, args.reps)
    rows = []
    for out_f, in_f in args.shapes:
        t0 = time.time()
        w = make_weight(out_f, in_f, args.alpha, device)
        print(f"{out_f}x{in_f}: bands {list(zip(w.bits, w.counts))}, {w.bits_per_param():.3f} bits/param "
              f"(built in {time.time() - t0:.1f}s)", file=sys.stderr)
        f, wb = w.factors, w.base_weight
        a = f.op_args()
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            base_us, _ = timer(lambda: torch.nn.functional.linear(x, wb))
            fused_us, graphed = timer(lambda: torch.ops.deltacome.delta_linear(x, wb, *a))
            unfused_us, unfused_graphed = timer(lambda: delta_linear_reference(x, wb, f))
            paths = {}
            for path in ("gemv", "gemm_fused", "gemm_dequant"):
                if path == "gemv" and tokens > 16:
                    continue
                if triton_paths:  # on CPU: Triton's interpreter (--smoke)
                    paths[path] = round(timer(lambda: delta_linear_triton(x, wb, f, path=path))[0], 2)
            nbytes = (wb.numel() * wb.element_size() + w.delta_nbytes()
                      + x.numel() * x.element_size() + tokens * out_f * x.element_size())
            flops = 2 * tokens * (out_f * in_f + w.rank * (out_f + in_f))
            row = {
                "gpu": gpu, "shape": [out_f, in_f], "tokens": tokens,
                "base_us": round(base_us, 2), "fused_us": round(fused_us, 2), "unfused_us": round(unfused_us, 2),
                "roofline_us": round(nbytes / bw * 1e6, 2) if bw else None,
                "compute_floor_us": round(flops / peak * 1e6, 2) if peak else None,
                "path": choose_path(tokens, device, x.dtype) if device.type == "cuda" else "reference (cpu)",
                "paths_us": paths, "rank": w.rank, "bands": [list(b) for b in zip(w.bits, w.counts)],
                "delta_bytes": w.delta_nbytes(), "cuda_graph": graphed, "unfused_cuda_graph": unfused_graphed,
            }
            rows.append(row)
            print(f"  tokens {tokens:5d}: base {base_us:9.2f} µs  fused {fused_us:9.2f} µs  "
                  f"unfused {unfused_us:9.2f} µs  {paths}", file=sys.stderr)
        del w
    return rows


def markdown(rows) -> str:
    head = ("| shape (out×in) | tokens | base µs | fused µs | unfused µs | roofline µs | fused/base | "
            "fused/roofline | path |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = r["fused_us"] / r["base_us"] if r["base_us"] else float("nan")
        roof = f"{r['fused_us'] / r['roofline_us']:.2f}" if r["roofline_us"] else "–"
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['tokens']} | {r['base_us']:.1f} | {r['fused_us']:.1f} | "
            f"{r['unfused_us']:.1f} | {r['roofline_us'] if r['roofline_us'] is not None else '–'} | {ratio:.2f} | "
            f"{roof} | {r['path']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tuning


def tune(args, device, candidates=None):
    """Time the launch-config candidates of configs.py per shape and token count; -> rows (best 3 each).
    `candidates`: only the first that many of each list (--smoke)."""
    from deltacome_ao.kernels import configs
    from deltacome_ao.kernels.delta_gemm import delta_gemm_fused
    from deltacome_ao.kernels.delta_gemv import delta_gemv
    from deltacome_ao.kernels.dispatch import cached_layout, kernel_factors

    if device.type == "cuda":
        timer = CudaTimer(device, max(20, args.reps // 4))
    else:
        timer = CpuTimer(device, args.reps)
    rows = []
    for out_f, in_f in args.shapes:
        w = make_weight(out_f, in_f, args.alpha, device)
        f = w.factors
        a = (w.base_weight, kernel_factors(f), cached_layout(f.bits, f.counts, out_f, in_f, f.group_size))
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            if tokens <= 16:
                kernel, block_m = "GEMV", configs.gemv_block_m(tokens)
                cands = [{**configs.GEMV[block_m], **c} for c in configs.GEMV_CANDIDATES[:candidates]]
                run = lambda cfg: delta_gemv(x, *a, config=cfg)  # noqa: E731
            else:
                kernel, block_m = "GEMM", None
                cands = [{**configs.gemm_config(tokens), **c} for c in configs.GEMM_CANDIDATES[:candidates]]
                run = lambda cfg: delta_gemm_fused(x, *a, gemm=cfg)  # noqa: E731
            results = []
            for cfg in cands:
                try:
                    results.append((round(timer(lambda: run(cfg))[0], 2), cfg))
                except Exception as e:  # out of resources etc.
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
            results.sort(key=lambda r: r[0])
            print(f"{kernel} {out_f}x{in_f} tokens={tokens}" + (f" (BLOCK_M={block_m})" if block_m else "")
                  + f" best: {results[:3]}")
            rows.append({"kernel": kernel, "shape": [out_f, in_f], "tokens": tokens, "tried": len(cands),
                         "best": [{"us": us, "config": cfg} for us, cfg in results[:3]]})
    return rows


def aot_report(args):
    """Registers / spills / shared memory of each kernel for sm_90, compiled without a GPU."""
    from deltacome_ao.kernels import delta_gemm, delta_gemv
    from deltacome_ao.kernels.aot import compile_launch
    from deltacome_ao.kernels.dispatch import cached_layout
    from deltacome_ao.allocate import allocate
    from deltacome_ao.factors import PackedFactors

    for out_f, in_f in args.shapes:
        bands = allocate(out_f, in_f, args.alpha)
        lay = cached_layout(tuple(b.bits for b in bands), tuple(b.count for b in bands), out_f, in_f, 128)
        e = lambda dt, n=8: torch.empty(n, dtype=dt)  # noqa: E731  (only dtypes matter)
        fac = (e(torch.uint8), e(torch.float16), e(torch.uint8), e(torch.uint8), e(torch.float16), e(torch.uint8))
        s = e(torch.float32, max(lay.rank, 1))
        pf = PackedFactors(*fac, s, lay.bits, lay.counts, 128, out_f, in_f)
        w = torch.empty(out_f, in_f, dtype=torch.bfloat16)
        for tokens in args.tokens:
            x = torch.empty(tokens, in_f, dtype=torch.bfloat16)
            if tokens <= 16:
                k, grid, a, kw, _ = delta_gemv.gemv_launch_args(x, w, pf, lay)
                launches = [("gemv", k, grid, a, kw)]
            else:
                k, grid, a, kw, t = delta_gemm.tproj_launch_args(x, pf, lay)
                launches = [("tproj", k, grid, a, kw)]
                k, grid, a, kw, _ = delta_gemm.gemm_launch_args(x, w, t, pf, lay)
                launches.append(("gemm", k, grid, a, kw))
            for name, k, grid, a, kw in launches:
                info = compile_launch(k, a, kw, arch=args.arch)
                print(f"{out_f}x{in_f} tokens={tokens} {name}: grid {grid}, {info.num_warps} warps, "
                      f"{info.registers} regs, {info.spill_bytes} B spilled, {info.shared_bytes} B shared")


# ---------------------------------------------------------------------------------------------
# end to end


def e2e_rows(args, device, gpu):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    import deltacome_ao.kernels  # noqa: F401  (registers the Triton kernel for CUDA)

    if args.smoke:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    delta = copy.deepcopy(base)
    n = 0
    for name, module in delta.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith("proj"):
            w = make_weight(*module.weight.shape, args.alpha, device, seed=n, base=module.weight.detach())
            module.weight = torch.nn.Parameter(w, requires_grad=False)
            n += 1
    print(f"e2e: {cfg.num_hidden_layers} layers, {n} compressed linears", file=sys.stderr)
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), device=device)
    rows = []
    modes = ["eager"] if args.smoke else ["eager", "compile-reduce-overhead"]
    for mode in modes:
        for label, model in (("base", base), ("base+delta", delta)):
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            if mode == "eager":
                kw["disable_compile"] = True
            else:
                kw.update(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
            try:
                with torch.no_grad():
                    for _ in range(2):  # warm-up (and compilation)
                        model.generate(prompt, **kw)
                    times = []
                    for _ in range(args.e2e_reps):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        out = model.generate(prompt, **kw)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                new = out.shape[1] - prompt.shape[1]
                tps = new / statistics.median(times)
                row = {"gpu": gpu, "model": f"llama-7b-shape-{cfg.num_hidden_layers}L", "weights": label,
                       "mode": mode, "new_tokens": new, "tokens_per_s": round(tps, 1)}
            except Exception as e:
                row = {"gpu": gpu, "model": f"llama-7b-shape-{cfg.num_hidden_layers}L", "weights": label,
                       "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {row}", file=sys.stderr)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def parse_shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="out x in, comma separated: 4096x4096,11008x4096")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=TOKENS)
    p.add_argument("--alpha", type=float, default=1 / 16)
    p.add_argument("--reps", type=int, default=200, help="timed replays per measurement (median)")
    p.add_argument("--bandwidth", type=float, default=None, help="HBM TB/s, overrides the device-name table")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels-<gpu>.json)")
    p.add_argument("--e2e", action="store_true", help="also measure generate() tokens/s")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the e2e model (2-4)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--e2e-reps", type=int, default=5)
    p.add_argument("--tune", action="store_true", help="time configs.py candidates instead of the table")
    p.add_argument("--aot", action="store_true", help="no GPU: compile for --arch and print register use")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the table, --tune and --e2e logic on tiny shapes (Triton interpreter); "
                        "writes to a temporary directory unless --out")
    args = p.parse_args(argv)

    if args.aot:
        aot_report(args)
        return 0
    if args.smoke:
        # Triton's CPU interpreter; it has to be chosen before triton is first imported (deltacome_ao
        # imports torchao, which imports triton).
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, gpu = torch.device("cpu"), "cpu-smoke"
        torch.set_num_threads(1)
        args.shapes, args.tokens, args.reps, args.e2e_reps, args.new_tokens = [(136, 200)], [1, 17], 2, 1, 4
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Run it on an H100/H200 machine; `--aot` compiles the kernels "
              "for sm_90 without a GPU.", file=sys.stderr)
        return 2
    else:
        device, gpu = torch.device("cuda"), torch.cuda.get_device_name()
    if args.tune and not args.smoke:
        tune(args, device)
        return 0

    rows = kernel_rows(args, device, gpu)
    print(markdown(rows))
    result = {"kernels": rows}
    if args.e2e or args.smoke:
        e2e = e2e_rows(args, device, gpu)
        result["e2e"] = e2e
        print()
        print("| model | mode | weights | tokens/s |")
        print("|---|---|---|---|")
        for r in e2e:
            print(f"| {r['model']} | {r['mode']} | {r['weights']} | {r.get('tokens_per_s', r.get('error'))} |")
    if args.smoke:  # the tuning loop too, two candidates per kernel
        result["tune"] = tune(args, device, candidates=2)
    results_dir = Path(tempfile.gettempdir()) / "deltacome-benchmarks" if args.smoke else REPO / "benchmarks" / "results"
    out = args.out or results_dir / f"kernels-{slug(gpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The kernel rows are the file's main content (a list, as documented); e2e / tune rows go alongside.
    out.write_text(json.dumps(rows, indent=1) + "\n")
    for extra in ("e2e", "tune"):
        if extra in result:
            out.with_name(f"{out.stem}-{extra}.json").write_text(json.dumps(result[extra], indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
