#!/usr/bin/env python
"""CPU speed of compressed weights against the dense base, measured side by side in one process.

    python benchmarks/cpu.py                       # everything -> benchmarks/results/cpu.json + markdown tables
    python benchmarks/cpu.py --sections linear     # only the single-linear table (linear, model, multi, layer)
    python benchmarks/cpu.py --smoke               # CI: tiny shapes, JSON to $TMPDIR/deltacome-benchmarks/cpu.json

Sections (every ratio is to the dense base measured in the same run; medians of `--reps` runs, the
variants of a row timed round-robin so that load changes hit them alike):

* `linear`: one `F.linear` at 1 and 128 tokens, fp32 and bf16, shapes (out × in) 4096×4096 and
  4096×11008. Columns: `base` (the dense base weight), `merged` (the dense fine-tune: base + the
  decoded delta, same size as the base), `compressed` (`F.linear` on the `MixedPrecisionDeltaTensor`:
  whatever `deltacome::delta_linear` runs on CPU), `reference` (`ops.delta_linear_reference`: the
  unpack-everything path). The factors are random codes, scales and zero-points in the layout of the
  paper schedule at alpha 1/16, group 128 (speed does not depend on the values; no SVD needed).
* `model`: greedy decode of the shipped llama-arith fine-tune (`assets/pairs`), batch 1, KV cache:
  ms per new token for the base, the dense fine-tune and the compressed fine-tune (`compress_`,
  alpha 1/16, RTN), each a model forward on one token per step.
* `multi`: `MultiDeltaModel` over llama-arith's base with 1 / 2 / 4 / 8 distinct deltas (the three
  shipped fine-tunes of that base at alphas 1/16, 1/8, 1/32) in a batch of 8 rows (row i gets delta
  i mod D), one decode step with a KV cache, against the base model's own step on the same batch.
* `layer`: the bytes-bound version of `multi`: one Llama-7B-shaped decoder layer's seven linear
  layers (q, k, v, o 4096², gate, up 11008×4096, down 4096×11008; fp32) as `MultiDeltaLinear`s,
  batch 8, 1 / 2 / 4 / 8 distinct deltas (random factors as in `linear`), against plain
  `nn.Linear`s, and one compressed `F.linear` per projection (a single delta: the model-level
  ratio at 7B shapes).
* `svd`: the SVD choice on the zoo's real deltas (`assets/pairs`, every projection, the rank the
  paper schedule keeps at alpha 1/16): relative Frobenius error of the rank-k truncation and seconds,
  for exact SVD and `torch.svd_lowrank` with 4 (the current "randomized"), 2 and 1 power iterations.
* `svd7b`: seconds of the same methods at Llama-7B shapes (4096², 11008×4096, 4096×11008).

Results: benchmarks/results/cpu.json (or `--out`), with the load average before and after every
section; `--smoke` writes to `$TMPDIR/deltacome-benchmarks/cpu.json` (numbers meaningless).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402

SECTIONS = ("linear", "model", "multi", "layer", "svd", "svd7b")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYER_7B = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
            "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
LAYER_SMOKE = {"q": (72, 72), "k": (72, 72), "v": (72, 72), "o": (72, 72),
               "gate": (136, 72), "up": (136, 72), "down": (72, 136)}


def shapes_arg(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def ints(text):
    return [int(v) for v in text.split(",") if v]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(variants: dict, reps: int, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median ms}; each rep runs every variant once (round-robin)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in variants}
    for _ in range(reps):
        for n, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


# --- factors without an SVD ------------------------------------------------------------------------


def random_factors(out_f: int, in_f: int, alpha: float = 1 / 16, group_size: int = 128, seed: int = 0):
    """`PackedFactors` in the paper schedule's layout for this shape and alpha, random contents."""
    from deltacome_ao.allocate import PAPER_SCHEDULE, allocate
    from deltacome_ao.factors import PackedFactors
    from deltacome_ao.quantize import QuantizedRows

    g = torch.Generator().manual_seed(seed)
    bands = allocate(out_f, in_f, alpha, PAPER_SCHEDULE, group_size)

    def rows(length):
        groups = math.ceil(length / group_size)
        out = []
        for b in bands:
            codes = torch.randint(0, 1 << b.bits, (b.count, length), generator=g, dtype=torch.uint8)
            scale = (0.02 * torch.rand(b.count, groups, generator=g) / (1 << b.bits) + 1e-4).half()
            zero = torch.randint(0, 1 << b.bits, (b.count, groups), generator=g, dtype=torch.uint8)
            out.append(QuantizedRows(b.bits, codes, scale, zero))
        return out

    rank = sum(b.count for b in bands)
    s = torch.rand(rank, generator=g) * 0.05
    return PackedFactors.pack(rows(in_f), rows(out_f), s, group_size, out_f, in_f)


# --- sections --------------------------------------------------------------------------------------


def linear_rows(args) -> list:
    from deltacome_ao import MixedPrecisionDeltaTensor
    from deltacome_ao.ops import delta_linear_reference

    rows = []
    for out_f, in_f in args.shapes:
        f = random_factors(out_f, in_f)
        g = torch.Generator().manual_seed(1)
        base32 = 0.02 * torch.randn(out_f, in_f, generator=g)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            base = base32.to(dtype)
            w = MixedPrecisionDeltaTensor.from_factors(base, f)
            merged = (base.float() + f.dense()).to(dtype)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, generator=g).to(dtype)
                variants = {
                    "base": lambda: F.linear(x, base),
                    "merged": lambda: F.linear(x, merged),
                    "compressed": lambda: F.linear(x, w),
                }
                if args.reference:
                    variants["reference"] = lambda: delta_linear_reference(x, base, f)
                before = load()
                with torch.no_grad():
                    ms = timed(variants, args.reps)
                    got = F.linear(x, w).float()
                    want = delta_linear_reference(x, base, f).float()
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                row = dict(shape=[out_f, in_f], dtype=dname, tokens=tokens, rank=f.rank,
                           packed_bytes=f.nbytes(), base_bytes=base.numel() * base.element_size(),
                           ms={k: round(v, 3) for k, v in ms.items()},
                           ratio={k: round(v / ms["base"], 3) for k, v in ms.items() if k != "base"},
                           max_rel_diff_vs_reference=err, load=[before, load()])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            del w, merged
    return rows


def _decode_pass(model, prompt, steps, clock=None, **kw) -> float:
    """Prefill `prompt`, then `steps` greedy decode steps (one token, KV cache); -> ms per step. With a
    `_Clock`, it is on during the steps only, and the steps' time is added to it as "step"."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, **kw)
        nxt = out.logits[:, -1:].argmax(-1)
        if clock is not None:
            clock.on = True
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, **kw)
            nxt = out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - t0
        if clock is not None:
            clock.add("step", seconds)
            clock.on = False
    return seconds * 1e3 / steps


def _decode_ms(prompt, steps: int, reps: int, names, **forward_kwargs) -> dict:
    """Median ms per decode step (one token, KV cache) of each model in `names` (round-robin)."""

    def run(m):
        return _decode_pass(m, prompt, steps, **forward_kwargs)

    for m in names.values():
        run(m)
    times = {n: [] for n in names}
    for _ in range(reps):
        for n, m in names.items():
            times[n].append(run(m))
    return {n: statistics.median(v) for n, v in times.items()}


def model_rows(args) -> list:
    from deltacome_ao import DeltaCoMeConfig, compress_
    from deltacome_ao.evaluation.pairs import encode, load_pair

    base, ft = load_pair("llama-arith")
    compressed = copy.deepcopy(ft)
    compress_(compressed, DeltaCoMeConfig(base=base, progress=False))
    prompt = torch.tensor([encode("12+34=", bos=True)])
    before = load()
    ms = _decode_ms(prompt, args.steps, args.reps,
                    {"base": base, "finetuned": ft, "compressed": compressed})
    row = dict(pair="llama-arith", batch=1, steps=args.steps, ms_per_token={k: round(v, 3) for k, v in ms.items()},
               ratio={k: round(v / ms["base"], 3) for k, v in ms.items() if k != "base"}, load=[before, load()],
               profile_ms_per_token=_model_profile(base, compressed, prompt, args.steps))
    print(json.dumps(row), file=sys.stderr)
    return [row]


def multi_rows(args) -> list:
    from deltacome_ao import DeltaCoMeConfig, compress_, save_delta
    from deltacome_ao.evaluation.pairs import encode, load_pair
    from deltacome_ao.serving import MultiDeltaModel

    base = load_pair("llama-arith")[0]
    fts = [load_pair(n)[1] for n in ("llama-arith", "llama-code", "llama-json")]
    alphas = (1 / 16, 1 / 8, 1 / 32)
    n_max = max(args.deltas)
    served = MultiDeltaModel(copy.deepcopy(base))
    with tempfile.TemporaryDirectory(prefix="deltacome-cpu-bench-") as tmp:
        for k in range(n_max):
            ft, alpha = fts[k % 3], alphas[(k // 3) % 3]
            cfg = DeltaCoMeConfig(base=base, alpha=alpha, progress=False)
            m = compress_(copy.deepcopy(ft), cfg)
            save_delta(m, Path(tmp) / f"d{k}", base=base, config=cfg, model_card=False)
            served.load_delta(f"d{k}", Path(tmp) / f"d{k}", verify="none")
    prompt = torch.tensor([encode("12+34=", bos=True)] * args.batch)
    rows = []
    for n in args.deltas:
        ids = [f"d{i % n}" for i in range(args.batch)]

        class Routed(torch.nn.Module):
            def forward(self, **kw):
                return served(delta_ids=ids, **kw)

        before = load()
        ms = _decode_ms(prompt, args.steps, args.reps, {"base": base, "multi": Routed()})
        row = dict(batch=args.batch, deltas=n, steps=args.steps, ms_per_step={k: round(v, 3) for k, v in ms.items()},
                   ratio=round(ms["multi"] / ms["base"], 3), load=[before, load()],
                   profile_ms_per_step=_multi_profile(served, Routed(), prompt, args.steps))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


class _Clock:
    """Seconds spent inside wrapped calls and between a module's pre-hook and hook, while `on`."""

    def __init__(self):
        self.seconds, self._start, self.on = {}, {}, False

    def add(self, name, seconds):
        if self.on:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name, time.perf_counter() - t0)
        return timed

    def hooks(self, module, name):
        def pre(mod, args):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.add(name, time.perf_counter() - self._start.pop(id(mod)))
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


class _LibClock:
    """The kernel library with `dc_delta1` (one delta's term) under a clock."""

    def __init__(self, lib, clock):
        self._lib, self.dc_delta1 = lib, clock.wrap("kernel", lib.dc_delta1)

    def __getattr__(self, name):
        return getattr(self._lib, name)


def _clocked_pass(model, prompt, steps, clock, handles, undo) -> dict:
    """One decode pass with `clock` on; then `undo()` and the hooks removed. -> {part: ms per step}."""
    try:
        _decode_pass(model, prompt, steps, clock)
    finally:
        undo()
        for h in handles:
            h.remove()
    return {k: round(v * 1e3 / steps, 3) for k, v in clock.seconds.items()}


def _model_profile(base, compressed, prompt, steps) -> dict:
    """Where a decode step's time goes (ms per token; one extra pass with clocks): the base model's step and
    its linear layers, the compressed model's step, its compressed linear layers (base product + delta
    term + the Python around them) and, inside those, the kernel calls."""
    from deltacome_ao import DeltaTensor
    from deltacome_ao.kernels import cpu as K

    result = {}
    for name, model in (("base", base), ("compressed", compressed)):
        clock, handles = _Clock(), []
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and (name == "base" or isinstance(m.weight, DeltaTensor)):
                handles += clock.hooks(m, "linear_layers")
        lib = K._lib
        if lib is not None and name == "compressed":
            K._lib = _LibClock(lib, clock)
        result[name] = _clocked_pass(model, prompt, steps, clock, handles, lambda: setattr(K, "_lib", lib))
    return result


def _multi_profile(served, routed, prompt, steps) -> dict:
    """Where a multi-delta decode step's time goes (ms per step, medians not taken: one extra pass of
    `steps` decode steps with clocks around the parts): the whole step, the multi-delta linear layers
    (base product + delta terms), inside them the segmented kernel calls, and the per-row modules (norms
    and embeddings whose tensors a delta replaces: one forward per delta group)."""
    from deltacome_ao.kernels import cpu as K
    from deltacome_ao.serving import MultiDeltaLinear

    clock, handles, call = _Clock(), [], K._call
    for m in served.model.modules():
        if isinstance(m, MultiDeltaLinear):
            handles += clock.hooks(m, "multi_delta_linear")
        elif type(m).__name__ in ("MultiDeltaModule", "MultiDeltaEmbedding"):
            handles += clock.hooks(m, "per_row_modules")
    K._call = clock.wrap("segmented_kernel", call)
    return _clocked_pass(routed, prompt, steps, clock, handles, lambda: setattr(K, "_call", call))


def layer_rows(args) -> list:
    """One 7B-shaped decoder layer's linears: plain, one compressed delta, and multi-delta batches."""
    from deltacome_ao import MixedPrecisionDeltaTensor
    from deltacome_ao.serving import MultiDeltaLinear, routing

    shapes = LAYER_SMOKE if args.smoke else LAYER_7B
    g = torch.Generator().manual_seed(2)
    base = {n: torch.nn.Linear(i, o, bias=False) for n, (o, i) in shapes.items()}
    for lin in base.values():
        with torch.no_grad():
            lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=g))
        lin.requires_grad_(False)
    n_max = max(args.deltas)
    factors = {n: [random_factors(*shape, seed=10 * k + j) for k in range(n_max)]
               for j, (n, shape) in enumerate(shapes.items())}
    multi = {n: MultiDeltaLinear(lin) for n, lin in base.items()}
    for n, mod in multi.items():
        for k in range(n_max):
            mod.add(f"d{k}", MixedPrecisionDeltaTensor.from_factors(base[n].weight.detach(), factors[n][k]),
                    delta_id=k, check_base=False)
    single = {n: MixedPrecisionDeltaTensor.from_factors(base[n].weight.detach(), factors[n][0]) for n in shapes}

    def step(mods, x):
        h = mods["q"](x) + mods["k"](x) + mods["v"](x)
        h = mods["o"](h)
        return x + mods["down"](F.silu(mods["gate"](h)) * mods["up"](h))

    compressed = {n: (lambda x, w=w: F.linear(x, w)) for n, w in single.items()}
    hidden = shapes["q"][1]
    rows = []
    with torch.no_grad():
        x1 = torch.randn(1, hidden, generator=g)
        before = load()
        ms = timed({"base": lambda: step(base, x1), "compressed": lambda: step(compressed, x1)}, args.reps)
        row = dict(kind="one delta, 1 token", batch=1, deltas=1, ms={k: round(v, 3) for k, v in ms.items()},
                   ratio=round(ms["compressed"] / ms["base"], 3), load=[before, load()])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        x = torch.randn(args.batch, hidden, generator=g)
        for n in args.deltas:
            ids = torch.arange(args.batch) % n

            def multi_step():
                with routing(ids):
                    return step(multi, x)

            before = load()
            ms = timed({"base": lambda: step(base, x), "multi": multi_step}, args.reps)
            row = dict(kind="multi-delta", batch=args.batch, deltas=n, ms={k: round(v, 3) for k, v in ms.items()},
                       ratio=round(ms["multi"] / ms["base"], 3),
                       delta_bytes_ratio=round(sum(factors[p][k].nbytes() for p in shapes for k in range(n))
                                               / sum(lin.weight.numel() * 4 for lin in base.values()), 4),
                       load=[before, load()])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


SVD_METHODS = {"exact": dict(method="exact"), "randomized-4": dict(method="randomized", power_iters=4),
               "randomized-2": dict(method="randomized", power_iters=2),
               "randomized-1": dict(method="randomized", power_iters=1)}


def svd7b_rows(args) -> list:
    """Seconds of each SVD method at Llama-7B shapes (rank of the paper schedule at alpha 1/16); the
    values are a random low-rank-plus-noise matrix (time does not depend on them)."""
    from deltacome_ao.allocate import PAPER_SCHEDULE, allocate
    from deltacome_ao.decompose import delta_svd

    rows = []
    for out_f, in_f in ([(72, 136), (136, 72)] if args.smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]):
        g = torch.Generator().manual_seed(3)
        k = sum(b.count for b in allocate(out_f, in_f, 1 / 16, PAPER_SCHEDULE, 128))
        d = (torch.randn(out_f, 64, generator=g) @ torch.randn(64, in_f, generator=g)
             + 0.1 * torch.randn(out_f, in_f, generator=g))
        row = dict(shape=[out_f, in_f], rank=k, seconds={})
        for mname, kw in {**SVD_METHODS, "auto (default)": {}}.items():
            t0 = time.perf_counter()
            delta_svd(d, k, **kw)
            row["seconds"][mname] = round(time.perf_counter() - t0, 3)
        if out_f < in_f:  # what exact SVD did before on a wide matrix (no transpose)
            t0 = time.perf_counter()
            torch.linalg.svd(d, full_matrices=False)
            row["seconds"]["exact, not transposed"] = round(time.perf_counter() - t0, 3)
        row["load"] = load()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if not args.smoke:  # one Llama-7B decoder layer: q, k, v, o 4096², gate, up 11008×4096, down 4096×11008
        sq, tall, wide = (r["seconds"] for r in rows)
        before = 4 * sq["randomized-4"] + 2 * tall["exact"] + wide["exact, not transposed"]  # the old "auto"
        now = 4 * sq["auto (default)"] + 2 * tall["auto (default)"] + wide["auto (default)"]
        rows.append(dict(layer_7b_seconds={"before (auto: randomized-4 / exact)": round(before, 2),
                                           "now (auto)": round(now, 2)}, speedup=round(before / now, 2)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def svd_rows(args) -> list:
    """Truncation error ‖Δ − U_k S_k V_kᵀ‖_F / ‖Δ‖_F of each SVD method on the zoo's real deltas."""
    from deltacome_ao.allocate import PAPER_SCHEDULE, allocate
    from deltacome_ao.decompose import delta_svd, weight_delta
    from deltacome_ao.evaluation.pairs import load_pair

    rows = []
    for name in (["llama-arith"] if args.smoke else ["llama-arith", "llama-code", "llama-json", "mistral-code",
                                                      "qwen2-json"]):
        base, ft = load_pair(name)
        base_w = dict(base.named_modules())
        layers = [(n, m) for n, m in ft.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("proj")]
        for lname, mod in layers[:2] if args.smoke else layers:
            d = weight_delta(mod.weight, base_w[lname].weight, lname)
            k = sum(b.count for b in allocate(*d.shape, 1 / 16, PAPER_SCHEDULE, 128))
            norm = d.norm()
            row = dict(pair=name, layer=lname, shape=list(d.shape), rank=k, err={}, seconds={})
            for mname, kw in SVD_METHODS.items():
                t0 = time.perf_counter()
                r = delta_svd(d, k, **kw)
                row["seconds"][mname] = round(time.perf_counter() - t0, 4)
                row["err"][mname] = ((d - (r.U * r.S) @ r.Vh).norm() / norm).item()
            rows.append(row)
    summary = {}
    for mname in SVD_METHODS:
        rel = [r["err"][mname] / max(r["err"]["exact"], 1e-30) - 1 for r in rows]
        summary[mname] = dict(mean_excess_error=statistics.mean(rel) if rel else 0.0, max_excess_error=max(rel, default=0.0),
                              seconds=round(sum(r["seconds"][mname] for r in rows), 3))
    print(json.dumps(summary), file=sys.stderr)
    return [dict(summary=summary, layers=rows)]


# --- output ----------------------------------------------------------------------------------------


def markdown(doc) -> str:
    out = []
    if doc.get("linear"):
        out += ["| shape (out×in) | dtype | tokens | base ms | merged | compressed | reference |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in doc["linear"]:
            ratio = r["ratio"]
            ref = f'{ratio["reference"]:.2f}×' if "reference" in ratio else ""
            out.append(f'| {r["shape"][0]}×{r["shape"][1]} | {r["dtype"]} | {r["tokens"]} | {r["ms"]["base"]:.2f} | '
                       f'{ratio["merged"]:.2f}× | {ratio["compressed"]:.2f}× | {ref} |')
        out.append("")
    if doc.get("model"):
        out += ["| model | base ms/token | fine-tuned | compressed |", "|---|---:|---:|---:|"]
        for r in doc["model"]:
            out.append(f'| {r["pair"]} | {r["ms_per_token"]["base"]:.2f} | {r["ratio"]["finetuned"]:.2f}× | '
                       f'{r["ratio"]["compressed"]:.2f}× |')
        out.append("")
    if doc.get("multi"):
        out += ["| llama-arith, batch | deltas | base ms/step | multi-delta ms/step | ratio |", "|---:|---:|---:|---:|---:|"]
        for r in doc["multi"]:
            out.append(f'| {r["batch"]} | {r["deltas"]} | {r["ms_per_step"]["base"]:.2f} | '
                       f'{r["ms_per_step"]["multi"]:.2f} | {r["ratio"]:.2f}× |')
        out.append("")
    if doc.get("layer"):
        out += ["| 7B layer linears | batch | deltas | base ms | with deltas ms | ratio |", "|---|---:|---:|---:|---:|---:|"]
        for r in doc["layer"]:
            other = r["ms"].get("multi", r["ms"].get("compressed"))
            out.append(f'| {r["kind"]} | {r["batch"]} | {r["deltas"]} | {r["ms"]["base"]:.2f} | {other:.2f} | '
                       f'{r["ratio"]:.2f}× |')
    if doc.get("svd"):
        out += ["", "| SVD on the zoo's deltas (alpha 1/16 ranks) | mean excess error vs exact | max | seconds |",
                "|---|---:|---:|---:|"]
        for mname, v in doc["svd"][0]["summary"].items():
            out.append(f'| {mname} | {100 * v["mean_excess_error"]:.3f} % | {100 * v["max_excess_error"]:.3f} % | '
                       f'{v["seconds"]:.2f} |')
    if doc.get("svd7b"):
        names = list(doc["svd7b"][0]["seconds"])
        out += ["", "| 7B shape | rank | " + " | ".join(f"{n} s" for n in names) + " |", "|---|---:|" + "---:|" * len(names)]
        for r in doc["svd7b"]:
            if "shape" not in r:
                out.append(f'| one 7B layer (7 matrices), s | | {r["layer_7b_seconds"]} | speedup {r["speedup"]}× |')
                continue
            out.append(f'| {r["shape"][0]}×{r["shape"][1]} | {r["rank"]} | '
                       + " | ".join(f'{r["seconds"].get(n, float("nan")):.2f}' for n in names) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--shapes", type=shapes_arg, default=[(4096, 4096), (4096, 11008)])
    p.add_argument("--tokens", type=ints, default=[1, 128])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--deltas", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed run (model, multi)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, JSON under $TMPDIR/deltacome-benchmarks/")
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.smoke:
        args.shapes, args.tokens, args.deltas, args.batch = [(136, 200), (77, 300)], [1, 3], [1, 2], 4
        args.steps, args.reps = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    doc = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
               cpus=os.cpu_count(), threads=torch.get_num_threads(), reps=args.reps, smoke=args.smoke,
               started=time.strftime("%Y-%m-%d %H:%M:%S"), load_start=load())
    fns = {"linear": linear_rows, "model": model_rows, "multi": multi_rows, "layer": layer_rows, "svd": svd_rows,
           "svd7b": svd7b_rows}
    for s in sections:
        t0 = time.time()
        doc[s] = fns[s](args)
        print(f"{s}: {time.time() - t0:.0f} s", file=sys.stderr)
    doc["load_end"] = load()
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "cpu.json"
    else:
        out = REPO / "benchmarks" / "results" / "cpu.json"
    write_text_atomic(out, json.dumps(doc, indent=1))
    print(markdown(doc))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
