#!/usr/bin/env python
"""lm-eval check: the harness scores a compressed model exactly like `task.accuracy`.

    python benchmarks/lm_eval_check.py [--pairs llama-arith mistral-code qwen2-json] [--alpha 0.0625] [--problems 200]
    python benchmarks/lm_eval_check.py --quick     # check the script: llama-arith, 16 problems (~10 s)

For each pair (default: the zoo) compresses the fine-tuned model with Delta-CoMe (RTN, `alpha`),
then scores the base, the fine-tuned and the compressed model twice on the same held-out problems
(greedy exact match): with `PAIRS[pair].task.accuracy` (our loop) and with EleutherAI lm-eval's
`HFLM` on a local task (`deltacome_ao.harness`). The compressed row also shows the accuracy that
`benchmarks/quality.py` recorded for the same pair, alpha and method in
`benchmarks/results/quality.json`, when there is one. Prints the table and writes
`benchmarks/results/lm_eval_check.json` (`--json` to change; `--quick`: a temporary file). Exits 1
if any row differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchao import quantize_  # noqa: E402

from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402
from deltacome_ao.config import DeltaCoMeConfig  # noqa: E402
from deltacome_ao.evaluation.harness import harness_eval  # noqa: E402
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval_check.json"
QUALITY = Path(__file__).resolve().parent / "results" / "quality.json"


def _quality_accuracy(pair: str, alpha: float, problems: int):
    """The accuracy quality.py recorded for Delta-CoMe RTN on `pair` at `alpha`, or None."""
    if not QUALITY.is_file():
        return None
    q = json.loads(QUALITY.read_text())
    if q.get("n_problems") != problems or pair not in q["pairs"]:
        return None
    for r in q["pairs"][pair]["rows"]:
        if r["variant"] == "deltacome" and r["alpha"] and abs(float(Fraction(r["alpha"])) - alpha) < 1e-12:
            return r.get("accuracy")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), help=f"default: {' '.join(ZOO)} (--quick: llama-arith)")
    ap.add_argument("--alpha", type=float, default=1 / 16)
    ap.add_argument("--problems", type=int, help="held-out problems per pair (default 200, --quick 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="HFLM batch size")
    ap.add_argument("--quick", action="store_true",
                    help="check the script: llama-arith, 16 problems, JSON to a temporary file")
    ap.add_argument("--json", type=Path, help="default benchmarks/results/lm_eval_check.json (--quick: a temporary file)")
    args = ap.parse_args(argv)
    args.pairs = args.pairs or (["llama-arith"] if args.quick else list(ZOO))
    args.problems = args.problems or (16 if args.quick else 200)
    if args.json is None:
        args.json = Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "lm_eval_check.json" if args.quick else RESULTS

    rows = []
    for pair in args.pairs:
        torch.manual_seed(0)
        task = PAIRS[pair].task
        base, finetuned = load_pair(pair)
        compressed = copy.deepcopy(finetuned)
        with torch.no_grad():
            quantize_(compressed, DeltaCoMeConfig(base=base, alpha=args.alpha, progress=False))
        for label, model in [("base", base), ("fine-tuned", finetuned),
                             (f"Delta-CoMe RTN alpha={args.alpha:g}", compressed)]:
            t0 = time.perf_counter()
            ref = task.accuracy(model, n=args.problems, seed=args.seed)
            t1 = time.perf_counter()
            out = harness_eval(model, pair, args.problems, args.seed, batch_size=args.batch_size)
            t2 = time.perf_counter()
            quality = _quality_accuracy(pair, args.alpha, args.problems) if model is compressed and args.seed == 0 else None
            rows.append({
                "pair": pair,
                "model": label,
                "task_accuracy": ref,
                "lm_eval_accuracy": out["accuracy"],
                "quality_py_accuracy": quality,
                "equal": ref == out["accuracy"] and (quality is None or quality == ref),
                "n": out["n"],
                "task_accuracy_s": round(t1 - t0, 2),
                "lm_eval_s": round(t2 - t1, 2),
            })

    print(f"{args.problems} held-out problems per pair (seed {args.seed}), greedy exact match")
    print(f"{'pair':<13} {'model':<28} {'task.accuracy':>13} {'lm-eval HFLM':>13} {'quality.py':>10} {'equal':>6}")
    for r in rows:
        q = "" if r["quality_py_accuracy"] is None else f"{r['quality_py_accuracy']:.3f}"
        print(f"{r['pair']:<13} {r['model']:<28} {r['task_accuracy']:>13.3f} {r['lm_eval_accuracy']:>13.3f} "
              f"{q:>10} {'yes' if r['equal'] else 'NO':>6}")

    write_text_atomic(args.json, json.dumps({
        "pairs": args.pairs,
        "alpha": args.alpha,
        "method": "deltacome (RTN)",
        "problems": args.problems,
        "seed": args.seed,
        "hflm_batch_size": args.batch_size,
        "rows": rows,
        "versions": {p: version(p) for p in ("lm_eval", "transformers", "torch", "torchao")},
        "command": " ".join(["python benchmarks/lm_eval_check.py", *(sys.argv[1:] if argv is None else argv)]),
    }, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
