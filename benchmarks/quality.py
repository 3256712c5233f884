"""Quality of Delta-CoMe and the baselines on the zoo of real pairs, over budgets.

    python benchmarks/quality.py            # full: 3 pairs x alpha 1/8, 1/16, 1/32 x 7 methods (~25 min, 2 cores)
    python benchmarks/quality.py --quick    # CI: llama-arith, alpha 1/16, 7 methods (~2 min)
    python benchmarks/quality.py --smoke    # check the script: llama-arith, 1/16, 3 methods, 8 problems (~20 s)

For each pair and alpha, every method compresses the same layers (the recipe's attention and MLP
projections) at the same byte budget (BitDelta has no budget knob: always ~1 bit/param). Metrics:
task accuracy (greedy exact match, held-out problems), KL(fine-tuned || compressed) per answer token,
perplexity of the answer tokens, activation error of low / middle / high decoder layers, and
compression time. Activation error of a layer is ||X (W_c - W_ft)^T|| / ||X (W_ft - W_base)^T||
(Frobenius; X = the fine-tuned model's inputs to that layer on held-out task text): the fraction of
the fine-tune's effect on that layer's output that compression lost, comparable across layers and
pairs (the paper's Table 8 reports the unnormalised error).

Writes benchmarks/results/quality[-quick].json (atomically), and with --docs (default for the full
run) docs/quality.md plus plots in docs/img/ (`--docs-dir` to change): singular-value spectra of
deltas vs raw weights per layer type, bits per singular vector (paper schedule vs optimal), and
accuracy vs alpha. --smoke writes the JSON, quality.md and the plots into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deltacome_ao.bitdelta_tensor import BitDeltaTensor  # noqa: E402
from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402
from deltacome_ao.evaluation.compare import VARIANTS, compress_variant, measure_row  # noqa: E402
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair  # noqa: E402
from deltacome_ao.mixed_precision_delta_tensor import BudgetTooSmallError, MixedPrecisionDeltaTensor  # noqa: E402

ROOT = REPO
METHODS = ("lowrank", "bitdelta", "single", "deltacome", "deltacome-gptq", "deltacome-optimal", "deltacome-optimal-gptq")
SHORT = {
    "lowrank": "low-rank", "bitdelta": "BitDelta", "single": "single 2-bit", "deltacome": "paper RTN",
    "deltacome-gptq": "paper GPTQ", "deltacome-optimal": "optimal RTN", "deltacome-optimal-gptq": "optimal GPTQ",
}
ALPHAS = ("1/8", "1/16", "1/32")
COMPRESSED = (MixedPrecisionDeltaTensor, BitDeltaTensor)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _depth_group(index: int, n_layers: int) -> str:
    """Decoder layers split into thirds: low / mid / high (4 layers: 0 | 1, 2 | 3)."""
    third = index * 3 / n_layers
    return "low" if third < 1 else ("mid" if third < 2 else "high")


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs [tokens, in_features] of the named linears on `batches` (the fine-tuned model's)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [
        modules[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names
    ]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).float() for n, v in seen.items()}


@torch.no_grad()
def activation_errors(compressed, finetuned, base, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean relative activation error per depth group (see the module docstring)."""
    ft, bs, cm = dict(finetuned.named_modules()), dict(base.named_modules()), dict(compressed.named_modules())
    n_layers = finetuned.config.num_hidden_layers
    groups = defaultdict(list)
    for name, x in inputs.items():
        w_ft = ft[name].weight.float()
        delta_out = x @ (w_ft - bs[name].weight.float()).T
        err_out = x @ (cm[name].weight.dequantize().float() - w_ft).T
        groups[_depth_group(_layer_index(name), n_layers)].append((err_out.norm() / delta_out.norm()).item())
    return {g: sum(v) / len(v) for g, v in groups.items()}


@torch.no_grad()
def spectra(finetuned, base, names: list[str]) -> dict:
    """Per layer kind: normalised singular values of delta and of the base weight, averaged over layers,
    and the share of energy (sum of sigma^2) in the top 10 % of singular values."""
    ft, bs = dict(finetuned.named_modules()), dict(base.named_modules())
    out = {}
    for kind in KINDS:
        rows = {"delta": [], "weight": []}
        for name in (n for n in names if n.endswith(kind)):
            w_b = bs[name].weight.float()
            for label, m in (("delta", ft[name].weight.float() - w_b), ("weight", w_b)):
                rows[label].append(torch.linalg.svdvals(m))
        if not rows["delta"]:
            continue
        entry = {}
        for label, svs in rows.items():
            top = [(s[: max(1, math.ceil(0.1 * len(s)))].pow(2).sum() / s.pow(2).sum()).item() for s in svs]
            r90 = [int((torch.cumsum(s.pow(2), 0) / s.pow(2).sum() < 0.9).sum()) + 1 for s in svs]
            entry[label] = {
                "normalized_sv": (torch.stack([s / s[0] for s in svs]).mean(0)).tolist(),
                "top10pct_energy": sum(top) / len(top),
                "rank_for_90pct_energy": sum(r90) / len(r90),
                "rank": len(svs[0]),
            }
        out[kind] = entry
    return out


def widths(weight) -> list[int]:
    """Bit-width of each singular vector of a compressed weight, in singular-value order."""
    if not isinstance(weight, MixedPrecisionDeltaTensor):
        return []
    return [b.bits for b in weight.bands for _ in range(b.count)]


def run(pairs, alphas, methods, n_problems: int, progress: bool) -> dict:
    torch.manual_seed(0)
    results = {"pairs": {}, "threads": torch.get_num_threads(), "n_problems": n_problems}
    for pair in pairs:
        base, finetuned = load_pair(pair)
        task = PAIRS[pair].task
        batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
        names = None
        entry = {"arch": finetuned.config.model_type, "task": type(task).__name__, "rows": []}
        for ref_label, ref in (("base", base), ("fine-tuned", finetuned)):
            entry["rows"].append({"alpha": None, "variant": ref_label, **measure_row(ref_label, ref, finetuned, task, batches, n_problems)})
        for alpha_text in alphas:
            alpha = float(Fraction(alpha_text))
            for name in methods:
                try:
                    model, seconds, nbytes, bits = compress_variant(finetuned, base, task, name, alpha, progress=progress)
                except BudgetTooSmallError as e:  # e.g. low-rank: one fp16 vector of a small GQA k_proj
                    entry["rows"].append({"alpha": alpha_text, "variant": name, "method": VARIANTS[name][0],
                                          "infeasible": str(e)})
                    print(f"{pair:13s} alpha {alpha_text:5s} {SHORT[name]:13s} infeasible: {e}", file=sys.stderr)
                    continue
                if names is None:
                    names = [n for n, m in model.named_modules()
                             if isinstance(getattr(m, "weight", None), COMPRESSED) and _layer_index(n) is not None]
                    inputs = layer_inputs(finetuned, batches["task"], names)
                    entry["spectra"] = spectra(finetuned, base, names)
                row = measure_row(VARIANTS[name][0], model, finetuned, task, batches, n_problems, (nbytes, bits), seconds)
                row.update(alpha=alpha_text, variant=name, activation_error=activation_errors(model, finetuned, base, inputs))
                sample = names[len(names) // 2]
                row["widths_sample"] = {"layer": sample, "widths": widths(dict(model.named_modules())[sample].weight)}
                entry["rows"].append(row)
                print(f"{pair:13s} alpha {alpha_text:5s} {SHORT[name]:13s} acc {row['accuracy']:.3f}  KL {row['kl']:.4f}  "
                      f"act err {row['activation_error']['mid']:.3f}  {seconds:.1f}s", file=sys.stderr)
        results["pairs"][pair] = entry
    return results


# --- reporting -----------------------------------------------------------------------------
def table(entry: dict) -> str:
    head = ("| alpha | method | bits/param | accuracy | KL (answers) | ppl (answers) | act. err low | mid | high | compress s |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in entry["rows"]:
        if r["alpha"] is None:
            lines.append(f"| — | {r['method']} | — | {r['accuracy']:.1%} | {r['kl']:.4f} | {r['ppl_task']:.3f} | | | | |")
            continue
        if "infeasible" in r:
            lines.append(f"| {r['alpha']} | {SHORT[r['variant']]} | — | infeasible: {r['infeasible'].split(': ', 1)[-1]} | | | | | | |")
            continue
        a = r["activation_error"]
        lines.append(
            f"| {r['alpha']} | {SHORT[r['variant']]} | {r['bits_per_param']:.3f} | {r['accuracy']:.1%} | {r['kl']:.4f} | "
            f"{r['ppl_task']:.3f} | {a['low']:.3f} | {a['mid']:.3f} | {a['high']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _rows(entry, alpha, variant):
    return next(r for r in entry["rows"] if r["alpha"] == alpha and r["variant"] == variant)


def _has(entry, alpha, variant) -> bool:
    """A measured (feasible) row exists for this alpha and variant."""
    return any(r["alpha"] == alpha and r["variant"] == variant and "infeasible" not in r for r in entry["rows"])


def claims(results: dict) -> dict:
    """The issue's claims (a)-(d), as numbers."""
    out = {}
    for pair, entry in results["pairs"].items():
        sp = entry["spectra"]
        c = {"a_top10pct_energy": {k: {"delta": v["delta"]["top10pct_energy"], "weight": v["weight"]["top10pct_energy"]}
                                   for k, v in sp.items()}}
        alphas = sorted({r["alpha"] for r in entry["rows"] if r["alpha"]}, key=lambda a: -Fraction(a))
        mean_err = lambda r: sum(r["activation_error"].values()) / len(r["activation_error"])  # noqa: E731
        for alpha in alphas:
            got = {v: _rows(entry, alpha, v) for v in METHODS if _has(entry, alpha, v)}
            c.setdefault("b_activation_error", {})[alpha] = {SHORT[v]: mean_err(r) for v, r in got.items()}
            for cal in ("", "-gptq"):
                p, o = got.get("deltacome" + cal), got.get("deltacome-optimal" + cal)
                if p and o:
                    c.setdefault("c_optimal_vs_paper", {})[f"{alpha}{' GPTQ' if cal else ' RTN'}"] = {
                        "error_ratio": mean_err(o) / mean_err(p), "accuracy_paper": p["accuracy"], "accuracy_optimal": o["accuracy"],
                    }
        ft_acc = next(r["accuracy"] for r in entry["rows"] if r["variant"] == "fine-tuned")
        c["d_accuracy_vs_alpha"] = {
            SHORT[v]: {a: _rows(entry, a, v)["accuracy"] / max(ft_acc, 1e-9) for a in alphas}
            for v in METHODS if all(_has(entry, a, v) for a in alphas)
        }
        out[pair] = c
    return out


def plots(results: dict, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pairs = list(results["pairs"])
    # 1. spectra: delta vs base weight, per layer kind, one panel per pair.
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for i, (kind, sp) in enumerate(results["pairs"][pair]["spectra"].items()):
            color = plt.cm.tab10(i)
            for label, style in (("delta", "-"), ("weight", ":")):
                sv = sp[label]["normalized_sv"]
                ax.plot(range(1, len(sv) + 1), sv, style, color=color, label=f"{kind} {label}" if label == "delta" else None)
        ax.set(title=f"{pair}: delta (solid) vs base weight (dotted)", xlabel="singular value index",
               ylabel="sigma_i / sigma_1", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    written.append(_save(fig, img_dir / "quality-spectra.png"))
    # 2. bits per singular vector: paper vs optimal, one sample layer per pair at alpha 1/16 (or the first alpha).
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        entry = results["pairs"][pair]
        alpha = "1/16" if any(r["alpha"] == "1/16" for r in entry["rows"]) else next(r["alpha"] for r in entry["rows"] if r["alpha"])
        for variant, style in (("deltacome", "-"), ("deltacome-optimal", "--"), ("deltacome-optimal-gptq", ":")):
            if _has(entry, alpha, variant):
                w = _rows(entry, alpha, variant)["widths_sample"]
                ax.step(range(len(w["widths"])), w["widths"], style, where="post", label=SHORT[variant])
                ax.set_title(f"{pair} {w['layer'].removeprefix('model.')} (alpha {alpha})", fontsize=9)
        ax.set(xlabel="singular vector index", ylabel="bits")
        ax.legend(fontsize=8)
    written.append(_save(fig, img_dir / "quality-bits.png"))
    # 3. accuracy vs alpha.
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        entry = results["pairs"][pair]
        alphas = sorted({r["alpha"] for r in entry["rows"] if r["alpha"]}, key=lambda a: Fraction(a))
        for v in METHODS:
            pts = [(float(Fraction(a)), _rows(entry, a, v)["accuracy"]) for a in alphas if _has(entry, a, v)]
            if pts:
                ax.plot(*zip(*pts), "o-", label=SHORT[v])
        ft_acc = next(r["accuracy"] for r in entry["rows"] if r["variant"] == "fine-tuned")
        ax.axhline(ft_acc, color="k", lw=0.8, ls="--", label="fine-tuned")
        ax.set(title=pair, xlabel="alpha (delta bytes / fp16 bytes)", ylabel="accuracy", xscale="log")
        ax.set_xticks([float(Fraction(a)) for a in alphas], alphas)
        ax.minorticks_off()
        ax.legend(fontsize=7)
    written.append(_save(fig, img_dir / "quality-accuracy-vs-alpha.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def claims_markdown(results: dict) -> str:
    """The claims (a)-(d) as tables."""
    c_all, out = results["claims"], []
    out += ["### (a) deltas are long-tailed, raw weights are not", "",
            "Share of energy (Σσ²) in the top 10 % of singular values, and the rank holding 90 % of it, "
            "averaged over layers (delta / base weight).", "",
            "| pair | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for pair, c in c_all.items():
        sp = results["pairs"][pair]["spectra"]
        cells = [f"{sp[k]['delta']['top10pct_energy']:.2f} / {sp[k]['weight']['top10pct_energy']:.2f}; "
                 f"r90 {sp[k]['delta']['rank_for_90pct_energy']:.0f} / {sp[k]['weight']['rank_for_90pct_energy']:.0f} "
                 f"of {sp[k]['delta']['rank']}" if k in sp else "—" for k in KINDS]
        out.append(f"| {pair} | " + " | ".join(cells) + " |")
    out += ["", "### (b) activation error at equal bytes (mean of low / mid / high)", "",
            "| pair | alpha | " + " | ".join(SHORT[m] for m in METHODS) + " |", "|---|---|" + "---:|" * len(METHODS)]
    for pair, c in c_all.items():
        for alpha, errs in c["b_activation_error"].items():
            out.append(f"| {pair} | {alpha} | " + " | ".join(f"{errs[SHORT[m]]:.3f}" if SHORT[m] in errs else "—"
                                                         for m in METHODS) + " |")
    out += ["", "### (c) optimal allocation vs the paper schedule", "",
            "| pair | alpha, quantizer | error ratio (optimal / paper) | accuracy paper → optimal |", "|---|---|---:|---|"]
    for pair, c in c_all.items():
        for key, v in c.get("c_optimal_vs_paper", {}).items():
            out.append(f"| {pair} | {key} | {v['error_ratio']:.2f} | {v['accuracy_paper']:.1%} → {v['accuracy_optimal']:.1%} |")
    alphas = ALPHAS
    out += ["", "### (d) accuracy as a fraction of the fine-tuned model's, by alpha", "",
            "| pair | method | " + " | ".join(alphas) + " |", "|---|---|" + "---:|" * len(alphas)]
    for pair, c in c_all.items():
        for method, by in c["d_accuracy_vs_alpha"].items():
            out.append(f"| {pair} | {method} | " + " | ".join(f"{by[a]:.2f}" if a in by else "—" for a in alphas) + " |")
    return "\n".join(out)


def markdown(results: dict, command: str) -> str:
    parts = [
        "# Quality on the zoo (`benchmarks/quality.py`)", "",
        f"Measured with `{command}` ({results['seconds']:.0f} s on {results['threads']} CPU threads; "
        f"accuracy on {results['n_problems']} held-out problems per pair). Generated by the script; do not edit by hand "
        "(the reading of these numbers is in `docs/results.md`).", "",
        "Activation error: ||X (W_c − W_ft)ᵀ|| / ||X (W_ft − W_base)ᵀ||, mean over the layers of each depth third, "
        "X = the fine-tuned model's inputs on held-out task text (1.0 = the whole fine-tune lost). "
        "BitDelta has no budget knob (always ~1 bit/param), so it is over budget at 1/32 and under at 1/8.", "",
    ]
    for pair, entry in results["pairs"].items():
        parts += [f"## {pair} ({entry['arch']}, {entry['task']})", "", table(entry), ""]
    parts += ["## Claims", "", claims_markdown(results), "",
              "## Plots", "",
              "![spectra](img/quality-spectra.png)", "", "![bits](img/quality-bits.png)", "",
              "![accuracy vs alpha](img/quality-accuracy-vs-alpha.png)", ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: llama-arith, alpha 1/16, 100 problems")
    p.add_argument("--smoke", action="store_true",
                   help="check the script: llama-arith, alpha 1/16, paper RTN / optimal RTN / BitDelta, 8 problems; "
                        "JSON, quality.md and plots in a temporary directory")
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), help=f"default: {' '.join(ZOO)}")
    p.add_argument("--alphas", nargs="+", help="budgets as fractions (default 1/8 1/16 1/32)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (--smoke: three)")
    p.add_argument("--problems", type=int, help="held-out problems per accuracy (default 200, quick 100)")
    p.add_argument("--json", type=Path, help="default benchmarks/results/quality[-quick].json (--smoke: temporary)")
    p.add_argument("--docs-dir", type=Path, help="where quality.md and img/ go (default docs/; --smoke: temporary)")
    p.add_argument("--replot", action="store_true", help="only regenerate docs and plots from the JSON")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                   help="write docs/quality.md and docs/img/quality-*.png (default: on for the full run)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    small = args.quick or args.smoke
    pairs = args.pairs or (["llama-arith"] if small else list(ZOO))
    alphas = args.alphas or (["1/16"] if small else list(ALPHAS))
    methods = args.methods or (["deltacome", "deltacome-optimal", "bitdelta"] if args.smoke else list(METHODS))
    for a in alphas:
        if not 0 < Fraction(a) <= 1:
            p.error(f"alpha {a!r} must be a fraction in (0, 1], like 1/16")
    n_problems = args.problems or (8 if args.smoke else 100 if args.quick else 200)
    scratch = Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "quality-smoke"
    out = args.json or (scratch / "quality.json" if args.smoke else
                        ROOT / "benchmarks" / "results" / ("quality-quick.json" if args.quick else "quality.json"))
    docs_dir = args.docs_dir or (scratch if args.smoke else ROOT / "docs")
    if args.replot:
        results = json.loads(out.read_text())
        command = results["command"]
        results["claims"] = claims(results)
    else:
        start = time.perf_counter()
        results = run(pairs, alphas, methods, n_problems, progress=False)
        results["seconds"] = time.perf_counter() - start
        results["claims"] = claims(results)
        command = " ".join(["python benchmarks/quality.py", *argv])
        results["command"] = command
    for pair, entry in results["pairs"].items():
        print(f"\n**{pair}** ({entry['arch']}, {entry['task']})\n\n{table(entry)}")
    print(f"\n{results['seconds']:.0f} s\n\n{claims_markdown(results)}")
    if not args.replot:
        write_text_atomic(out, json.dumps(results, indent=1))
        print(f"wrote {out}")
    if args.docs if args.docs is not None else (args.replot or args.smoke or not args.quick):
        for path in plots(results, docs_dir / "img"):
            print(f"wrote {path}")
        write_text_atomic(docs_dir / "quality.md", markdown(results, command))
        print(f"wrote {docs_dir / 'quality.md'}")


if __name__ == "__main__":
    main()
