"""The main job: compress a real fine-tuned pair with Delta-CoMe and the baselines, print the table.

    python -m deltacome_ao.evaluation.compare [--pair llama-arith] [--alpha 0.0625] [--json out.json]

Every method compresses the same layers (the recipe's attention and MLP projections) at the same
byte budget; embeddings, norms and lm_head stay the fine-tuned model's in every row. Rows: the base
and the fine-tuned model as references, then each variant. Columns: delta bytes of the compressed
layers and their bits per parameter (everything stored counted), task accuracy (greedy exact match
on held-out problems), KL(fine-tuned || model) per answer token of held-out problems, perplexity of
those answer tokens and of held-out Python source, and the compression time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ..checkpoint import write_text_atomic
from ..compress import compress_, delta_report
from ..config import DeltaCoMeConfig
from .metrics import kl_divergence, perplexity
from .pairs import PAIRS, load_pair

__all__ = ["compare", "compress_variant", "format_table", "calibration_batches", "write_text_atomic", "measure_row", "VARIANTS"]

# name -> (label, DeltaCoMeConfig fields); "calibrated" rows get GPTQ calibration on training problems.
VARIANTS = {
    "deltacome": ("Delta-CoMe (8/3/2-bit, RTN)", dict(method="deltacome")),
    "deltacome-gptq": ("Delta-CoMe (8/3/2-bit, GPTQ)", dict(method="deltacome", calibrated=True)),
    "deltacome-optimal": ("Delta-CoMe, optimal bits (RTN)", dict(method="deltacome", allocation="optimal")),
    "deltacome-optimal-gptq": ("Delta-CoMe, optimal bits (GPTQ)",
                               dict(method="deltacome", allocation="optimal", calibrated=True)),
    "single": ("single precision (2-bit, RTN)", dict(method="single")),
    "lowrank": ("low-rank (fp16)", dict(method="lowrank")),
    "bitdelta": ("BitDelta (sign + scale)", dict(method="bitdelta")),
}


def measure_row(label, model, reference, task, batches, n_problems, size=None, seconds=None) -> dict:
    """One table row: accuracy on `n_problems` held-out problems, KL to `reference` and perplexity
    on the answers (`batches["task"]`), perplexity on Python (`batches["python"]`); `size` =
    (delta bytes, bits/param) of a compressed model, `seconds` its compression time."""
    answer_start = task.answer_start
    delta_bytes, bits = size if size is not None else (None, None)
    return {
        "method": label,
        "delta_bytes": delta_bytes,
        "bits_per_param": bits,
        "accuracy": task.accuracy(model, n=n_problems),
        "kl": kl_divergence(model, reference, batches["task"], start=answer_start),
        "ppl_task": perplexity(model, batches["task"], start=answer_start),
        "ppl_python": perplexity(model, batches["python"]),
        "seconds": seconds,
    }


def calibration_batches(task, n: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Training problems (never the held-out ones) as one batch of full sequences."""
    train = task.train_items()
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return [torch.tensor([task.example(*train[int(i)])[0] for i in idx])]


def compress_variant(finetuned, base, task, name: str, alpha: float = 1 / 16, group_size: int = 128,
                     progress: bool = True):
    """A compressed copy of `finetuned` by variant `name`: (model, seconds, delta bytes, bits/param)."""
    fields = dict(VARIANTS[name][1])
    if fields.pop("calibrated", False):
        fields["calibration"] = calibration_batches(task)
    model = copy.deepcopy(finetuned)
    start = time.perf_counter()
    with torch.no_grad():
        compress_(model, DeltaCoMeConfig(base=base, alpha=alpha, group_size=group_size, progress=progress, **fields))
    seconds = time.perf_counter() - start
    report = delta_report(model)
    nbytes = sum(r["delta_bytes"] for r in report)
    params = sum(math.prod(r["shape"]) for r in report)
    return model, seconds, nbytes, 8 * nbytes / params


def compare(pair: str = "llama-arith", alpha: float = 1 / 16, variants=tuple(VARIANTS), n_problems: int = 200,
            group_size: int = 128, progress: bool = True) -> list[dict]:
    """Evaluate base, fine-tuned and each variant's compressed model on `pair`; one dict per row."""
    torch.manual_seed(0)
    base, finetuned = load_pair(pair)
    task = PAIRS[pair].task
    batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
    rows = [
        measure_row("base", base, finetuned, task, batches, n_problems),
        measure_row("fine-tuned", finetuned, finetuned, task, batches, n_problems),
    ]
    for name in variants:
        model, seconds, nbytes, bits = compress_variant(finetuned, base, task, name, alpha, group_size, progress)
        rows.append(measure_row(VARIANTS[name][0], model, finetuned, task, batches, n_problems, (nbytes, bits), seconds))
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    head = "| method | delta bytes | bits/param | accuracy | KL to fine-tuned (answers) | ppl (answers) | ppl (python) | compress s |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nbytes = "—" if r["delta_bytes"] is None else f"{r['delta_bytes']:,}"
        bits = "—" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        secs = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['method']} | {nbytes} | {bits} | {r['accuracy']:.1%} | {r['kl']:.4f} | "
            f"{r['ppl_task']:.3f} | {r['ppl_python']:.2f} | {secs} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="llama-arith", choices=sorted(PAIRS))
    p.add_argument("--alpha", type=float, default=1 / 16, help="delta bytes / fp16 bytes (default 1/16)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--problems", type=int, default=200, help="held-out problems for accuracy")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = compare(args.pair, args.alpha, args.variants, args.problems, args.group_size)
    title = f"{args.pair}, alpha = {args.alpha:g} ({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads)"
    print(format_table(rows, title))
    if args.json:
        write_text_atomic(args.json, json.dumps({"pair": args.pair, "alpha": args.alpha, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
