"""Multi-delta serving, decode step time (GPU only).

    python benchmarks/serving.py                 # -> benchmarks/results/serving-<gpu>.json + a markdown table
    python benchmarks/serving.py --layers 2 --batches 8,32,64 --deltas 1,4,8,32 --reps 100

One decode step (1 token per row) through a Llama-7B-shaped stack of `--layers` decoder layers'
linear layers (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008; random bf16 weights;
attention itself is left out: its cost does not depend on the deltas). A batch of B rows is spread
round-robin over D distinct deltas (alpha 1/16). Columns:

* `base_us`: base only (plain `nn.Linear`s).
* `segmented_us`: `MultiDeltaLinear` with the registered segmented Triton backend
  (`deltacome_ao/kernels/segmented.py`): base GEMM for every row, then 2 launches per layer for all
  deltas.
* `reference_us` (`--reference`): `MultiDeltaLinear` with the torch reference path (factors
  unpacked every step; slow, for comparison).
* `naive_us`: a loop over deltas, one compressed-model call per delta on its rows (the single-delta
  `deltacome::delta_linear` kernels, i.e. `F.linear(x_d, MixedPrecisionDeltaTensor)`), plus one base
  call for base rows if any.

Each row also records how far the segmented step's output is from the naive loop's
(`max_abs_diff_vs_naive`, next to `max_abs_out`): the two must agree up to bf16 rounding.

Timing: CUDA graphs (eager if capture fails, flagged), a 256 MB write to flush L2 before every
replay, median of `--reps`. Compression runs `--unique` SVD+quantisations per shape; the D deltas
are distinct copies of those (separate memory), so every delta's bytes are really read.
Without CUDA the script exits with a message, except with `--smoke`: a CPU check of the script's
own logic (numbers meaningless) on a 1-layer stack of tiny projections (hidden 128, MLP 320),
batches 2 and 6, 1 and 3 deltas, `--reference` on; the segmented column runs the segmented Triton
kernel under Triton's CPU interpreter (TRITON_INTERPRET=1, set by the script when triton is not
imported yet). Writes to a temporary directory unless `--out` is given.

    python benchmarks/serving.py --smoke --out /tmp/serving.json      # ~15 s on 2 cores
No numbers are claimed in the docs until it is run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402



def projections(hidden: int, mlp: int) -> dict:
    """name: (out, in) of a decoder layer's linears."""
    return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


PROJ = projections(4096, 11008)
SMOKE_PROJ = projections(128, 320)  # --smoke: ragged, every dimension <= 512 (Triton interpreter)


def ints(text):
    return [int(v) for v in text.split(",") if v]


def step(mods, x):
    """The linear work of a decoder layer stack at decode: mods[l][name](x) -> module call."""
    for m in mods:
        h = m["q"](x) + m["k"](x) + m["v"](x)
        h = m["o"](h)
        x = x + m["down"](F.silu(m["gate"](h)) * m["up"](h))
    return x


def build(args, device, proj):
    from kernels import make_weight  # benchmarks/kernels.py

    from deltacome_ao import MixedPrecisionDeltaTensor
    from deltacome_ao.serving import MultiDeltaLinear

    g = torch.Generator(device=device).manual_seed(0)
    base = [{n: torch.nn.Linear(i, o, bias=False, device=device, dtype=torch.bfloat16) for n, (o, i) in proj.items()}
            for _ in range(args.layers)]
    for layer in base:
        for lin in layer.values():
            with torch.no_grad():
                lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=g, device=device))
    t0 = time.time()
    unique = {shape: [make_weight(*shape, args.alpha, device, seed=k).factors for k in range(args.unique)]
              for shape in set(proj.values())}
    print(f"compressed {args.unique} x {len(unique)} shapes in {time.time() - t0:.0f} s", file=sys.stderr)
    n_deltas = max(args.deltas)
    # per (delta, layer, proj): a distinct copy (own memory) over that layer's base weight
    deltas = [[{n: MixedPrecisionDeltaTensor.from_factors(lin.weight.detach(),
                                                          unique[proj[n]][d % args.unique].map_tensors(torch.clone))
                for n, lin in layer.items()} for layer in base]
              for d in range(n_deltas)]
    multi = [{n: MultiDeltaLinear(lin) for n, lin in layer.items()} for layer in base]
    for d in range(n_deltas):
        for li, layer in enumerate(multi):
            for n, mod in layer.items():
                mod.add(f"d{d}", deltas[d][li][n], delta_id=d, check_base=False)
    compressed = [[{n: (lambda x, w=w: F.linear(x, w)) for n, w in layer.items()} for layer in per_delta]
                  for per_delta in deltas]
    return base, multi, compressed


def implementation(device_type: str, fn) -> None:
    """Make `fn` the `deltacome::segmented_delta_linear` implementation for `device_type` (torch.library
    keeps the last registered one)."""
    from deltacome_ao.ops import segmented_delta_linear

    segmented_delta_linear.register_kernel(device_type)(fn)


def rows_table(args, device, gpu, proj):
    from kernels import CpuTimer, CudaTimer, gpu_specs

    import deltacome_ao.kernels as kernels
    from deltacome_ao.ops import segmented_delta_linear_reference
    from deltacome_ao.serving import Routing, routing

    assert kernels.registered, "the segmented Triton kernel is not registered (triton missing?)"
    segmented = kernels.segmented_delta_linear_cuda  # the Triton implementation (CPU: under the interpreter)
    base, multi, compressed = build(args, device, proj)
    timer = (CudaTimer if device.type == "cuda" else CpuTimer)(device, args.reps)
    hidden = proj["q"][1]
    rows = []
    for b in args.batches:
        x = torch.randn(b, 1, hidden, device=device, dtype=torch.bfloat16)
        base_us, base_graphed = timer(lambda: step(base, x))
        for n in args.deltas:
            if n > b:
                continue
            r = Routing(torch.arange(b) % n)
            groups = r.groups_on(device)

            def multi_step():
                with routing(r):
                    return step(multi, x)

            def naive_step():
                out = torch.empty_like(x)
                for d, idx in groups:
                    out.index_copy_(0, idx, step(compressed[d], x.index_select(0, idx)))
                return out

            with torch.no_grad():
                implementation(device.type, segmented)
                seg_us, seg_graphed = timer(multi_step)
                naive_us, naive_graphed = timer(naive_step)
                got, want = multi_step().float(), naive_step().float()
                ref_us = None
                if args.reference:
                    implementation(device.type, segmented_delta_linear_reference)
                    try:
                        ref_us, _ = timer(multi_step)
                    finally:
                        implementation(device.type, segmented)
            row = dict(batch=b, deltas=n, base_us=round(base_us, 1), segmented_us=round(seg_us, 1),
                       naive_us=round(naive_us, 1), reference_us=None if ref_us is None else round(ref_us, 1),
                       segmented_over_base=round(seg_us / base_us, 3), naive_over_segmented=round(naive_us / seg_us, 3),
                       max_abs_diff_vs_naive=(got - want).abs().max().item(), max_abs_out=want.abs().max().item(),
                       graphed=dict(base=base_graphed, segmented=seg_graphed, naive=naive_graphed))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    bw, _ = gpu_specs(gpu) if device.type == "cuda" else (None, None)
    return rows, bw


def markdown(rows) -> str:
    head = "| batch | deltas | base µs | segmented µs | naive loop µs | reference µs | segmented / base | naive / segmented |"
    out = [head, "|" + "---:|" * 8]
    for r in rows:
        ref = "" if r["reference_us"] is None else f'{r["reference_us"]:.1f}'
        out.append(f'| {r["batch"]} | {r["deltas"]} | {r["base_us"]:.1f} | {r["segmented_us"]:.1f} | '
                   f'{r["naive_us"]:.1f} | {ref} | {r["segmented_over_base"]:.2f} | {r["naive_over_segmented"]:.2f} |')
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batches", type=ints, default=[8, 32, 64])
    p.add_argument("--deltas", type=ints, default=[1, 4, 8, 32])
    p.add_argument("--alpha", type=float, default=1 / 16)
    p.add_argument("--unique", type=int, default=2, help="distinct compressions per shape (SVD cost)")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--reference", action="store_true", help="also time the torch reference path")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/serving-<gpu>.json; --smoke: a temporary directory)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script's logic on tiny shapes (segmented kernel under the Triton interpreter)")
    args = p.parse_args(argv)
    if args.smoke:
        if "triton" not in sys.modules:  # the interpreter must be chosen before triton is imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, gpu, proj = torch.device("cpu"), "cpu-smoke", SMOKE_PROJ
        torch.set_num_threads(1)
        args.layers, args.batches, args.deltas, args.unique, args.reps = 1, [2, 6], [1, 3], 2, 1
        args.reference = True
    elif not torch.cuda.is_available():
        print("benchmarks/serving.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured "
              "(--smoke checks the script on CPU).", file=sys.stderr)
        return 2
    else:
        device, gpu, proj = torch.device("cuda"), torch.cuda.get_device_name(), PROJ
    from kernels import slug

    torch.manual_seed(0)
    with torch.no_grad():
        rows, bw = rows_table(args, device, gpu, proj)
    results_dir = Path(tempfile.gettempdir()) / "deltacome-benchmarks" if args.smoke else REPO / "benchmarks" / "results"
    out = args.out or results_dir / f"serving-{slug(gpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(gpu=gpu, hbm_bytes_per_s=bw, torch=torch.__version__, layers=args.layers, alpha=args.alpha,
               reps=args.reps, shapes=proj, rows=rows,
               note="--smoke: a CPU check of the script (Triton interpreter); the times mean nothing" if args.smoke
               else "decode step (1 token/row) through the linear layers of a Llama-7B-shaped stack; "
                    "CUDA graphs, L2 flushed before every replay, median")
    out.write_text(json.dumps(doc, indent=1))
    print(markdown(rows))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
