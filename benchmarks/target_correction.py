"""Does DeltaMix's reconstruction-target correction help GPTQ? Side by side on the zoo.

    python benchmarks/target_correction.py      # ~2 min on 2 cores -> benchmarks/results/target-correction.json

For each zoo pair, alpha 1/16 and 1/32, paper and optimal allocation, GPTQ calibration on 128
training problems: with and without `DeltaCoMeConfig(target_correction=True)` (Û quantized toward
the least-squares target that best reproduces the layer's full delta outputs given the quantized
V̂). Accuracy on 200 held-out problems and KL(fine-tuned || compressed) per answer token.
"""

from __future__ import annotations

import copy
import json
import os
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig
from deltacome_ao.evaluation.compare import calibration_batches, measure_row, write_text_atomic
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair

OUT = Path(__file__).resolve().parent / "results" / "target-correction.json"


def main() -> None:
    rows = []
    for pair in ZOO:
        base, ft = load_pair(pair)
        task = PAIRS[pair].task
        batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
        calibration = calibration_batches(task)
        for alpha in ("1/16", "1/32"):
            for allocation in ("paper", "optimal"):
                got = {}
                for correction in (False, True):
                    model = copy.deepcopy(ft)
                    with torch.no_grad():
                        quantize_(model, DeltaCoMeConfig(
                            base=base, alpha=float(Fraction(alpha)), allocation=allocation,
                            calibration=calibration, target_correction=correction, progress=False))
                    got[correction] = measure_row("", model, ft, task, batches, 200)
                rows.append({"pair": pair, "alpha": alpha, "allocation": allocation,
                             "accuracy": [got[False]["accuracy"], got[True]["accuracy"]],
                             "kl": [got[False]["kl"], got[True]["kl"]]})
                r = rows[-1]
                print(f"| {pair} | {alpha} | {allocation} | {r['accuracy'][0]:.1%} → {r['accuracy'][1]:.1%} | "
                      f"{r['kl'][0]:.4f} → {r['kl'][1]:.4f} |", flush=True)
    write_text_atomic(OUT, json.dumps({"command": "python benchmarks/target_correction.py", "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
