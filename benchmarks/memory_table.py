#!/usr/bin/env python
"""How many fine-tunes of a 7B model fit on one GPU, with and without Delta-CoMe (cf. the paper's Table 7).

    python benchmarks/memory_table.py                      # markdown table, writes benchmarks/results/memory-table.json
    python benchmarks/memory_table.py --kv-tokens 32768 --overhead-gb 3
    python benchmarks/memory_table.py --out /tmp/memory-table.json   # anywhere but the committed results

Pure arithmetic (about a second on a CPU, no model, no GPU), so the full run is also its quick check.

Every number is COMPUTED, NOT MEASURED ON A GPU: byte counts from the Llama-2-7B shapes and from the
storage model of `deltacome_ao.allocate` (`allocate` + `bands_cost_bits`, which is the real size of
the packed factors: codes, padding, fp16 scales, uint8 zero-points, fp32 singular values).

Assumptions (all printed with the table and stored in the JSON):
  * Llama-2-7B shapes: 32 layers, hidden 4096, MLP 11008, vocab 32000, untied embed_tokens / lm_head,
    2 RMSNorms per layer + a final one; every tensor bf16 (2 bytes).
  * Compressed: the 7 projections of every layer (q, k, v, o, gate, up, down), paper schedule
    (8 bits × 2, 3 bits × 32, 2 bits for the rest), group 128, alpha 1/16 or 1/32, packed factors
    held as they are (`MultiDeltaModel(cache_dequantized=False)`: no fp32 cache).
  * Kept tensors (embed_tokens, lm_head, norms) — two cases: "shared" (the fine-tunes keep the
    base's, as most instruction / math / code fine-tunes without new tokens do, or their deltas are
    dropped) and "per delta" (every fine-tune carries its own bf16 copies: 2 × 32000 × 4096 + norms).
    Note: `serving.py` refuses per-delta norms today (docs/serving.md); the per-delta row counts
    them anyway, as the memory a per-row norm would need.
  * Without compression: every fine-tune is a full bf16 model; nothing is shared.
  * A fixed allowance per GPU for the KV cache and activations: `--kv-tokens` tokens of KV cache
    (2 × 32 layers × 4096 × 2 bytes = 0.5 MiB per token) plus `--overhead-gb` for activations,
    CUDA context and allocator slack. Transient per-step buffers of the delta path (one layer's
    unpacked factors) are inside the overhead.
  * GPU capacity as sold, decimal: 80 GB = 80e9 bytes (A100 / H100), 141 GB = 141e9 bytes (H200).
    All sizes below are decimal GB (1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deltacome_ao.allocate import allocate, bands_cost_bits  # noqa: E402

LAYERS, HIDDEN, MLP, VOCAB = 32, 4096, 11008, 32000
BF16 = 2
PROJECTIONS = {  # name: (out_features, in_features), per layer
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (MLP, HIDDEN), "up_proj": (MLP, HIDDEN), "down_proj": (HIDDEN, MLP),
}
NS = (2, 4, 8, 16, 32, 64)
GPUS = {"80GB": 80e9, "141GB": 141e9}
ALPHAS = {"1/16": 1 / 16, "1/32": 1 / 32}
GB = 1e9
LABEL = "computed, not measured on a GPU"


def sizes(group_size: int = 128) -> dict:
    proj_params = LAYERS * sum(o * i for o, i in PROJECTIONS.values())
    kept_params = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN
    per_matrix = {}
    compressed = {}
    for label, alpha in ALPHAS.items():
        total = 0
        per_matrix[label] = {}
        for name, (o, i) in PROJECTIONS.items():
            bands = allocate(o, i, alpha, group_size=group_size)
            nbytes = -(-bands_cost_bits(bands, o, i, group_size) // 8)
            per_matrix[label][name] = {"shape": [o, i], "bands": [[b.bits, b.count] for b in bands],
                                       "rank": sum(b.count for b in bands), "bytes": nbytes,
                                       "fraction_of_bf16": nbytes / (o * i * BF16)}
            total += LAYERS * nbytes
        compressed[label] = total
    return {
        "base_bytes": (proj_params + kept_params) * BF16,
        "projection_bytes_bf16": proj_params * BF16,
        "kept_bytes_bf16": kept_params * BF16,
        "compressed_delta_bytes": compressed,
        "per_matrix": per_matrix,
    }


def table(kv_tokens: int = 16384, overhead_gb: float = 2.0, group_size: int = 128) -> dict:
    s = sizes(group_size)
    kv_bytes = kv_tokens * 2 * LAYERS * HIDDEN * BF16
    allowance = kv_bytes + overhead_gb * GB
    rows = {"uncompressed (N full bf16 models)": (0, s["base_bytes"])}
    for label in ALPHAS:
        c = s["compressed_delta_bytes"][label]
        rows[f"Delta-CoMe a={label}, kept shared"] = (s["base_bytes"], c)
        rows[f"Delta-CoMe a={label}, kept per delta"] = (s["base_bytes"], c + s["kept_bytes_bf16"])
    out = []
    for name, (fixed, per_model) in rows.items():
        entry = {"setting": name, "fixed_bytes": fixed, "per_model_bytes": per_model, "by_n": {}, "max_n": {}}
        for n in NS:
            total = fixed + n * per_model + allowance
            entry["by_n"][n] = {"total_bytes": total, **{g: total <= cap for g, cap in GPUS.items()}}
        for g, cap in GPUS.items():
            entry["max_n"][g] = max(0, int((cap - allowance - fixed) // per_model))
        out.append(entry)
    return {
        "label": LABEL,
        "assumptions": {
            "model": "Llama-2-7B shapes: 32 layers, hidden 4096, MLP 11008, vocab 32000, untied lm_head, bf16",
            "compressed": "7 projections per layer, paper schedule (8b x2, 3b x32, 2b rest), group %d, packed "
                          "factors only (cache_dequantized=False)" % group_size,
            "kept": "embed_tokens + lm_head + norms: 'shared' = the base's; 'per delta' = own bf16 copies",
            "uncompressed": "each fine-tune a full bf16 model",
            "allowance": f"KV cache {kv_tokens} tokens x 0.5 MiB = {kv_bytes / GB:.2f} GB + {overhead_gb} GB "
                         "activations / CUDA context / slack, once per GPU",
            "gpu_capacity": "decimal: 80 GB = 80e9 bytes, 141 GB = 141e9 bytes",
        },
        "kv_tokens": kv_tokens, "overhead_gb": overhead_gb, "allowance_bytes": allowance, "group_size": group_size,
        "sizes": s, "rows": out, "ns": list(NS),
    }


def markdown(t: dict) -> str:
    s = t["sizes"]
    lines = [
        f"All numbers: **{LABEL}** (byte counts from `deltacome_ao.allocate`, decimal GB).",
        "",
        f"Base (bf16) {s['base_bytes'] / GB:.2f} GB: projections {s['projection_bytes_bf16'] / GB:.2f} GB, "
        f"embed_tokens + lm_head + norms {s['kept_bytes_bf16'] / GB:.3f} GB. Compressed projections per fine-tune: "
        + ", ".join(f"a={a}: {b / GB:.3f} GB" for a, b in s["compressed_delta_bytes"].items())
        + f". Allowance per GPU: {t['assumptions']['allowance']} = {t['allowance_bytes'] / GB:.2f} GB.",
        "",
        "| setting | per fine-tune (GB) | " + " | ".join(f"N={n}" for n in t["ns"]) + " | max N 80 GB | max N 141 GB |",
        "|---|---:|" + "---:|" * len(t["ns"]) + "---:|---:|",
    ]
    for r in t["rows"]:
        cells = []
        for n in t["ns"]:
            e = r["by_n"][n]
            mark = "✓✓" if e["80GB"] else ("✓" if e["141GB"] else "✗")
            cells.append(f"{e['total_bytes'] / GB:.1f} {mark}")
        lines.append(f"| {r['setting']} | {r['per_model_bytes'] / GB:.3f} | " + " | ".join(cells)
                     + f" | {r['max_n']['80GB']} | {r['max_n']['141GB']} |")
    lines += ["", "Cells: total GB for N fine-tunes (base + deltas + allowance); ✓✓ fits in 80 GB, "
              "✓ fits in 141 GB "
              "only, ✗ fits in neither.", ""]
    lines.append("| matrix (out × in) | " + " | ".join(f"a={a}: bands (bits×count), rank, MB" for a in ALPHAS) + " |")
    lines.append("|---|" + "---|" * len(ALPHAS))
    for name in PROJECTIONS:
        o, i = PROJECTIONS[name]
        cells = []
        for a in ALPHAS:
            m = s["per_matrix"][a][name]
            cells.append(" ".join(f"{b}×{c}" for b, c in m["bands"]) + f", r={m['rank']}, {m['bytes'] / 1e6:.2f} MB "
                         f"({m['fraction_of_bf16'] * 16:.3f}/16 of bf16)")
        lines.append(f"| {name} ({o} × {i}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-tokens", type=int, default=16384, help="KV-cache allowance in tokens (0.5 MiB each)")
    ap.add_argument("--overhead-gb", type=float, default=2.0, help="activations / CUDA context / slack")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory-table.json"),
                    help="JSON path (default: %(default)s)")
    args = ap.parse_args(argv)
    t = table(args.kv_tokens, args.overhead_gb, args.group_size)
    print(markdown(t))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(t, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
