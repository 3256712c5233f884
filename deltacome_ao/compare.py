"""The main job: compress a real fine-tuned pair with Delta-CoMe and the baselines, print the table.

    python -m deltacome_ao.compare [--pair llama-arith] [--alpha 0.0625] [--json out.json]

Every method compresses the same layers (the recipe's attention and MLP projections) at the same
byte budget; embeddings, norms and lm_head stay the fine-tuned model's in every row. Rows: the base
and the fine-tuned model as references, then each method. Columns: delta bytes of the compressed
layers and their bits per parameter (everything stored counted), task accuracy (greedy exact match
on held-out problems), KL(fine-tuned || model) per token on held-out task text, and perplexity on
held-out task text and on held-out Python source.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torchao import quantize_

from .config import METHODS, DeltaCoMeConfig, delta_report
from .evaluate import kl_divergence, perplexity
from .pairs import PAIRS, load_pair

__all__ = ["compare", "format_table"]

LABELS = {
    "deltacome": "Delta-CoMe (8/3/2-bit, RTN)",
    "single": "single precision (2-bit)",
    "lowrank": "low-rank (fp16)",
    "bitdelta": "BitDelta (sign + scale)",
}


def _row(label, model, reference, task, batches, n_problems, delta_bytes=None, bits=None, seconds=None):
    return {
        "method": label,
        "delta_bytes": delta_bytes,
        "bits_per_param": bits,
        "accuracy": task.accuracy(model, n=n_problems),
        "kl": kl_divergence(model, reference, batches["task"]),
        "ppl_task": perplexity(model, batches["task"]),
        "ppl_python": perplexity(model, batches["python"]),
        "seconds": seconds,
    }


def compare(pair: str = "llama-arith", alpha: float = 1 / 16, methods=METHODS, n_problems: int = 200,
            group_size: int = 128, progress: bool = True) -> list[dict]:
    """Evaluate base, fine-tuned and each method's compressed model on `pair`; one dict per row."""
    torch.manual_seed(0)
    base, finetuned = load_pair(pair)
    task = PAIRS[pair].task
    batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
    rows = [
        _row("base", base, finetuned, task, batches, n_problems),
        _row("fine-tuned", finetuned, finetuned, task, batches, n_problems),
    ]
    for method in methods:
        model = copy.deepcopy(finetuned)
        start = time.perf_counter()
        with torch.no_grad():
            quantize_(model, DeltaCoMeConfig(base=base, alpha=alpha, method=method, group_size=group_size, progress=progress))
        seconds = time.perf_counter() - start
        report = delta_report(model)
        nbytes = sum(r["delta_bytes"] for r in report)
        params = sum(r["shape"][0] * r["shape"][1] for r in report)
        rows.append(_row(LABELS.get(method, method), model, finetuned, task, batches, n_problems,
                         nbytes, 8 * nbytes / params, seconds))
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    head = "| method | delta bytes | bits/param | accuracy | KL to fine-tuned | ppl (task) | ppl (python) |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nbytes = "—" if r["delta_bytes"] is None else f"{r['delta_bytes']:,}"
        bits = "—" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        lines.append(
            f"| {r['method']} | {nbytes} | {bits} | {r['accuracy']:.1%} | {r['kl']:.4f} | "
            f"{r['ppl_task']:.3f} | {r['ppl_python']:.2f} |"
        )
    return "\n".join(lines)


def _write_json_atomic(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="llama-arith", choices=sorted(PAIRS))
    p.add_argument("--alpha", type=float, default=1 / 16, help="delta bytes / fp16 bytes (default 1/16)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--problems", type=int, default=200, help="held-out problems for accuracy")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = compare(args.pair, args.alpha, args.methods, args.problems, args.group_size)
    title = f"{args.pair}, alpha = {args.alpha:g} ({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads)"
    print(format_table(rows, title))
    if args.json:
        _write_json_atomic(args.json, {"pair": args.pair, "alpha": args.alpha, "rows": rows})


if __name__ == "__main__":
    main()
