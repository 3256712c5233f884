"""A real PEFT LoRA adapter compressed into a delta artifact: size and quality against the adapter.

    python benchmarks/lora_import.py             # ~1 min: the shipped adapter -> results JSON + the table in docs/lora.md
    python benchmarks/lora_import.py --retrain   # train the adapter again first (~3-5 min on 2 cores)

The adapter is `assets/lora/llama-json-r16`: PEFT LoRA, r = 16, lora_alpha = 32, on every projection
and lm_head of the zoo's llama-arith base, trained on the llama-json task (`python -m
deltacome_ao.evaluation.lora_train`, 200 steps, fixed seeds). `compress_lora` turns it into a delta
artifact at several budgets; each is loaded with `load_delta` and measured against the LoRA model
(`PeftModel.from_pretrained`): greedy accuracy on 200 held-out problems and KL(LoRA || compressed)
per answer token. Sizes: the adapter's LoRA tensors (fp32 as trained, and what bf16 would take) and
file, the artifact's packed factors and its files on disk.
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

from deltacome_ao import compress_lora, load_delta
from deltacome_ao.evaluation.compare import write_text_atomic
from deltacome_ao.evaluation.metrics import kl_divergence
from deltacome_ao.evaluation.pairs import PAIRS, load_pair

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "assets" / "lora" / "llama-json-r16"
PAIR = "llama-json"
VARIANTS = (
    ("Delta-CoMe 8/3/2, alpha 1/16", dict(alpha=1 / 16)),
    ("Delta-CoMe optimal bits, alpha 1/16", dict(alpha=1 / 16, allocation="optimal")),
    ("Delta-CoMe 8/3/2, alpha 1/32", dict(alpha=1 / 32)),
    ("Delta-CoMe optimal bits, alpha 1/32", dict(alpha=1 / 32, allocation="optimal")),
    ("Delta-CoMe optimal bits, alpha 1/64", dict(alpha=1 / 64, allocation="optimal")),
    ("low-rank fp16 (all r vectors), alpha 1", dict(alpha=1.0, method="lowrank")),
)
BEGIN, END = "<!-- BEGIN lora_import table -->", "<!-- END lora_import table -->"


def run(n_problems: int, tmp: Path) -> dict:
    from peft import PeftModel

    torch.manual_seed(0)
    base, finetuned = load_pair(PAIR)
    task = PAIRS[PAIR].task
    batches = task.text_batches("task")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(ADAPTER)).eval()
    train = json.loads((ADAPTER / "lora_train.json").read_text())

    def metrics(model):
        with torch.no_grad():
            return {"accuracy": task.accuracy(model, n=n_problems),
                    "kl": kl_divergence(model, lora, batches, start=task.answer_start)}

    rows = [{"label": "base", **metrics(base)}, {"label": "LoRA adapter (PEFT)", **metrics(lora)},
            {"label": "full fine-tune of the zoo (for reference)", **metrics(finetuned)}]
    for label, options in VARIANTS:
        out = tmp / re.sub(r"\W+", "-", label)
        start = time.perf_counter()
        report = compress_lora(base, ADAPTER, out, overwrite=True, **options)
        seconds = time.perf_counter() - start
        rows.append({"label": label, **options, "seconds": seconds, "compressed_bytes": report["compressed_bytes"],
                     "artifact_bytes": report["artifact_bytes"], "kept": report["kept"],
                     **metrics(load_delta(copy.deepcopy(base), out))})
    factors = report["adapter_tensor_bytes"]
    return {"pair": PAIR, "adapter": str(ADAPTER.relative_to(ROOT)), "train": train,
            "adapter_tensor_bytes": factors, "adapter_file_bytes": report["adapter_file_bytes"],
            "adapter_dtypes": report["adapter_dtypes"], "rows": rows, "torch": torch.__version__}


def table(results: dict) -> str:
    fp32 = results["adapter_tensor_bytes"]
    bf16 = fp32 // 2
    lines = [f"Adapter `{results['adapter']}` (r = {results['train']['recipe']['r']}, lora_alpha = "
             f"{results['train']['recipe']['lora_alpha']}, every projection + lm_head, {results['pair']} task): "
             f"LoRA tensors {fp32:,} B in fp32 as trained ({bf16:,} B in bf16), file {results['adapter_file_bytes']:,} B.", "",
             "| | packed factors (B) | vs fp32 LoRA | vs bf16 LoRA | artifact on disk (B) | accuracy | KL(LoRA ‖ ·) | compress s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        if "compressed_bytes" not in r:
            lines.append(f"| {r['label']} | — | — | — | — | {r['accuracy']:.1%} | {max(r['kl'], 0.0):.2e} | — |")
            continue
        c = r["compressed_bytes"]
        lines.append(f"| {r['label']} | {c:,} | {fp32 / c:.1f}x smaller | {bf16 / c:.1f}x smaller | "
                     f"{r['artifact_bytes']:,} | {r['accuracy']:.1%} | {max(r['kl'], 0.0):.2e} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retrain", action="store_true", help="train the adapter again (into assets/lora/llama-json-r16)")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check mode: 8 problems, JSON to $TMPDIR/deltacome-benchmarks/lora-import.json, no docs")
    args = p.parse_args(argv)
    if args.smoke:
        args.problems, args.no_docs = 8, True
        args.json = args.json or Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "lora-import.json"
    torch.set_num_threads(2)
    if args.retrain:
        from deltacome_ao.evaluation.lora_train import LoraRecipe, train_lora

        train_lora(LoraRecipe(), ADAPTER)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-import-") as tmp:
        results = run(args.problems, Path(tmp))
    results["seconds"] = round(time.perf_counter() - start, 1)
    text = table(results)
    print(text)
    out = args.json or ROOT / "benchmarks" / "results" / "lora-import.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        doc_path = ROOT / "docs" / "lora.md"
        doc = doc_path.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{doc_path} has no {BEGIN} ... {END} section")
        body = text + f"\n`python benchmarks/lora_import.py`: {results['seconds']:.0f} s on {torch.get_num_threads()} threads.\n"
        write_text_atomic(doc_path, re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                                           lambda _: f"{BEGIN}\n{body}{END}", doc, flags=re.S))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
