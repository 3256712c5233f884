"""The architecture matrix, the MoE delta size, the grouped experts operator and the embeddings option.

    python benchmarks/architectures.py                  # everything -> docs/architectures.md + benchmarks/results/architectures.json
    python benchmarks/architectures.py --quick          # matrix only, torch.compile with backend="aot_eager"

Sections of the generated page:

1. the matrix (`deltacome_ao.evaluation.architectures.check` on every tiny architecture; torch.compile
   with the inductor backend unless --quick);
2. MoE delta size: a bf16 Mixtral-shaped fine-tune (every parameter moved) compressed at alpha 1/16,
   against the fp16 size of the parameters it changed — and the same with only `nn.Linear` layers
   compressed (what transformers 5's 3-D experts gave before), plus the exact byte count for
   Mixtral-8x7B's shapes (from the allocation, no weights needed);
3. the grouped experts operator: one MoE experts layer's forward with compressed experts (one
   `deltacome::grouped_delta_linear` call per projection) against a loop over experts;
4. the embeddings option (`DeltaCoMeConfig(embeddings=True)`) on the zoo's real fine-tuned pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deltacome_ao import DeltaCoMeConfig, compress_, save_delta  # noqa: E402
from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402
from deltacome_ao.evaluation.architectures import ARCHITECTURES, check, format_table, tiny_finetune  # noqa: E402

DOC = REPO / "docs" / "architectures.md"
RESULTS = REPO / "benchmarks" / "results" / "architectures.json"


def matrix(backend: str, names=None) -> list:
    rows = []
    for name, arch in ARCHITECTURES.items():
        if names is not None and name not in names:
            continue
        start = time.perf_counter()
        row = check(arch, backend=backend, embeddings=True)
        print(f"{name}: {time.perf_counter() - start:.1f} s {row.errors or ''}", flush=True)
        rows.append(row)
    return rows


def _mixtral(hidden=256, inter=1024, experts=8, layers=2, vocab=256, dtype=torch.bfloat16):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)
    return MixtralForCausalLM(config).to(dtype).eval()


def _mixtral_8x7b_bytes(alpha: float = 1 / 16, group_size: int = 128) -> dict:
    """Compressed bytes of every matmul weight of Mixtral-8x7B's shapes (exact: the allocation decides the
    stored bytes of a matrix from its shape), against their fp16 bytes and the whole model's."""
    from deltacome_ao.allocate import PAPER_SCHEDULE, allocate
    from deltacome_ao.factors import PackedFactors

    hidden, inter, kv, layers, experts, vocab = 4096, 14336, 1024, 32, 8, 32000
    matrices = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)] + [(2 * inter, hidden), (hidden, inter)] * experts

    def nbytes(out_f, in_f):
        bands = allocate(out_f, in_f, alpha, PAPER_SCHEDULE, group_size)
        layout = PackedFactors.layout([b.bits for b in bands], [b.count for b in bands], group_size, out_f, in_f)
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in layout.values())

    covered = layers * sum(o * i for o, i in matrices)
    compressed = layers * sum(nbytes(o, i) for o, i in matrices)
    router = layers * experts * hidden
    norms = layers * 2 * hidden + hidden
    embeddings = 2 * vocab * hidden
    changed = covered + router + norms + embeddings
    return {"covered_params": covered, "compressed_bytes": compressed, "fp16_bytes_covered": 2 * covered,
            "changed_params": changed, "artifact_bytes_estimate": compressed + 2 * (router + norms + embeddings),
            "ratio_compressed": compressed / (2 * covered),
            "ratio_artifact_to_changed_fp16": (compressed + 2 * (router + norms + embeddings)) / (2 * changed)}


def moe_size(tmp: Path) -> dict:
    """A bf16 Mixtral-shaped fine-tune at alpha 1/16: artifact bytes against the changed parameters' fp16 size."""
    base = _mixtral()
    ft = tiny_finetune(base.float()).to(torch.bfloat16)
    base = base.to(torch.bfloat16)
    changed = sum(p.numel() for n, p in ft.named_parameters() if not torch.equal(p, base.state_dict()[n]))
    out = {"model_params": sum(p.numel() for p in ft.parameters()), "changed_params": changed}
    for label, kwargs in (("every matmul weight (now)", {}),
                          ("nn.Linear only (before)", {"filter_fn": lambda m, n: isinstance(m, torch.nn.Linear)})):
        model = copy.deepcopy(ft)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress_(model, DeltaCoMeConfig(base=base, progress=False), **kwargs)
        path = tmp / label.split()[0]
        save_delta(model, path, base=base, overwrite=True)
        doc = json.loads((path / "delta_config.json").read_text())
        disk = sum(f.stat().st_size for f in path.iterdir())
        out[label] = {"artifact_bytes": disk, "compressed_bytes": doc["bytes"]["compressed"],
                      "kept_bytes": doc["bytes"]["kept"], "share": doc["coverage"]["share_outside_embeddings"],
                      "ratio_to_changed_fp16": disk / (2 * changed), "ratio_to_model_bf16": disk / (2 * out["model_params"])}
    out["mixtral_8x7b_shapes"] = _mixtral_8x7b_bytes()
    return out


def grouped_timing(tokens: int = 256, reps: int = 20) -> dict:
    """One Mixtral-shaped experts layer (8 experts, H=256, I=1024, top-2): dense base, compressed with the
    grouped operator, and compressed through transformers' eager loop over experts (w[e] per expert)."""
    from deltacome_ao.methods.mixed_precision import MixedPrecisionDeltaTensor

    base = _mixtral(dtype=torch.float32, layers=1)
    experts = base.model.layers[0].mlp.experts
    ft = copy.deepcopy(experts)
    with torch.no_grad():
        for p in ft.parameters():
            p += 0.05 * p.std() * torch.randn_like(p)
    layer = copy.deepcopy(ft)
    for name in ("gate_up_proj", "down_proj"):
        ws = [MixedPrecisionDeltaTensor.from_hp(getattr(ft, name)[e], getattr(experts, name)[e]) for e in range(experts.num_experts)]
        setattr(layer, name, torch.nn.Parameter(MixedPrecisionDeltaTensor.stack(ws), requires_grad=False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 256, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, 2, generator=g), -1)

    def timed(module, impl):  # the fastest of `reps` calls: the machine may be shared
        module.config._experts_implementation = impl
        best = math.inf
        with torch.no_grad():
            module(x, idx, w)
            for _ in range(reps):
                start = time.perf_counter()
                y = module(x, idx, w)
                best = min(best, time.perf_counter() - start)
        return best * 1e3, y

    dense_ms, ref = timed(ft, "grouped_mm")
    grouped_ms, y1 = timed(layer, "grouped_mm")
    loop_ms, y2 = timed(layer, "eager")
    return {"tokens": tokens, "dense_grouped_mm_ms": dense_ms, "compressed_grouped_ms": grouped_ms,
            "compressed_eager_loop_ms": loop_ms, "grouped_vs_loop_max_diff": float((y1 - y2).abs().max()),
            "rel_error_vs_finetune": float((y1 - ref).norm() / ref.norm()), "threads": torch.get_num_threads()}


def embeddings_on_zoo(pairs=("llama-arith", "llama-code", "llama-json", "mistral-code", "qwen2-json"), problems=200) -> list:
    from deltacome_ao.compress import coverage_report, delta_report
    from deltacome_ao.evaluation.compare import measure_row
    from deltacome_ao.evaluation.pairs import PAIRS, load_pair

    rows = []
    for pair in pairs:
        torch.manual_seed(0)
        base, finetuned = load_pair(pair)
        task = PAIRS[pair].task
        batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
        for embeddings in (False, True):
            model = copy.deepcopy(finetuned)
            with torch.no_grad():
                compress_(model, DeltaCoMeConfig(base=base, progress=False, embeddings=embeddings))
            nbytes = sum(r["delta_bytes"] for r in delta_report(model))
            kept = sum(v["params"] for v in coverage_report(model, base)["uncompressed"].values()) * 4  # fp32 pairs
            row = measure_row("embeddings compressed" if embeddings else "embeddings kept (default)", model, finetuned,
                              task, batches, problems)
            row.update(pair=pair, compressed_bytes=nbytes, kept_bytes=kept)
            rows.append(row)
            print(pair, embeddings, f"acc {row['accuracy']:.3f} kl {row['kl']:.4f}", flush=True)
    return rows


def write_doc(rows, moe, grouped, zoo, backend: str, seconds: float) -> str:
    from deltacome_ao.compress import REASONS

    lines = [
        "# Architectures",
        "",
        "Which Hugging Face architectures deltacome_ao compresses and serves, measured. Regenerate with",
        "",
        "```bash",
        "python benchmarks/architectures.py            # this page + benchmarks/results/architectures.json",
        "```",
        "",
        "(`tests/test_architectures.py` runs the same checks and asserts them; `--quick` uses",
        "`torch.compile(backend=\"aot_eager\")`.)",
        "",
        "## What is compressed",
        "",
        "Every weight a model uses as a matrix multiply gets a compressed delta, whatever it is called",
        "(`compress.matmul_layers`): `nn.Linear` (subclasses too: Falcon's `x @ W.T`), transformers'",
        "`Conv1D` (GPT-2; stored (in, out), compressed in the (out, in) orientation), fused projections",
        "(Phi-3's `qkv_proj`, GPT-NeoX's `query_key_value`: they are `nn.Linear`), and the stacked expert",
        "parameters of transformers 5's MoE layers (Mixtral / Qwen2-MoE / Qwen3-MoE `experts.gate_up_proj`",
        "(E, 2I, H), `experts.down_proj` (E, H, I)): one delta per expert, stored as one",
        "`MixedPrecisionExpertsTensor` and run by one `deltacome::grouped_delta_linear` call per projection.",
        "The input / output embeddings keep the fine-tuned values, as in the paper, unless",
        "`DeltaCoMeConfig(embeddings=True)`. Recipes only narrow this by name (`recipes/`).",
        "",
        "What stays dense is listed with its reason by `compress.coverage_report(model, base)`, in the",
        "artifact's `delta_config.json` (`coverage`) and by `deltacome inspect` / `deltacome compress`:",
        "",
        "| reason | meaning |",
        "|---|---|",
        *[f"| `{k}` | {v} |" for k, v in REASONS.items()],
        "",
        "## The matrix",
        "",
        "Tiny models built from each architecture's transformers config (hidden 64, 2 layers; MoE: 4 experts,",
        "top-2), a random base and a fine-tune that moves every parameter (rank-3 update of 5% of each",
        "matrix's norm plus 0.2% full-rank noise; 2% on vectors), alpha = 1/16, fp32.",
        f"torch.compile backend: `{backend}`. {len(rows)} architectures, {seconds:.0f} s on {torch.get_num_threads()} threads.",
        "",
        "- *compressed share*: compressed parameters / changed parameters, outside the input and output",
        "  embeddings (reported apart below); *left uncompressed*: changed parameters by reason;",
        "- *logit error / base gap*: ‖logits(compressed) − logits(fine-tune)‖ / ‖logits(base) − logits(fine-tune)‖;",
        "- *compile == eager*: relative difference of `torch.compile(model, fullgraph=True)` (LLaVA: the text",
        "  path; transformers' own image path does not compile with fullgraph, base model included);",
        "- *artifact* / *HF round trip*: `save_delta` → `load_delta` on a fresh base, and the model's own",
        "  `save_pretrained` → `AutoModel*.from_pretrained`, logits compared with `torch.equal`;",
        "- *MultiDeltaModel rows*: a batch mixing both fine-tunes and the base, each row against that model",
        "  alone (max relative difference), or the refusal at `load_delta`;",
        "- *delta / fp16 of covered*: compressed bytes / fp16 bytes of the compressed parameters (1/16 = 0.0625).",
        "",
        format_table(rows),
        "",
        "Embeddings, reported apart (changed parameters of the input/output embeddings, kept by default),",
        "and the option `embeddings=True` (every changed parameter of the tables compressed too):",
        "",
        "| architecture | embedding params changed | share of all changed params compressed, embeddings=True | logit error / base gap, embeddings=True |",
        "|---|---:|---:|---:|",
        *[f"| {r.arch} | {r.embedding_params:,} | {100 * r.embeddings_share:.1f}% | {r.embeddings_error_ratio:.3f} |" for r in rows],
        "",
        "`MultiDeltaModel` serves a mixture-of-experts block as one unit: its experts get the batch's tokens",
        "flattened and regrouped by expert, so each delta's rows run the whole block again with that delta's",
        "router, compressed experts (one grouped call) and shared experts (`torch.func.functional_call`).",
        "A fine-tune whose config differs from the base's in a field that changes the outputs (RoPE scaling,",
        "norm epsilon, ...) is applied by `load_delta` and `deltacome merge`, and refused by `MultiDeltaModel`.",
        '',
        'Not in the matrix, and why (each tested in `tests/test_architectures.py` / `tests/test_serving.py`):',
        '',
        '- **DBRX** stores its experts flattened: `ffn.experts.mlp.w1` / `v1` / `w2` are 2-D (E·ffn, hidden)',
        '  parameters, viewed to (E, ffn, hidden) and indexed per expert inside the forward. This layout is not',
        '  compressed yet: the three stay dense, reported with the reason `experts_layout` (not `other`), so only',
        '  about 20% of the changed parameters outside the embeddings are compressed on the tiny DBRX (attention',
        '  and router). Nothing is wrong: the experts are kept exactly, the artifact and HF round trips are',
        '  bit-exact and `MultiDeltaModel` rows equal the model alone.',
        '- **gpt-oss, Llama 4, Jamba, OPT** compress and run alone, but `MultiDeltaModel` cannot cut some of',
        "  their units by rows (gpt-oss's attention with sinks and Jamba's Mamba mixer take keyword arguments /",
        "  a cache, Llama 4's MoE block returns a tuple, OPT flattens the batch into tokens before `fc1`):",
        "  `load_delta`'s probe forward refuses such a delta with `UnsupportedDeltaError` naming the module",
        '  (`docs/serving.md`).',
        "",
    ]
    now, before = moe["every matmul weight (now)"], moe["nn.Linear only (before)"]
    big = moe["mixtral_8x7b_shapes"]
    lines += [
        "## MoE delta size",
        "",
        "A bf16 Mixtral-shaped model (hidden 256, 8 experts of intermediate 1024, 2 layers, vocabulary 256;",
        f"{moe['model_params']:,} parameters, {moe['changed_params']:,} changed by the fine-tune), alpha = 1/16:",
        "",
        "| compressed | compressed share (outside embeddings) | artifact on disk | / changed params' fp16 size | / whole model bf16 |",
        "|---|---:|---:|---:|---:|",
        f"| every matmul weight (now) | {100 * now['share']:.1f}% | {now['artifact_bytes']:,} B | {now['ratio_to_changed_fp16']:.4f} | {now['ratio_to_model_bf16']:.4f} |",
        f"| `nn.Linear` only (before: experts left dense) | {100 * before['share']:.1f}% | {before['artifact_bytes']:,} B | {before['ratio_to_changed_fp16']:.4f} | {before['ratio_to_model_bf16']:.4f} |",
        "",
        f"The artifact is {now['compressed_bytes']:,} B of compressed factors plus {now['kept_bytes']:,} B of kept tensors",
        "(embeddings, lm_head, norms, routers: kept as the fine-tune has them, in bf16). At Mixtral-8x7B's",
        "shapes (counted exactly from the allocation, no weights needed): the",
        f"{big['covered_params'] / 1e9:.2f} B matmul parameters take {big['compressed_bytes'] / 2**30:.2f} GiB",
        f"({big['ratio_compressed']:.4f} of their fp16 size); with the kept embeddings, routers and norms the",
        f"artifact is ≈ {big['artifact_bytes_estimate'] / 2**30:.2f} GiB = {big['ratio_artifact_to_changed_fp16']:.4f} of the changed parameters' fp16 size.",
        "",
        "## The grouped experts operator",
        "",
        f"One Mixtral-shaped experts layer (8 experts, H = 256, I = 1024, top-2, {grouped['tokens']} tokens, fp32, CPU,",
        f"{grouped['threads']} threads), ms per forward (fastest of 20):",
        "",
        "| dense experts (transformers grouped_mm) | compressed, one grouped call per projection | compressed, transformers' eager loop over experts |",
        "|---:|---:|---:|",
        f"| {grouped['dense_grouped_mm_ms']:.2f} | {grouped['compressed_grouped_ms']:.2f} | {grouped['compressed_eager_loop_ms']:.2f} |",
        "",
        "What is grouped: per projection, one operator call for all experts; inside it three",
        "`torch.nn.functional.grouped_mm` calls over all experts at once — the base term, `x V̂_eᵀ`, then",
        "`· s_e Û_eᵀ` (the rank padded to a multiple of 8 with zero vectors for grouped_mm's 16-byte strides;",
        "a loop over the experts that have tokens where torch has no grouped kernel) — and the factors",
        "unpacked once per band for all experts, never per expert. The eager loop (transformers' `experts_implementation=\"eager\"`)",
        "copies each hit expert's vectors out of the stack and runs one `delta_linear` per expert. Both agree",
        f"(max difference {grouped['grouped_vs_loop_max_diff']:.1e}); no CUDA kernel for the grouped operator yet",
        "(on GPU it runs the same torch reference).",
        "",
    ]
    if zoo:
        lines += [
            "## The embeddings option on the zoo",
            "",
            "`DeltaCoMeConfig(embeddings=True)` also compresses the input embedding and lm_head deltas (as any",
            "matrix, alpha 1/16). On the zoo's real fine-tuned pairs (`docs/pairs.md`; fp32, 200 held-out",
            "problems; kept bytes = fp32 tensors stored as they are):",
            "",
            "| pair | embeddings | accuracy | KL to fine-tuned (answers) | compressed bytes | kept bytes | delta tensors in all |",
            "|---|---|---:|---:|---:|---:|---:|",
            *[f"| {r['pair']} | {r['method']} | {r['accuracy']:.1%} | {r['kl']:.4f} | {r['compressed_bytes']:,} | "
              f"{r['kept_bytes']:,} | {r['compressed_bytes'] + r['kept_bytes']:,} |" for r in zoo],
            "",
            "On these pairs the embeddings are a large part of the model (vocabulary 259, hidden 160–256), so",
            "compressing them shrinks the delta by " + ", ".join(
                f"{1 - (b['compressed_bytes'] + b['kept_bytes']) / (a['compressed_bytes'] + a['kept_bytes']):.0%}"
                for a, b in zip(zoo[::2], zoo[1::2])) + " (pair by pair, in the order above), at",
            "the accuracy and KL shown; the default stays the paper's (embeddings kept exact) and the option is",
            "there for fine-tunes whose embedding deltas are large and low-rank.",
            "",
        ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="matrix only, compile with backend='aot_eager'")
    p.add_argument("--no-doc", action="store_true", help="print, do not write docs/architectures.md")
    p.add_argument("--render", action="store_true", help="rewrite the page from benchmarks/results/architectures.json")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check mode: llama and mixtral only, aot_eager, the MoE size and the grouped timing, no "
                        "docs; JSON to $TMPDIR/deltacome-benchmarks/architectures.json")
    args = p.parse_args(argv)
    if args.render:
        from deltacome_ao.evaluation.architectures import Row

        data = json.loads(RESULTS.read_text())
        rows = [Row(**r) for r in data["rows"]]
        text = write_doc(rows, data["moe_size"], data["grouped"], data["zoo_embeddings"], data["backend"],
                         data["matrix_seconds"])
        write_text_atomic(DOC, text + "\n")
        print(f"wrote {DOC}")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import tempfile

    start = time.perf_counter()
    backend = "aot_eager" if args.quick or args.smoke else "inductor"
    rows = matrix(backend, ("llama", "mixtral") if args.smoke else None)
    seconds = time.perf_counter() - start
    print(format_table(rows))
    with tempfile.TemporaryDirectory() as tmp:
        moe = moe_size(Path(tmp))
    grouped = grouped_timing()
    zoo = [] if args.quick or args.smoke else embeddings_on_zoo()
    if args.smoke:
        out = Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "architectures.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({"rows": [r.__dict__ for r in rows], "moe_size": moe, "grouped": grouped,
                                           "backend": backend}, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        return
    text = write_doc(rows, moe, grouped, zoo, backend, seconds)
    if args.no_doc:
        print(text)
        return
    write_text_atomic(DOC, text + "\n")
    write_text_atomic(RESULTS, json.dumps({
        "rows": [r.__dict__ for r in rows], "moe_size": moe, "grouped": grouped, "zoo_embeddings": zoo,
        "backend": backend, "matrix_seconds": seconds}, indent=2, default=str) + "\n")
    print(f"wrote {DOC} and {RESULTS}")


if __name__ == "__main__":
    main()
