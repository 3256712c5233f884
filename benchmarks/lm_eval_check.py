#!/usr/bin/env python
"""lm-eval check: the harness scores a compressed model exactly like `task.accuracy`.

    python benchmarks/lm_eval_check.py [--pair llama-arith] [--alpha 0.0625] [--problems 200]

Compresses the fine-tuned model of the pair with Delta-CoMe (RTN, `alpha`), then scores the base,
the fine-tuned and the compressed model twice on the same held-out problems (greedy exact match):
with `PAIRS[pair].task.accuracy` (our loop, the number `benchmarks/quality.py` reports) and with
EleutherAI lm-eval's `HFLM` on a local task (`deltacome_ao.harness`). Prints the table and writes
`benchmarks/results/lm_eval_check.json` (`--json` to change). Exits 1 if any row differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torchao import quantize_

from deltacome_ao.config import DeltaCoMeConfig
from deltacome_ao.harness import harness_eval
from deltacome_ao.pairs import PAIRS, load_pair

RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval_check.json"


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--pair", default="llama-arith")
    ap.add_argument("--alpha", type=float, default=1 / 16)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="HFLM batch size")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    task = PAIRS[args.pair].task
    base, finetuned = load_pair(args.pair)
    compressed = copy.deepcopy(finetuned)
    t0 = time.perf_counter()
    with torch.no_grad():
        quantize_(compressed, DeltaCoMeConfig(base=base, alpha=args.alpha, progress=False))
    compress_s = time.perf_counter() - t0

    rows = []
    for label, model in [("base", base), ("fine-tuned", finetuned),
                         (f"Delta-CoMe RTN alpha={args.alpha:g}", compressed)]:
        t0 = time.perf_counter()
        ref = task.accuracy(model, n=args.problems, seed=args.seed)
        t1 = time.perf_counter()
        out = harness_eval(model, args.pair, args.problems, args.seed, batch_size=args.batch_size)
        t2 = time.perf_counter()
        rows.append({
            "model": label,
            "task_accuracy": ref,
            "lm_eval_accuracy": out["accuracy"],
            "equal": ref == out["accuracy"],
            "n": out["n"],
            "task_accuracy_s": round(t1 - t0, 2),
            "lm_eval_s": round(t2 - t1, 2),
        })

    print(f"pair {args.pair}, {args.problems} held-out problems (seed {args.seed}), greedy exact match")
    print(f"{'model':<28} {'task.accuracy':>13} {'lm-eval HFLM':>13} {'equal':>6} {'ours s':>7} {'lm-eval s':>9}")
    for r in rows:
        print(f"{r['model']:<28} {r['task_accuracy']:>13.3f} {r['lm_eval_accuracy']:>13.3f} "
              f"{'yes' if r['equal'] else 'NO':>6} {r['task_accuracy_s']:>7.2f} {r['lm_eval_s']:>9.2f}")

    _write_json(args.json, {
        "pair": args.pair,
        "alpha": args.alpha,
        "method": "deltacome (RTN)",
        "problems": args.problems,
        "seed": args.seed,
        "hflm_batch_size": args.batch_size,
        "compress_s": round(compress_s, 2),
        "rows": rows,
        "versions": {p: version(p) for p in ("lm_eval", "transformers", "torch", "torchao")},
        "command": " ".join(["python benchmarks/lm_eval_check.py", *(sys.argv[1:] if argv is None else argv)]),
    })
    print(f"wrote {args.json}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
