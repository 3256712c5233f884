"""What serving a Delta-CoMe delta as a LoRA adapter costs, measured on the zoo.

    python benchmarks/lora_export.py            # 3 pairs, ~10 min on 2 cores -> results JSON + the table in docs/lora.md
    python benchmarks/lora_export.py --quick    # llama-arith only, no docs

For each zoo pair: the fine-tune is compressed with Delta-CoMe (alpha 1/16, RTN, group 128) and saved
as a delta artifact; that delta is exported with `export_lora` under each rank cap R and each way of
handling what LoRA engines cannot hold, loaded back with `PeftModel.from_pretrained(base, adapter)`,
and measured against the Delta-CoMe model (the thing being exported): greedy accuracy on 200
held-out problems and KL(Delta-CoMe || adapter) per answer token of held-out problems.

Rows (what is exported):
  * vLLM, linear only      `--vllm --embeddings drop`: the projections' LoRA (fp16); embeddings, lm_head,
                            norms (and biases) dropped — what a plain vLLM LoRA of the projections serves
  * vLLM, + emb/lm_head    `--vllm`: plus embed_tokens / lm_head deltas as LoRA targets of rank ≤ R (fp16);
                            norms and biases dropped
  * vLLM, + emb, calibrated the same, with each layer's directions chosen in output space (calibration:
                            128 training problems of the task; `export_lora(calibration=...)`)
  * PEFT, modules_to_save  projections' LoRA (fp32) + embeddings / lm_head / norms whole, biases as lora_bias
Rank caps: R = 64, 256, 512 (the ranks people ask vLLM for) and full; the zoo's models are 16-25x
narrower than Llama-2-7B (hidden 256 / 192 / 160 vs 4096) and their deltas' ranks are <= 63 at alpha
1/16, so the same caps scaled to the zoo's width (R x hidden / 4096) are measured too. At the scaled
ranks of 256 and 512 the ways of choosing the kept directions are compared (PEFT + modules_to_save,
so only the projections' LoRA differs): the first R stored vectors; the top R singular directions of
the dequantized delta (default, data-free); the top R output-space directions (calibrated); and the
global allocations (the same total parameters spent on the largest sigma^2 per parameter across
modules, weight- or output-space; PEFT rank_pattern).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from deltacome_ao import DeltaCoMeConfig, compress_, export_lora, save_delta
from deltacome_ao.evaluation.compare import calibration_batches, write_text_atomic
from deltacome_ao.evaluation.metrics import kl_divergence
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair

ROOT = Path(__file__).resolve().parents[1]
RANKS = (64, 256, 512, None)
LLAMA_7B_HIDDEN = 4096
CONFIGS = {
    "vllm-linear": ("vLLM, linear only", dict(vllm=True, embeddings="drop")),
    "vllm-emb": ("vLLM, + emb/lm_head LoRA", dict(vllm=True, embeddings="lora")),
    "vllm-emb-calib": ("vLLM, + emb/lm_head LoRA, calibrated", dict(vllm=True, embeddings="lora", calibrated=True)),
    "peft-full": ("PEFT, + modules_to_save", dict(dtype="float32", embeddings="full")),
}
SELECTIONS = {  # at the scaled ranks of 256 and 512, PEFT + modules_to_save (only the linear LoRA differs)
    "first R stored vectors": dict(selection="stored"),
    "top R singular directions": dict(),
    "top R output-space directions (calibrated)": dict(calibrated=True),
    "global σ² allocation (rank_pattern)": dict(allocation="global"),
    "global output-space allocation (calibrated)": dict(allocation="global", calibrated=True),
}
BEGIN, END = "<!-- BEGIN lora_export table -->", "<!-- END lora_export table -->"


def measure(model, reference, task, batches, n_problems) -> dict:
    return {"accuracy": task.accuracy(model, n=n_problems),
            "kl": kl_divergence(model, reference, batches, start=task.answer_start)}


def load_adapter(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()


def run_pair(pair: str, n_problems: int, tmp: Path, ranks=RANKS, selections: bool = True) -> dict:
    torch.manual_seed(0)
    base, finetuned = load_pair(pair)
    task = PAIRS[pair].task
    batches = task.text_batches("task")
    hidden = base.config.hidden_size
    compressed = copy.deepcopy(finetuned)
    with torch.no_grad():
        compress_(compressed, DeltaCoMeConfig(base=base, progress=False))
    delta = save_delta(compressed, tmp / f"{pair}-delta", base=base, overwrite=True)
    entry = {"pair": pair, "hidden": hidden, "rows": [],
             "reference": {"base": measure(base, compressed, task, batches, n_problems),
                           "fine-tuned": measure(finetuned, compressed, task, batches, n_problems),
                           "deltacome": measure(compressed, compressed, task, batches, n_problems)}}
    scaled = {r: max(1, round(r * hidden / LLAMA_7B_HIDDEN)) for r in RANKS if r is not None}
    caps = [("abs", r, r) for r in ranks] + [("scaled", r, scaled[r]) for r in ranks if r is not None]

    calibration = calibration_batches(task)  # 128 training problems (never the held-out ones)

    def row(config, cap_kind, cap_label, cap, how=None, **extra):
        label, options = CONFIGS[config]
        options = {**options, **extra}
        if options.pop("calibrated", False):
            options["calibration"] = calibration
        if cap is not None:
            options["max_rank" if options.get("vllm") else "rank"] = cap
        out = tmp / f"{pair}-{config}-{cap_kind}-{cap}-{how}"
        start = time.perf_counter()
        report = export_lora(base, delta, out, overwrite=True, **options)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            metrics = measure(load_adapter(base, out), compressed, task, batches, n_problems)
        ranks = [m["rank"] for m in report["modules"].values()]
        entry["rows"].append({
            "config": config, "label": label, "cap_kind": cap_kind, "cap_label": cap_label, "cap": cap,
            "how": how, "calibrated": report["calibrated"],
            "selection": options.get("selection", "svd"), "allocation": options.get("allocation", "uniform"),
            "r": report["r"], "module_ranks": [min(ranks), max(ranks)], "linear_rel_error": report["linear_rel_error"],
            "adapter_bytes": report["bytes"]["adapter"], "delta_bytes": report["bytes"]["delta_artifact"],
            "not_represented": report["not_represented"], "export_seconds": seconds, **metrics})

    for cap_kind, cap_label, cap in caps:
        for config in CONFIGS:
            row(config, cap_kind, cap_label, cap)
    for label in (256, 512) if selections else ():
        for how, options in SELECTIONS.items():
            row("peft-full", "scaled", label, scaled[label], how=how, **options)
    return entry


def table(results: dict) -> str:
    lines = []
    for entry in results["pairs"]:
        ref = entry["reference"]
        lines += [f"**{entry['pair']}** (hidden {entry['hidden']}): fine-tuned {ref['fine-tuned']['accuracy']:.1%}, "
                  f"Delta-CoMe delta {ref['deltacome']['accuracy']:.1%} (artifact tensors {entry['rows'][0]['delta_bytes']:,} B), "
                  f"base {ref['base']['accuracy']:.1%} (KL {ref['base']['kl']:.3f})", ""]
        head = "| rank cap R | " + " | ".join(f"{CONFIGS[c][0]}: acc / KL" for c in CONFIGS) + " | r (vLLM) | adapter bytes (vLLM, + emb) |"
        lines += [head, "|---|" + "---:|" * (len(CONFIGS) + 2)]
        main = [r for r in entry["rows"] if r["how"] is None]
        for cap_kind, cap_label in dict.fromkeys((r["cap_kind"], r["cap_label"]) for r in main):
            rows = {r["config"]: r for r in main if (r["cap_kind"], r["cap_label"]) == (cap_kind, cap_label)}
            cap = rows["vllm-linear"]["cap"]
            name = "full" if cap is None else (f"{cap}" if cap_kind == "abs" else f"{cap} (= {cap_label} at 4096)")
            cells = " | ".join(f"{rows[c]['accuracy']:.1%} / {max(rows[c]['kl'], 0.0):.4f}" for c in CONFIGS)
            lines.append(f"| {name} | {cells} | {rows['vllm-emb']['r']} | {rows['vllm-emb']['adapter_bytes']:,} |")
        lines.append("")
        sel = [r for r in entry["rows"] if r["how"] is not None]
        caps = sorted({(r["cap"], r["cap_label"]) for r in sel})
        lines += ["Which directions (PEFT, + modules_to_save; R = " + ", ".join(f"{c} (= {l} at 4096)" for c, l in caps)
                  + "):", "", "| selection | " + " | ".join(f"R = {c}: acc / KL / weight rel. error" for c, _ in caps) + " |",
                  "|---|" + "---:|" * len(caps)]
        for how in SELECTIONS:
            cells = []
            for c, _ in caps:
                r = next(r for r in sel if r["how"] == how and r["cap"] == c)
                cells.append(f"{r['accuracy']:.1%} / {max(r['kl'], 0.0):.4f} / {r['linear_rel_error']:.3f}")
            lines.append(f"| {how} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_docs(text: str, path: Path) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}{END}", doc, flags=re.S)
    write_text_atomic(path, new)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="llama-arith only, no docs")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check mode: llama-arith, 8 problems, ranks 512 and full, no selection rules; JSON to "
                        "$TMPDIR/deltacome-benchmarks/lora-export.json, no docs")
    p.add_argument("--pairs", nargs="+", default=None, choices=sorted(PAIRS))
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--render", type=Path, help="only re-render the docs table from this results JSON")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        write_docs(table(results) + f"\n`python benchmarks/lora_export.py`: {results['seconds']:.0f} s on "
                   f"{results['threads']} threads.\n", ROOT / "docs" / "lora.md")
        return
    torch.set_num_threads(2)
    if args.smoke:
        args.quick, args.problems = True, 8
        args.json = args.json or Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "lora-export.json"
    pairs = args.pairs or (["llama-arith"] if args.quick else list(ZOO))
    ranks = (512, None) if args.smoke else RANKS
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-export-") as tmp:
        results = {"pairs": [run_pair(pair, args.problems, Path(tmp), ranks, not args.smoke) for pair in pairs],
                   "alpha": 1 / 16, "torch": torch.__version__, "threads": torch.get_num_threads()}
    results["seconds"] = round(time.perf_counter() - start, 1)
    text = table(results)
    print(text)
    out = args.json or ROOT / "benchmarks" / "results" / f"lora-export{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    if not args.quick and not args.no_docs:
        write_docs(text + f"\n`python benchmarks/lora_export.py`: {results['seconds']:.0f} s on {results['threads']} threads.\n",
                   ROOT / "docs" / "lora.md")
    print(f"wrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
