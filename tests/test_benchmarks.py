"""Every script in benchmarks/ runs in its CPU quick / smoke mode, so a benchmark cannot rot unseen.

Each case runs one script as a child process from the repository root (`sys.executable
benchmarks/<script>.py <quick flag>`), with `TMPDIR` pointing at the test's own temporary
directory: the quick modes write their results under `tempfile.gettempdir()/deltacome-benchmarks/`
by default, and the test reads them from there. Each asserts exit status 0, that the results hold
the expected rows with finite numbers, and that nothing under benchmarks/results/ or docs/ changed.
GPU-only scripts run their host logic on CPU: the Triton kernels under the interpreter
(`TRITON_INTERPRET=1`), `kernels.py --aot` compiles for sm_90 without a GPU (and without the
interpreter). The slowest case takes about half a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUT = "deltacome-benchmarks"  # the quick modes' directory under tempfile.gettempdir()
TIMEOUT = 300


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def load(tmp: Path, name: str):
    return json.loads((tmp / OUT / name).read_text())


# --- what each run must have produced ----------------------------------------------------------------


def check_compressed_base(tmp, stdout):
    rows = {r["model"]: r for r in load(tmp, "compressed-base.json")["rows"]}
    assert list(rows) == ["fine-tuned", "fp32 base alone", "fp32 base + delta", "int8 base + delta",
                          "int8 base alone", "int8 fine-tuned"]
    for r in rows.values():
        assert finite(r["projection_bytes"], r["accuracy"], r["kl"], r["ppl_answers"]) and 0 <= r["accuracy"] <= 1, r
    assert rows["fine-tuned"]["kl"] == 0
    assert rows["int8 base + delta"]["projection_bytes"] < rows["fp32 base + delta"]["projection_bytes"]
    assert rows["fp32 base + delta"]["kl"] < rows["fp32 base alone"]["kl"]


def check_kernels_smoke(tmp, stdout):
    rows = load(tmp, "kernels-cpu-smoke.json")
    assert [(r["shape"], r["tokens"]) for r in rows] == [([136, 200], 1), ([136, 200], 17)]
    for r in rows:
        assert finite(r["base_us"], r["fused_us"], r["unfused_us"], r["delta_bytes"]) and r["rank"] > 0, r
        # every Triton path really ran (under the interpreter)
        want = {"gemm_fused", "gemm_dequant"} | ({"gemv"} if r["tokens"] <= 16 else set())
        assert set(r["paths_us"]) == want and finite(*r["paths_us"].values()), r
    e2e = load(tmp, "kernels-cpu-smoke-e2e.json")
    assert [r["weights"] for r in e2e] == ["base", "base+delta"]
    assert all("error" not in r and finite(r["tokens_per_s"]) and r["new_tokens"] == 4 for r in e2e), e2e
    tune = load(tmp, "kernels-cpu-smoke-tune.json")
    assert [r["kernel"] for r in tune] == ["GEMV", "GEMM"]
    assert all(r["tried"] == 2 and len(r["best"]) == 2 and finite(*(b["us"] for b in r["best"])) for r in tune), tune


def check_kernels_aot(tmp, stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("136x200 ")]
    assert [line.split()[2].rstrip(":") for line in lines] == ["gemv", "tproj", "gemm"], stdout
    assert all(" regs" in line and " B spilled" in line for line in lines), lines


def check_lm_eval_check(tmp, stdout):
    doc = load(tmp, "lm_eval_check.json")
    assert doc["pairs"] == ["llama-arith"] and doc["problems"] == 16
    assert [r["model"] for r in doc["rows"]] == ["base", "fine-tuned", "Delta-CoMe RTN alpha=0.0625"]
    for r in doc["rows"]:
        assert r["equal"] and r["n"] == 16 and finite(r["task_accuracy"], r["lm_eval_accuracy"]), r


def check_memory_table(tmp, stdout):
    t = load(tmp, "memory-table.json")
    rows = {r["setting"]: r for r in t["rows"]}
    assert len(rows) == 5 and t["ns"] == [2, 4, 8, 16, 32, 64]
    full = rows["uncompressed (N full bf16 models)"]
    shared = rows["Delta-CoMe a=1/16, kept shared"]
    assert 0 < 16 * shared["per_model_bytes"] < 1.01 * t["sizes"]["projection_bytes_bf16"]
    assert shared["max_n"]["80GB"] > 10 * full["max_n"]["80GB"] >= 10
    assert rows["Delta-CoMe a=1/32, kept shared"]["max_n"]["141GB"] > shared["max_n"]["141GB"]


def check_quality(tmp, stdout):
    doc = load(tmp, "quality-smoke/quality.json")
    entry = doc["pairs"]["llama-arith"]
    assert [r["variant"] for r in entry["rows"]] == ["base", "fine-tuned", "deltacome", "deltacome-optimal", "bitdelta"]
    for r in entry["rows"]:
        assert finite(r["accuracy"], r["kl"], r["ppl_task"], r["ppl_python"]) and 0 <= r["accuracy"] <= 1, r
        if r["alpha"]:
            assert r["alpha"] == "1/16" and finite(*r["activation_error"].values()) and r["widths_sample"]["layer"]
    claims = doc["claims"]["llama-arith"]
    assert set(claims["a_top10pct_energy"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    assert finite(claims["c_optimal_vs_paper"]["1/16 RTN"]["error_ratio"])
    docs = tmp / OUT / "quality-smoke"
    assert "## llama-arith" in (docs / "quality.md").read_text()
    for png in ("quality-spectra.png", "quality-bits.png", "quality-accuracy-vs-alpha.png"):
        assert (docs / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_serve_demo(tmp, stdout):
    s = load(tmp, "serve-demo.json")
    assert s["ok"] and s["wrong_answers"] == 0 and s["crashes"] == 0 and not s["hung_threads"], s
    assert s["requests_answered"] == 60 and s["outcomes"].get("ok", 0) > 0 and s["deltas"] == 3


def check_serving(tmp, stdout):
    doc = load(tmp, "serving-cpu-smoke.json")
    rows = doc["rows"]
    assert [(r["batch"], r["deltas"]) for r in rows] == [(2, 1), (6, 1), (6, 3)]
    for r in rows:
        assert finite(r["base_us"], r["segmented_us"], r["naive_us"], r["reference_us"]), r
        # the segmented kernel (interpreted) gives what one compressed model per delta gives
        assert finite(r["max_abs_diff_vs_naive"]) and r["max_abs_diff_vs_naive"] <= 1e-2 * r["max_abs_out"], r


def check_streaming(tmp, stdout):
    doc = load(tmp, "streaming-smoke.json")
    assert doc["pair"]["dims"] == {"hidden": 128, "mlp": 344, "heads": 4, "vocab": 256}
    assert doc["summary"]["compressed"] == 14 and doc["pair"]["shards"] > 1
    assert finite(doc["measured"]["wall_s"], doc["measured"]["peak_rss_bytes"]) and doc["measured"]["peak_rss_bytes"] > 0
    assert len(doc["error_check"]) == 14
    for r in doc["error_check"]:
        assert finite(r["rel_error"], r["not_rank64_share"]) and 0 < r["rel_error"] < 1, r
    assert doc["load_check"]["logits_finite"] and doc["load_check"]["compressed_layers"] == 14
    assert not any(p.name.startswith("deltacome-streaming-smoke-") for p in tmp.iterdir())  # the pair was deleted
    rows = load(tmp, "streaming-matrix-smoke.json")["rows"]
    assert [(r["shape"], r["dtype"]) for r in rows] == [(s, d) for d in ("float32", "bfloat16") for s in ("344x128", "128x344")]
    for r in rows:
        assert finite(r["peak_over_inputs_bytes"], r["seconds"]) and r["bands"] and not r["base_copied"], r


def check_target_correction(tmp, stdout):
    rows = load(tmp, "target-correction.json")["rows"]
    assert [(r["pair"], r["alpha"], r["allocation"]) for r in rows] == [("llama-arith", "1/16", "paper")]
    assert finite(*rows[0]["accuracy"], *rows[0]["kl"]) and all(0 <= a <= 1 for a in rows[0]["accuracy"])


def check_global_budget(tmp, stdout):
    rows = load(tmp, "global-budget.json")["rows"]
    assert [(r["pair"], r["alpha"], r["variant"]) for r in rows] == [
        ("llama-arith", "1/16", v) for v in ("paper", "global", "global+self")]
    assert all(finite(r["accuracy"], r["kl"], r["ratio"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["ratio"] <= 1 / 16 for r in rows)  # the model-level budget, every stored byte counted
    assert rows[1]["plan"]["objective"] <= rows[1]["plan"]["per_matrix_objective"]
    assert (tmp / OUT / "img" / "global-budget-accuracy.png").stat().st_size > 0


def check_architectures(tmp, stdout):
    doc = load(tmp, "architectures.json")
    rows = {r["arch"]: r for r in doc["rows"]}
    assert set(rows) == {"llama", "mixtral"} and not any(r["errors"] for r in rows.values()), rows
    assert all(r["share"] >= 0.95 and r["artifact_exact"] and r["hf_exact"] for r in rows.values())
    moe = doc["moe_size"]["every matmul weight (now)"]
    assert moe["ratio_to_changed_fp16"] < 0.1 < doc["moe_size"]["nn.Linear only (before)"]["ratio_to_changed_fp16"]
    assert doc["grouped"]["grouped_vs_loop_max_diff"] < 1e-4 and finite(doc["grouped"]["compressed_grouped_ms"])


def check_fuzz_artifact(tmp, stdout):
    doc = load(tmp, "fuzz-artifact.json")
    assert doc["total"] == 100 and doc["seeds"] == [0] and doc["verify"] == "full"
    counts = doc["counts"]
    assert counts["silent_different"] == counts["forward_error"] == counts["other_error"] == 0, counts
    assert doc["base_modified"] == 0 and counts["clear_error"] > 0, doc


def check_lora_export(tmp, stdout):
    entry = load(tmp, "lora-export.json")["pairs"][0]
    assert entry["pair"] == "llama-arith" and len(entry["rows"]) == 12
    full = {r["config"]: r for r in entry["rows"] if r["cap"] is None}
    assert set(full) == {"vllm-linear", "vllm-emb", "vllm-emb-calib", "peft-full"}
    assert abs(full["peft-full"]["kl"]) < 1e-6  # PEFT with modules_to_save reproduces the delta at full rank
    assert full["vllm-linear"]["kl"] > full["vllm-emb"]["kl"]  # dropping the embeddings' delta costs the most
    assert all(finite(r["accuracy"], r["kl"]) for r in entry["rows"])


def check_lora_import(tmp, stdout):
    rows = {r["label"]: r for r in load(tmp, "lora-import.json")["rows"]}
    packed = rows["Delta-CoMe 8/3/2, alpha 1/16"]
    assert packed["compressed_bytes"] and 0 <= packed["kl"] < 1e-3 and packed["accuracy"] == 1.0, packed
    assert rows["LoRA adapter (PEFT)"]["accuracy"] == 1.0


def check_cpu(tmp, stdout):
    doc = load(tmp, "cpu.json")
    assert doc["smoke"] and len(doc["linear"]) == 8  # 2 shapes x 2 dtypes x 2 token counts
    for r in doc["linear"]:
        assert set(r["ms"]) == {"base", "merged", "compressed", "reference"} and finite(*r["ms"].values()), r
        assert r["max_rel_diff_vs_reference"] < (1e-5 if r["dtype"] == "fp32" else 1e-2), r  # the kernel's answer
    (model,) = doc["model"]
    assert set(model["ms_per_token"]) == {"base", "finetuned", "compressed"} and finite(*model["ms_per_token"].values())
    assert [r["deltas"] for r in doc["multi"]] == [1, 2] and all(finite(r["ratio"]) for r in doc["multi"])
    assert [(r["kind"], r["deltas"]) for r in doc["layer"]] == [("one delta, 1 token", 1), ("multi-delta", 1),
                                                                 ("multi-delta", 2)]
    summary = doc["svd"][0]["summary"]
    assert set(summary) == {"exact", "randomized-4", "randomized-2", "randomized-1"} and summary["exact"]["max_excess_error"] == 0
    assert [r["shape"] for r in doc["svd7b"]] == [[72, 136], [136, 72]] and all(finite(*r["seconds"].values()) for r in doc["svd7b"])
    assert "| model | base ms/token |" in stdout


# script, arguments, extra environment (None: remove the variable), check
CASES = {
    "architectures": ("architectures.py", ["--smoke"], {}, check_architectures),
    "compressed_base": ("compressed_base.py", ["--quick"], {}, check_compressed_base),
    "cpu": ("cpu.py", ["--smoke"], {}, check_cpu),
    "kernels-smoke": ("kernels.py", ["--smoke"], {"TRITON_INTERPRET": "1"}, check_kernels_smoke),
    "kernels-aot": ("kernels.py", ["--aot", "--shapes", "136x200", "--tokens", "1,17"], {"TRITON_INTERPRET": None},
                    check_kernels_aot),
    "lm_eval_check": ("lm_eval_check.py", ["--quick"], {}, check_lm_eval_check),
    # pure arithmetic, ~1 s: no separate quick mode, only the output moved
    "fuzz_artifact": ("fuzz_artifact.py", ["--quick"], {}, check_fuzz_artifact),
    "global_budget": ("global_budget.py", ["--quick"], {}, check_global_budget),
    "lora_export": ("lora_export.py", ["--smoke"], {}, check_lora_export),
    "lora_import": ("lora_import.py", ["--smoke"], {}, check_lora_import),
    "memory_table": ("memory_table.py", ["--out", "{tmp}/" + OUT + "/memory-table.json"], {}, check_memory_table),
    "quality": ("quality.py", ["--smoke"], {}, check_quality),
    "serve_demo": ("serve_demo.py", ["--quick"], {}, check_serve_demo),
    "serving": ("serving.py", ["--smoke"], {"TRITON_INTERPRET": "1"}, check_serving),
    "streaming": ("streaming.py", ["--smoke"], {}, check_streaming),
    "target_correction": ("target_correction.py", ["--quick"], {}, check_target_correction),
}


def test_every_script_has_a_case():
    assert {CASES[c][0] for c in CASES} == {p.name for p in (REPO / "benchmarks").glob("*.py")}


def _snapshot() -> dict:
    """(size, mtime) of every committed result and doc: a quick run must leave them alone."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns)
            for root in (REPO / "benchmarks" / "results", REPO / "docs") for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_quick_mode(case, tmp_path):
    script, args, extra, check = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_WAIT_POLICY="PASSIVE", TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    before = _snapshot()
    start = time.perf_counter()
    r = subprocess.run([sys.executable, f"benchmarks/{script}", *(a.format(tmp=tmp_path) for a in args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    print(f"{case}: {seconds:.1f} s")
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"
    check(tmp_path, r.stdout)
    assert _snapshot() == before, "a quick run wrote into benchmarks/results/ or docs/"
