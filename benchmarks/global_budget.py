"""Issue 15: paper / optimal / global allocation, data-free and self-calibrated, over alpha, on the zoo.

    python benchmarks/global_budget.py                      # 3 zoo pairs x 4 alphas x 7 variants (~35 min, 2 cores)
    python benchmarks/global_budget.py --pairs llama-arith  # one pair (results merged into the JSON)
    python benchmarks/global_budget.py --plot               # only print the table, redraw docs/img/global-budget-*.png
    python benchmarks/global_budget.py --quick              # check the script: llama-arith, 1/16, 3 variants, 16 problems

Variants (method "deltacome", group size 128, same layers for all):
- data-free (RTN): `paper`, `optimal` (per-matrix widths), `global` (one model-level budget, weight-space
  σ²-weighted error as the proxy);
- self-calibrated (no user data: `calibration="self"`, 64 sequences of 128 tokens sampled from the
  fine-tuned model, GPTQ with `target_correction=True`): `paper+self`, `optimal+self`, `global+self`
  (the global proxy: each layer's output error weighted by the diagonal Fisher of its outputs on the
  samples);
- `global+task`: the same as `global+self`, calibrated on 128 training problems of the task instead
  (what the self-calibration is compared against).
Metrics: greedy exact-match accuracy on 200 held-out problems; KL(fine-tuned || compressed) per answer
token on 64 held-out problems; stored delta bytes / fp16 bytes of the compressed matrices.
Writes benchmarks/results/global-budget.json (rows of other pairs are kept) and docs/img/global-budget-*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deltacome_ao import DeltaCoMeConfig, compress_, delta_report  # noqa: E402
from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402
from deltacome_ao.evaluation.compare import calibration_batches  # noqa: E402
from deltacome_ao.evaluation.metrics import kl_divergence  # noqa: E402
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair  # noqa: E402
from deltacome_ao.self_calibration import SelfCalibration, sample_sequences  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "global-budget.json"
IMG = REPO / "docs" / "img"
ALPHAS = ("1/16", "1/24", "1/32", "1/48")
VARIANTS = ("paper", "optimal", "global", "paper+self", "optimal+self", "global+self", "global+task")


def variant_fields(variant: str, self_samples, task_samples) -> dict:
    allocation, _, calibration = variant.partition("+")
    fields = {"allocation": allocation}
    if calibration:
        fields["calibration"] = self_samples if calibration == "self" else task_samples
        fields["target_correction"] = True
    return fields


def run(pairs, alphas, variants, n_problems, kl_batches, spec, n_task) -> list[dict]:
    rows = []
    for pair in pairs:
        torch.manual_seed(0)
        base, ft = load_pair(pair)
        task = PAIRS[pair].task
        batches = task.text_batches("task", n_batches=kl_batches)
        ft_acc = task.accuracy(ft, n=n_problems)
        start = time.perf_counter()
        # sampled once per pair: the same sequences compress_ would sample with calibration=spec
        self_samples = sample_sequences(ft, spec) if any("+self" in v for v in variants) else None
        sample_s = time.perf_counter() - start
        task_samples = calibration_batches(task, n=n_task) if any("+task" in v for v in variants) else None
        for alpha in alphas:
            for variant in variants:
                model = copy.deepcopy(ft)
                start = time.perf_counter()
                with torch.no_grad():
                    compress_(model, DeltaCoMeConfig(base=base, alpha=float(Fraction(alpha)), progress=False,
                                                     **variant_fields(variant, self_samples, task_samples)))
                seconds = time.perf_counter() - start
                report = delta_report(model)
                nbytes = sum(r["delta_bytes"] for r in report)
                fp16 = sum(2 * math.prod(r["shape"]) for r in report)
                plan = getattr(model, "deltacome_plan", None)
                acc = task.accuracy(model, n=n_problems)
                row = {"pair": pair, "alpha": alpha, "variant": variant, "accuracy": acc,
                       "fine_tuned_accuracy": ft_acc, "kept": acc / ft_acc if ft_acc else None,
                       "kl": kl_divergence(model, ft, batches, start=task.answer_start),
                       "delta_bytes": nbytes, "ratio": nbytes / fp16, "seconds": seconds,
                       "sampling_seconds": sample_s if "+self" in variant else None}
                if plan is not None:
                    row["plan"] = {"solver": plan.solver, "objective": plan.objective,
                                   "per_matrix_objective": plan.per_matrix_objective,
                                   "lower_bound": plan.lower_bound, "sensitivity": plan.sensitivity}
                    row["bits_per_param"] = {r["name"]: r["bits_per_param"] for r in report}
                rows.append(row)
                print(f"| {pair} | {alpha} | {variant} | {acc:.1%} ({row['kept']:.0%}) | {row['kl']:.4f} | "
                      f"{row['ratio']:.5f} | {seconds:.1f} s |", flush=True)
    return rows


def plot(rows, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = sorted({r["pair"] for r in rows}, key=lambda p: (p not in ZOO, p))
    styles = {"paper": ("tab:gray", "-"), "optimal": ("tab:blue", "-"), "global": ("tab:red", "-"),
              "paper+self": ("tab:gray", "--"), "optimal+self": ("tab:blue", "--"), "global+self": ("tab:red", "--"),
              "global+task": ("tab:green", ":")}
    for metric, label, log in (("kept", "accuracy / fine-tuned accuracy", False), ("kl", "KL(fine-tuned || compressed), nats/token", True)):
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
        for ax, pair in zip(axes[0], pairs):
            for variant, (color, ls) in styles.items():
                pts = sorted(((float(Fraction(r["alpha"])), r[metric]) for r in rows
                              if r["pair"] == pair and r["variant"] == variant), reverse=True)
                if pts:
                    ax.plot([1 / a for a, _ in pts], [max(v, 1e-6) if log else v for _, v in pts], color=color,
                            linestyle=ls, marker="o", ms=3, label=variant)
            ax.set_title(pair)
            ax.set_xlabel("1 / alpha (compression of the delta vs fp16)")
            ax.set_xticks([16, 24, 32, 48])
            if log:
                ax.set_yscale("log")
            else:
                ax.axhline(0.9, color="k", lw=0.6, ls=":")
                ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(label)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = img_dir / f"global-budget-{'accuracy' if metric == 'kept' else 'kl'}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def table(rows) -> str:
    """Markdown: one line per pair and alpha; per variant accuracy (share of the fine-tune's) and KL."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    head = "| pair | alpha | " + " | ".join(variants) + " |"
    lines = [head, "|---|---|" + "---:|" * len(variants)]
    cells = {(r["pair"], r["alpha"], r["variant"]): r for r in rows}
    for pair in sorted({r["pair"] for r in rows}, key=lambda p: (p not in ZOO, p)):
        for alpha in ALPHAS:
            got = [cells.get((pair, alpha, v)) for v in variants]
            if not any(got):
                continue
            lines.append(f"| {pair} | {alpha} | " + " | ".join(
                "—" if r is None else f"{r['accuracy']:.1%} ({r['kept']:.0%}), {r['kl']:.4f}" for r in got) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=list(ZOO), choices=sorted(PAIRS))
    p.add_argument("--alphas", nargs="+", default=list(ALPHAS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--plot", action="store_true", help="only redraw the plots from the JSON")
    p.add_argument("--quick", action="store_true", help="check the script: llama-arith, 1/16, 3 variants, 16 problems")
    p.add_argument("--json", type=Path, help=f"default {OUT.relative_to(REPO)} (--quick: a temporary file)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    quick_dir = Path(tempfile.gettempdir()) / "deltacome-benchmarks"
    out = args.json or (quick_dir / "global-budget.json" if args.quick else OUT)
    img = quick_dir / "img" if args.quick else IMG
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.plot:
        print(table(old["rows"]))
        print("\n".join(str(p) for p in plot(old["rows"], img)))
        return
    if args.quick:
        rows = run(["llama-arith"], ["1/16"], ["paper", "global", "global+self"], 16, 1,
                   SelfCalibration(samples=8, length=32), 16)
    else:
        rows = run(args.pairs, args.alphas, args.variants, args.problems, 4, SelfCalibration(), 128)
    done = {(r["pair"], r["alpha"], r["variant"]) for r in rows}
    merged = [r for r in old["rows"] if (r["pair"], r["alpha"], r["variant"]) not in done] + rows
    command = " ".join(["python benchmarks/global_budget.py", *argv])
    write_text_atomic(out, json.dumps({"command": command, "rows": merged}, indent=1))
    print(f"wrote {out}")
    print(table(merged))
    print("\n".join(str(p) for p in plot(merged, img)))


if __name__ == "__main__":
    main()
