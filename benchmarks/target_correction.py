"""Does DeltaMix's reconstruction-target correction help GPTQ? Side by side on the zoo.

    python benchmarks/target_correction.py          # ~2 min on 2 cores -> benchmarks/results/target-correction.json
    python benchmarks/target_correction.py --quick  # check the script: llama-arith, 1/16, paper, 16 problems (~20 s)

For each zoo pair, alpha 1/16 and 1/32, paper and optimal allocation, GPTQ calibration on 128
training problems: with and without `DeltaCoMeConfig(target_correction=True)` (Û quantized toward
the least-squares target that best reproduces the layer's full delta outputs given the quantized
V̂). Accuracy on 200 held-out problems and KL(fine-tuned || compressed) per answer token.
`--quick` writes to a temporary file unless `--json` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchao import quantize_  # noqa: E402

from deltacome_ao import DeltaCoMeConfig  # noqa: E402
from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402
from deltacome_ao.evaluation.compare import calibration_batches, measure_row  # noqa: E402
from deltacome_ao.evaluation.pairs import PAIRS, ZOO, load_pair  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "target-correction.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="check the script: llama-arith, alpha 1/16, paper allocation, 16 problems, 32 calibration "
                        "problems, JSON to a temporary file")
    p.add_argument("--json", type=Path, help=f"default {OUT.relative_to(OUT.parents[2])} (--quick: a temporary file)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    pairs = ["llama-arith"] if args.quick else list(ZOO)
    alphas = ["1/16"] if args.quick else ["1/16", "1/32"]
    allocations = ["paper"] if args.quick else ["paper", "optimal"]
    n_problems, n_calibration = (16, 32) if args.quick else (200, 128)
    out = args.json or (Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "target-correction.json"
                        if args.quick else OUT)
    rows = []
    for pair in pairs:
        base, ft = load_pair(pair)
        task = PAIRS[pair].task
        batches = {"task": task.text_batches("task", n_batches=1 if args.quick else 4),
                   "python": task.text_batches("python", n_batches=1 if args.quick else 4)}
        calibration = calibration_batches(task, n=n_calibration)
        for alpha in alphas:
            for allocation in allocations:
                got = {}
                for correction in (False, True):
                    model = copy.deepcopy(ft)
                    with torch.no_grad():
                        quantize_(model, DeltaCoMeConfig(
                            base=base, alpha=float(Fraction(alpha)), allocation=allocation,
                            calibration=calibration, target_correction=correction, progress=False))
                    got[correction] = measure_row("", model, ft, task, batches, n_problems)
                rows.append({"pair": pair, "alpha": alpha, "allocation": allocation,
                             "accuracy": [got[False]["accuracy"], got[True]["accuracy"]],
                             "kl": [got[False]["kl"], got[True]["kl"]]})
                r = rows[-1]
                print(f"| {pair} | {alpha} | {allocation} | {r['accuracy'][0]:.1%} → {r['accuracy'][1]:.1%} | "
                      f"{r['kl'][0]:.4f} → {r['kl'][1]:.4f} |", flush=True)
    command = " ".join(["python benchmarks/target_correction.py", *argv])
    write_text_atomic(out, json.dumps({"command": command, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
