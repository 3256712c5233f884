#!/usr/bin/env python
"""Compressed base: Delta-CoMe deltas over a torchao int8 weight-only base, on the shipped real pair.

    python benchmarks/compressed_base.py [--pair llama-arith] [--alpha 0.0625] [--problems 200]
    python benchmarks/compressed_base.py --quick    # check the script: 16 problems, 1 text batch (~15 s)

Writes `benchmarks/results/compressed-base.json` (`--json` to change; `--quick`: a temporary file)
and prints the table.

The delta of every compressed layer is computed against the original (fp32) base — what the
fine-tune started from — and in the "int8 base + delta" row the base term of each layer then runs
on an int8 weight-only copy of the base weight (`deltacome_ao.optimum.quantize_base_`). Rows:

  fine-tuned                 the reference (KL 0 by definition)
  fp32 base alone            the base model the fine-tune started from
  fp32 base + delta          Delta-CoMe as in `deltacome_ao.compare`
  int8 base + delta          the same deltas over `Int8WeightOnlyConfig()` base weights
  int8 base alone            the base model with int8 weight-only projections (no delta)
  int8 fine-tuned            the fine-tuned model's projections quantized to int8 directly

Only the recipe's projections (attention q/k/v/o, MLP gate/up/down) are compressed or quantized in
every row; embeddings, norms and lm_head stay the fine-tuned model's fp32 weights (the base's for
"int8 base alone"). Columns: bytes stored for those projections (base weights + delta, everything
counted), task accuracy (greedy exact match, held-out problems), KL(fine-tuned || model) per answer
token, answer perplexity. int4 weight-only is not measured: torchao 0.18's int4 layouts need CUDA
(or the `mslk` package) and do not run on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchao import quantize_  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

from deltacome_ao.config import DeltaCoMeConfig  # noqa: E402
from deltacome_ao.evaluation.metrics import kl_divergence, perplexity  # noqa: E402
from deltacome_ao.evaluation.pairs import PAIRS, load_pair  # noqa: E402
from deltacome_ao.mixed_precision_delta_tensor import MixedPrecisionDeltaTensor  # noqa: E402
from deltacome_ao.optimum import quantize_base_  # noqa: E402
from deltacome_ao.recipes import recipe_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compressed-base.json"


def _nbytes(t: torch.Tensor) -> int:
    """Bytes stored for one weight: plain tensors, torchao subclasses (sum of inner tensors) and
    our delta tensor (its base + its delta)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    if isinstance(t, MixedPrecisionDeltaTensor):
        return _nbytes(t.base_weight) + t.delta_nbytes()
    return sum(_nbytes(getattr(t, n)) for n in t.tensor_data_names)


def _projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    recipe = recipe_for(model.config.model_type)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and recipe.selects(n)]


def projection_bytes(model: torch.nn.Module) -> int:
    return sum(_nbytes(m.weight) for _, m in _projections(model))


def int8_projections_(model: torch.nn.Module) -> torch.nn.Module:
    """int8 weight-only on exactly the layers Delta-CoMe compresses."""
    names = {n for n, _ in _projections(model)}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, n: n in names)
    return model


def models(pair: str = "llama-arith", alpha: float = 1 / 16):
    """{label: model} for the rows of the table (the fine-tuned model first)."""
    torch.manual_seed(0)
    base, finetuned = load_pair(pair)
    delta = copy.deepcopy(finetuned)
    with torch.no_grad():
        quantize_(delta, DeltaCoMeConfig(base=base, alpha=alpha, progress=False))
        delta_int8 = quantize_base_(copy.deepcopy(delta))
        base_int8 = int8_projections_(copy.deepcopy(base))
        ft_int8 = int8_projections_(copy.deepcopy(finetuned))
    return {
        "fine-tuned": finetuned,
        "fp32 base alone": base,
        "fp32 base + delta": delta,
        "int8 base + delta": delta_int8,
        "int8 base alone": base_int8,
        "int8 fine-tuned": ft_int8,
    }


def measure(pair: str = "llama-arith", alpha: float = 1 / 16, n_problems: int = 200, n_batches: int = 4) -> list[dict]:
    task = PAIRS[pair].task
    batches = task.text_batches("task", n_batches=n_batches)
    start = task.answer_start
    built = models(pair, alpha)
    reference = built["fine-tuned"]
    rows = []
    with torch.no_grad():
        for label, model in built.items():
            t0 = time.perf_counter()
            rows.append({
                "model": label,
                "projection_bytes": projection_bytes(model),
                "accuracy": task.accuracy(model, n=n_problems),
                "kl": kl_divergence(model, reference, batches, start=start),
                "ppl_answers": perplexity(model, batches, start=start),
                "eval_seconds": time.perf_counter() - t0,
            })
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + [
        "| model | projection bytes | accuracy | KL to fine-tuned (answers) | ppl (answers) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['projection_bytes']:,} | {r['accuracy']:.1%} | {r['kl']:.4f} | {r['ppl_answers']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="llama-arith", choices=sorted(PAIRS))
    p.add_argument("--alpha", type=float, default=1 / 16)
    p.add_argument("--problems", type=int, default=None, help="held-out problems (default 200, --quick 16)")
    p.add_argument("--quick", action="store_true",
                   help="check the script: 16 problems, 1 text batch for KL / ppl, JSON to a temporary file")
    p.add_argument("--json", type=Path, default=None,
                   help=f"default {RESULTS.relative_to(RESULTS.parents[2])} (--quick: a temporary file)")
    args = p.parse_args(argv)
    args.problems = args.problems or (16 if args.quick else 200)
    if args.json is None:
        args.json = Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "compressed-base.json" if args.quick else RESULTS
    t0 = time.perf_counter()
    rows = measure(args.pair, args.alpha, args.problems, n_batches=1 if args.quick else 4)
    title = (f"{args.pair}, alpha = {args.alpha:g}, {args.problems} problems "
             f"({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads)")
    print(format_table(rows, title))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "pair": args.pair, "alpha": args.alpha, "problems": args.problems,
        "torch": torch.__version__, "command": " ".join(["python", "benchmarks/compressed_base.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
