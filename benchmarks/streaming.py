#!/usr/bin/env python
"""Streaming compression of a 7B-shaped pair on disk: time and peak memory (docs/streaming.md).

    python benchmarks/streaming.py make [--dir DIR] [--layers 32]      # write the pair (bf16, sharded)
    python benchmarks/streaming.py run  [--dir DIR] [--layers 32]      # compress it, measure, check, write results
    python benchmarks/streaming.py all  [--dir DIR] [--layers 32] [--clean]   # both (--clean: delete the pair after)
    python benchmarks/streaming.py load [--dir DIR]                    # optional: load_delta onto the whole base (~15 GB)
    python benchmarks/streaming.py matrix [--shapes 4096x11008,11008x4096] [--dtypes float32] [--code DIR]
                                                                       # peak RSS of compressing one matrix pair
    python benchmarks/streaming.py --smoke [--results PATH]           # CPU check of every step on a tiny pair (~15 s)

The pair is Llama-shaped (hidden 4096, MLP 11008, 32 heads, vocab 32000, untied lm_head; `--layers`
decoder layers, 32 = the Llama-2-7B shapes, 6.74 B parameters, 13.5 GB per checkpoint in bf16),
written as safetensors shards of about `--shard-gb` GB with a `model.safetensors.index.json`, one
tensor at a time from a fixed seed (each tensor from its own generator, so any tensor can be
regenerated alone). Base: N(0, 0.02²) weights, norms 1. Fine-tuned: base + delta, stored in bf16:
each projection gets a rank-64 delta with singular values decaying as exp(-i/16), Frobenius norm
`--delta-scale` × the weight's, plus dense N(0, (`--noise` × that low-rank part's RMS)²) noise;
embeddings and lm_head get a small dense change, norms a small change (so they are kept tensors).

`run` compresses with `compress_streaming` (alpha 1/16, group 128, the library's default SVD — `svd` is
not passed unless `--svd` is given; "auto" today, `decompose.delta_svd`) in a child process and
measures its wall time and peak RSS: the child's VmHWM (the kernel's high-water mark of its resident
set since exec, file-backed pages included), which it reads from /proc/self/status once the
artifact is written; the parent also polls /proc/<pid>/status (VmRSS, VmHWM) every `--poll` seconds
into the log as progress. (`ru_maxrss` from `os.wait4` is recorded but not used: Linux carries the
parent's high-water mark into the child across fork/exec.) Then, in the parent, it
decodes the first and the last layer's seven projections from the artifact and compares each with
the true delta (fine-tuned − base as stored, fp32): relative Frobenius error, next to the share
of the delta that is not the rank-64 part (what no rank-64 method could recover).
Writes benchmarks/results/streaming-7b.json (atomically; `streaming-7b-<L>layers.json` for
`--layers` other than 32) and prints a markdown table.

`matrix` measures the memory of the per-matrix step alone: for each shape and dtype, a fresh child
process makes a fine-tuned / base pair in memory (base N(0, 0.02²), fine-tuned = base + a rank-64
delta + dense noise), then compresses it as `compress_streaming` does (default settings, the base
handed over: `methods.handing_over_base`; a checkout without it: the config as it is) and reports its
VmHWM minus its VmRSS right before the call (the high-water mark is reset there through
/proc/self/clear_refs, so making the inputs does not count). `--code DIR` runs the child in another
checkout (its `deltacome_ao`), e.g. a worktree of an older commit. Writes
benchmarks/results/streaming-matrix-peak.json (or `--results`).

`--smoke` checks the script itself: make, run and load on a 2-layer pair with hidden 128, MLP 344,
4 heads, vocab 256 (same rank-64 deltas, shards of ~100 kB) in a temporary directory that is deleted
afterwards; results go to a temporary file unless `--results` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from deltacome_ao.checkpoint import write_text_atomic  # noqa: E402

RANK, DECAY = 64, 16.0
GB = 1e9


@dataclass(frozen=True)
class Dims:
    """Model dimensions of the pair (the default: Llama-2-7B's)."""

    hidden: int = 4096
    mlp: int = 11008
    heads: int = 32
    vocab: int = 32000

    def proj(self) -> dict[str, tuple[int, int]]:
        """name: (out_features, in_features) of a decoder layer's projections."""
        h, m = self.hidden, self.mlp
        return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}


LLAMA_7B = Dims()
SMOKE = Dims(hidden=128, mlp=344, heads=4, vocab=256)


def default_dir() -> Path:
    root = os.environ.get("DELTACOME_CACHE") or tempfile.gettempdir()
    return Path(root) / "deltacome-streaming-7b"


# --- the pair --------------------------------------------------------------------------------------


def tensor_specs(layers: int, dims: Dims = LLAMA_7B) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order LlamaForCausalLM's state dict lists them."""
    specs = [("model.embed_tokens.weight", (dims.vocab, dims.hidden))]
    for i in range(layers):
        specs += [(f"model.layers.{i}.{p}.weight", shape) for p, shape in dims.proj().items()]
        specs += [(f"model.layers.{i}.input_layernorm.weight", (dims.hidden,)),
                  (f"model.layers.{i}.post_attention_layernorm.weight", (dims.hidden,))]
    specs += [("model.norm.weight", (dims.hidden,)), ("lm_head.weight", (dims.vocab, dims.hidden))]
    return specs


def llama_config(layers: int, dims: Dims = LLAMA_7B) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=dims.hidden, intermediate_size=dims.mlp, num_hidden_layers=layers, num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads, vocab_size=dims.vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def low_rank(index: int, shape: tuple[int, int], seed: int, scale: float) -> torch.Tensor:
    """The rank-64 part of tensor `index`'s delta (fp32), from its own generator."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * index + 1)
    out_f, in_f = shape
    u = torch.linalg.qr(torch.randn(out_f, RANK, generator=g))[0]
    v = torch.linalg.qr(torch.randn(in_f, RANK, generator=g))[0]
    s = torch.exp(-torch.arange(RANK, dtype=torch.float32) / DECAY)
    s *= scale * 0.02 * math.sqrt(out_f * in_f) / s.norm()  # ‖L‖_F = scale × ‖W_base‖_F (≈)
    return (u * s) @ v.T


def pair_tensors(index: int, name: str, shape: tuple, seed: int, delta_scale: float, noise: float):
    """(base, fine-tuned) of one tensor, bf16."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * index)
    if len(shape) == 1:
        base = torch.ones(shape)
        ft = base + 0.01 * torch.randn(shape, generator=g)
    else:
        base = 0.02 * torch.randn(shape, generator=g)
        if name.endswith("proj.weight"):
            low = low_rank(index, shape, seed, delta_scale)
            rms = low.norm() / math.sqrt(low.numel())
            ft = base + low + noise * rms * torch.randn(shape, generator=g)
            del low
        else:  # embeddings, lm_head: a small dense change
            ft = base + 1e-3 * torch.randn(shape, generator=g)
    return base.bfloat16(), ft.bfloat16()


def make(args) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root = Path(args.dir)
    specs = tensor_specs(args.layers, args.dims)
    nbytes = [2 * math.prod(shape) for _, shape in specs]
    shards, current, size = [], [], 0  # greedy shards of at most --shard-gb (a bigger tensor gets its own)
    for i, n in enumerate(nbytes):
        if current and size + n > args.shard_gb * GB:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    shards.append(current)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    config = llama_config(args.layers, args.dims)
    start = time.perf_counter()
    for role in ("base", "finetuned"):
        d = root / role
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        index = {"metadata": {"total_size": sum(nbytes)},
                 "weight_map": {specs[i][0]: names[k] for k, shard in enumerate(shards) for i in shard}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bar = tqdm(total=len(specs), desc="make pair", unit="tensor")
    for k, shard in enumerate(shards):
        base_part, ft_part = {}, {}
        for i in shard:
            name, shape = specs[i]
            base_part[name], ft_part[name] = pair_tensors(i, name, shape, args.seed, args.delta_scale, args.noise)
            bar.update(1)
        for role, part in (("base", base_part), ("finetuned", ft_part)):
            tmp = root / role / f".{names[k]}.tmp"
            save_file(part, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, root / role / names[k])
        del base_part, ft_part
    bar.close()
    info = {"layers": args.layers, "dims": asdict(args.dims), "seed": args.seed, "delta_scale": args.delta_scale, "noise": args.noise,
            "shards": len(shards), "shard_gb": args.shard_gb, "tensors": len(specs),
            "parameters": sum(n // 2 for n in nbytes), "bytes_per_checkpoint": sum(nbytes),
            "seconds": time.perf_counter() - start}
    (root / "pair.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {root}: {len(specs)} tensors, {info['parameters'] / 1e9:.2f} B parameters, "
          f"{len(shards)} shards × 2, {sum(nbytes) / GB:.2f} GB per checkpoint, {info['seconds']:.0f} s", flush=True)
    return info


# --- compression, measured in a child process ------------------------------------------------------


def _child(args):
    """The measured process: compress_streaming only, summary to --summary."""
    from deltacome_ao.streaming import compress_streaming

    root = Path(args.dir)
    svd = {"svd": args.svd} if args.svd is not None else {}  # None: the library's default
    summary = compress_streaming(root / "base", root / "finetuned", Path(args.out), alpha=args.alpha,
                                 group_size=128, overwrite=True, progress=True, **svd)
    summary["vm_hwm_bytes"] = _status(os.getpid()).get("VmHWM", 0)  # this process's peak RSS since exec
    Path(args.summary).write_text(json.dumps(summary, indent=1))


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(args) -> tuple[dict, dict]:
    """Run the child; -> (its summary, {wall_s, peak_rss_bytes, polled_hwm_bytes})."""
    summary_path = Path(args.out).parent / f".{Path(args.out).name}.summary.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "--dir", str(args.dir), "--out", str(args.out),
           "--alpha", repr(args.alpha), *(["--svd", args.svd] if args.svd is not None else []),
           "--summary", str(summary_path)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    polled = {"hwm": 0}
    done = threading.Event()

    def poll():
        last_print = 0.0
        while not done.wait(args.poll):
            st = _status(proc.pid)
            polled["hwm"] = max(polled["hwm"], st.get("VmHWM", 0))
            now = time.perf_counter() - start
            if now - last_print >= 60:
                last_print = now
                print(f"[rss] t={now:.0f}s VmRSS={st.get('VmRSS', 0) / GB:.2f} GB VmHWM={st.get('VmHWM', 0) / GB:.2f} GB",
                      file=sys.stderr, flush=True)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the compression child failed with status {code}")
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    return summary, {"wall_s": wall, "peak_rss_bytes": summary.pop("vm_hwm_bytes"), "polled_hwm_bytes": polled["hwm"],
                     "ru_maxrss_bytes": usage.ru_maxrss * 1024}


@torch.no_grad()
def check_error(args, layer_ids) -> list[dict]:
    """Decode some layers from the artifact; relative Frobenius error against the true delta."""
    from safetensors import safe_open

    from deltacome_ao.checkpoint import BaseWeights
    from deltacome_ao.format import SEP, WEIGHTS_NAME, assemble, read_delta_config

    root, out = Path(args.dir), Path(args.out)
    document = read_delta_config(out)
    base, ft = BaseWeights(root / "base", role="base"), BaseWeights(root / "finetuned", role="fine-tuned")
    index = {name: i for i, (name, _) in enumerate(tensor_specs(args.layers, args.dims))}
    rows = []
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        for layer in layer_ids:
            for proj, shape in args.dims.proj().items():
                name = f"model.layers.{layer}.{proj}"
                key = f"{name}.weight"
                spec = document["layers"][name]
                b = base[key]
                inner = {n: f.get_tensor(f"{key}{SEP}{n}") for n in ("v_packed", "v_scale", "v_zero", "u_packed",
                                                                    "u_scale", "u_zero", "s")}
                w = assemble(spec, {**inner, "base_weight": b}, where=name)
                u, s, v = w.delta_factors()
                decoded = (u * s) @ v
                true = ft[key].float() - b.float()
                low = low_rank(index[key], shape, args.seed, args.delta_scale)
                rows.append({
                    "name": name, "shape": list(shape), "bands": [[b_, c] for b_, c in zip(spec["bits"], spec["counts"])],
                    "rel_error": ((decoded - true).norm() / true.norm()).item(),
                    "rel_error_vs_rank64_part": ((decoded - low).norm() / low.norm()).item(),
                    "not_rank64_share": ((true - low).norm() / true.norm()).item(),
                })
                del b, w, u, s, v, decoded, true, low
    return rows


def _shape_rows(per_matrix: list[dict]) -> list[dict]:
    groups: dict[str, list[float]] = {}
    for row in per_matrix:
        groups.setdefault("x".join(map(str, row["shape"])), []).append(row["seconds"])
    return [{"shape": k, "matrices": len(v), "mean_s": sum(v) / len(v), "min_s": min(v), "max_s": max(v),
             "total_s": sum(v)} for k, v in groups.items()]


def markdown(result: dict) -> str:
    m, s = result["measured"], result["summary"]
    lines = [
        f"Command: `{result['command']}` ({result['host']})",
        "",
        "| tensors | compressed matrices | bytes in (both checkpoints) | artifact on disk | of which packed factors | kept tensors | wall time | peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['tensors']} | {s['compressed']} | {s['bytes_in'] / GB:.2f} GB | {s['artifact_bytes'] / GB:.3f} GB "
        f"| {s['bytes_compressed'] / GB:.3f} GB | {s['bytes_kept'] / GB:.3f} GB ({s['kept']}) "
        f"| {m['wall_s'] / 60:.1f} min | {m['peak_rss_bytes'] / GB:.2f} GB |",
        "",
        "| matrix shape | matrices | mean s / matrix | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['shape']} | {r['matrices']} | {r['mean_s']:.1f} | {r['min_s']:.1f} | {r['max_s']:.1f} |"
              for r in result["per_shape"]]
    lines += ["", "| layer | bands (bits×vectors) | rel. Frobenius error vs true delta | vs its rank-64 part | non-rank-64 share of the delta |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {' '.join(f'{b}×{c}' for b, c in r['bands'])} | {r['rel_error']:.4f} "
              f"| {r['rel_error_vs_rank64_part']:.4f} | {r['not_rank64_share']:.4f} |" for r in result["error_check"]]
    return "\n".join(lines)


def run(args) -> dict:
    from deltacome_ao.config import DeltaCoMeConfig

    root = Path(args.dir)
    pair = json.loads((root / "pair.json").read_text())
    if pair["layers"] != args.layers:
        raise SystemExit(f"{root} holds a {pair['layers']}-layer pair; pass --layers {pair['layers']} or remake it")
    args.dims = Dims(**pair.get("dims", asdict(LLAMA_7B)))
    args.out = args.out or str(root / "delta")
    print(f"compressing {root} -> {args.out} (child process, nice {os.nice(0)})", flush=True)
    summary, measured = measure(args)
    per_matrix = summary.pop("per_matrix")
    layer_ids = sorted({0, args.layers - 1})
    errors = check_error(args, layer_ids)
    result = {
        "what": "streaming compression (compress_streaming) of a 7B-shaped pair on disk",
        "command": args.command_line,
        "host": f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, nice {os.nice(0)}",
        "pair": pair,
        "options": {"alpha": args.alpha, "svd": args.svd if args.svd is not None else DeltaCoMeConfig.svd,
                    "svd_given": args.svd is not None, "group_size": 128, "method": "deltacome",
                    "allocation": "paper"},
        "commit": _commit(),
        "peak_rss_method": "VmHWM of the compressing child process, read by itself from /proc/self/status after "
                           "the artifact is written (the kernel's high-water mark of its resident set since exec, "
                           "file-backed pages included); polled_hwm_bytes: the same polled from the parent every "
                           "--poll s; ru_maxrss_bytes (os.wait4) is NOT used: Linux carries the parent's high-water "
                           "mark into the child across fork/exec, so it reads the parent's (e.g. the make step's) peak",
        "measured": measured,
        "summary": summary,
        "per_shape": _shape_rows(per_matrix),
        "per_matrix": per_matrix,
        "error_check": errors,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    path = results_path(args)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwrote {path}")
    return result


def _commit(root: Path = REPO) -> str | None:
    """The checkout's commit (with "+dirty" when tracked files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --- one matrix pair: peak memory of the per-matrix step ---------------------------------------------

# Run with `python -c` in the checkout measured (cwd first on sys.path: its deltacome_ao), argv: shape dtype.
_MATRIX_CHILD = r'''
import json, sys, time
import torch


def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


out_f, in_f = map(int, sys.argv[1].split("x"))
dtype = getattr(torch, sys.argv[2])
import deltacome_ao
from deltacome_ao.config import DeltaCoMeConfig
try:
    from deltacome_ao.methods import handing_over_base  # what compress_streaming compresses with
except ImportError:  # a checkout before it: compress_streaming used the config as it is
    def handing_over_base(config):
        return config
g = torch.Generator().manual_seed(0)
base = torch.empty(out_f, in_f).normal_(0, 0.02, generator=g)
# as the pair's projections: a rank-64 delta of RMS 0.02 x the weight's (0.0004), dense noise 0.1 x that
ft = torch.empty(out_f, in_f).normal_(0, 4e-5, generator=g)
ft.addmm_(torch.randn(out_f, 64, generator=g), torch.randn(64, in_f, generator=g), alpha=4e-4 / 8)
ft.add_(base)
base, ft = base.to(dtype), ft.to(dtype)
config = handing_over_base(DeltaCoMeConfig(base={}, progress=False))
config.compress(torch.randn(300, 200), torch.randn(300, 200), "warm-up")  # one-time allocations
before = status()["VmRSS"]
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    reset = True
except OSError:
    reset = False
start = time.perf_counter()
w = config.compress(ft, base, "w")
seconds = time.perf_counter() - start
peak = status()["VmHWM"]
print(json.dumps({"shape": sys.argv[1], "dtype": sys.argv[2], "inputs_bytes": 2 * base.numel() * base.element_size(),
                  "rss_before_bytes": before, "peak_over_inputs_bytes": peak - before, "hwm_reset": reset,
                  "seconds": seconds, "bands": [list(b) for b in zip(w.bits, w.counts)],
                  "base_copied": w.base_weight.untyped_storage().data_ptr() != base.untyped_storage().data_ptr(),
                  "module": deltacome_ao.__file__}))
'''


def matrix(args) -> dict:
    code = Path(args.code).resolve() if args.code else REPO
    rows = []
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            out = subprocess.run([sys.executable, "-c", _MATRIX_CHILD, shape, dtype], cwd=code, check=True,
                                 capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{shape} {dtype}: inputs {r['inputs_bytes'] / 1e6:.0f} MB, peak over them "
                  f"{r['peak_over_inputs_bytes'] / 1e6:.0f} MB, {r['seconds']:.1f} s", flush=True)
    result = {
        "what": "peak RSS of compressing one matrix pair as compress_streaming does (default settings), each in a "
                "fresh process: VmHWM minus VmRSS right before the call (high-water mark reset there)",
        "command": args.command_line, "code": str(code), "commit": _commit(code),
        "host": f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}",
        "rows": rows, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    path = Path(args.results) if args.results and not args.smoke else (
        Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "streaming-matrix-smoke.json" if args.smoke
        else REPO / "benchmarks" / "results" / "streaming-matrix-peak.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


def results_path(args) -> Path:
    if args.results:
        return Path(args.results)
    if args.smoke:
        return Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "streaming-smoke.json"
    name = "streaming-7b.json" if args.layers == 32 else f"streaming-7b-{args.layers}layers.json"
    return REPO / "benchmarks" / "results" / name


def load_check(args) -> dict:
    """Put the artifact on the whole base with `DeltaCoMeModel.from_pretrained` (full sha256 check of
    every base tensor) and run 8 tokens through it; added to the results JSON as "load_check". Needs
    the whole base model in memory (about 15 GB for the 7B shapes): not part of the streaming run."""
    from deltacome_ao import DeltaCoMeModel, compressed_layers

    root = Path(args.dir)
    out = Path(args.out or root / "delta")
    start = time.perf_counter()
    model = DeltaCoMeModel.from_pretrained(str(root / "base"), out, verify="full")
    loaded = time.perf_counter() - start
    x = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(x).logits
        forward = time.perf_counter() - start
    check = {"loaded_s": loaded, "verify": "full", "compressed_layers": len(compressed_layers(model)),
             "forward_8_tokens_s": forward, "logits_finite": bool(torch.isfinite(logits).all()),
             "vm_hwm_bytes": _status(os.getpid()).get("VmHWM", 0)}
    path = results_path(args)
    if path.is_file():
        result = json.loads(path.read_text())
        result["load_check"] = check
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"load_delta onto the whole base: {check}")
    return check


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["make", "run", "all", "load", "matrix", "_child"],
                        help="required unless --smoke")
    parser.add_argument("--smoke", action="store_true",
                        help="make + run + load on a tiny 2-layer pair in a temporary directory (deleted after)")
    parser.add_argument("--dir", default=None, help=f"where the pair lives (default: {default_dir()})")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta-scale", type=float, default=0.02, help="‖low-rank delta‖_F / ‖W_base‖_F")
    parser.add_argument("--noise", type=float, default=0.1, help="dense noise RMS / low-rank delta RMS")
    parser.add_argument("--alpha", type=float, default=1 / 16)
    parser.add_argument("--svd", default=None, choices=["auto", "exact", "randomized"],
                        help="SVD method passed to compress_streaming (default: not passed, the library's default)")
    parser.add_argument("--out", help="artifact directory (default: DIR/delta)")
    parser.add_argument("--results", help="results JSON path (default: benchmarks/results/streaming-7b.json; "
                        "--smoke: a temporary file)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between /proc polls")
    parser.add_argument("--clean", action="store_true", help="all: delete the pair and the artifact afterwards")
    parser.add_argument("--shapes", default="4096x11008,11008x4096", help="matrix: out x in of each pair")
    parser.add_argument("--dtypes", default="float32", help="matrix: dtype(s) of the pair, e.g. float32,bfloat16")
    parser.add_argument("--code", help="matrix: the checkout whose deltacome_ao is measured (default: this one)")
    parser.add_argument("--summary", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command_line = "python benchmarks/streaming.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.step is None and not args.smoke:
        parser.error("give a step (make, run, all, load) or --smoke")
    args.dims = LLAMA_7B
    if args.smoke:
        if args.step not in (None, "all"):
            parser.error("--smoke runs every step; give no step (or all)")
        args.step, args.clean, args.dims = "all", args.dir is None, SMOKE
        args.layers, args.shard_gb, args.poll = 2, 1e-4, 0.1
        if args.dir is None:
            args.dir = tempfile.mkdtemp(prefix="deltacome-streaming-smoke-")
    args.dir = args.dir or str(default_dir())
    if args.step == "_child":
        return _child(args)
    if args.step in ("make", "all"):
        make(args)
    if args.step in ("run", "all"):
        run(args)
    if args.step == "load" or args.smoke:
        load_check(args)
    if args.step == "matrix" or args.smoke:
        if args.smoke:
            args.shapes, args.dtypes = "344x128,128x344", "float32,bfloat16"
        matrix(args)
    if args.step == "all" and args.clean:
        shutil.rmtree(args.dir)
        print(f"deleted {args.dir}")


if __name__ == "__main__":
    main()
