"""Fuzz the delta artifact: mutate a saved `save_delta` directory and classify every load.

    python benchmarks/fuzz_artifact.py                       # 2 seeds x 600 mutations, table + JSON
    python benchmarks/fuzz_artifact.py --seeds 0 1 2 3 --count 2000 --json out.json
    python benchmarks/fuzz_artifact.py --quick                # 100 mutations (CPU check mode)

A tiny Llama (tied embeddings, so the artifact has an alias) is compressed and saved once; each
mutation is applied to a fresh copy of the two files, then `load_delta(copy of base, dir)` runs
and its outcome is one of

    identical          the load succeeded and every tensor is bit-identical to the original load
    clear_error        a documented library error (DeltaFormatError, BaseMismatchError, ...)
    silent_different   the load succeeded but some tensor (or the logits) differs
    forward_error      the load succeeded, the first forward raised
    other_error        any other exception type (a raw SafetensorError, KeyError, TypeError, ...)

and, for every failed load, whether the base model was modified (`base_modified`). The test suite
runs this with fixed seeds (tests/test_fuzz.py) and asserts 0 silent_different, 0 forward_error, 0
other_error and 0 base_modified. Results: docs/integrity.md.

Mutations: bit flips and byte changes in the tensor data, the safetensors header and its length
prefix; truncation and appended bytes of both files; structured edits of the safetensors header
(dtype, shape, offsets, metadata, keys); byte changes of delta_config.json; and edits of every JSON
field (delete, wrong type, changed value) chosen by walking the document from a random top-level
field.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's deltacome_ao, not an installed one
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KINDS = (
    "data_bitflip", "data_bytes", "header_byte", "length_prefix", "truncate_tensors", "append_tensors",
    "header_edit", "json_byte", "truncate_json", "json_edit", "json_reformat",
)
# relative frequency of each kind (JSON edits are the richest: every field, every kind of edit)
WEIGHTS = {"data_bitflip": 3, "data_bytes": 2, "header_byte": 2, "length_prefix": 1, "truncate_tensors": 1,
           "append_tensors": 1, "header_edit": 3, "json_byte": 2, "truncate_json": 1, "json_edit": 8,
           "json_reformat": 1}
OUTCOMES = ("identical", "clear_error", "silent_different", "forward_error", "other_error")


def documented_errors() -> tuple[type, ...]:
    """The error types docs/artifact.md documents for a bad artifact or a wrong base."""
    from deltacome_ao.checkpoint import CheckpointMismatchError
    from deltacome_ao.finetune_config import ConfigMismatchError
    from deltacome_ao.fingerprint import BaseMismatchError
    from deltacome_ao.format import DeltaFormatError

    return (DeltaFormatError, BaseMismatchError, CheckpointMismatchError, ConfigMismatchError)


# --- the artifact under test ------------------------------------------------------------------------


def tiny_pair(seed: int = 0):
    """A tiny Llama base (tied embeddings) and a fine-tune changing every tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval()
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.parameters():
            if p.ndim == 2:
                o, i = p.shape
                p += 0.02 * (torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)) + 1e-3 * torch.randn(o, i, generator=g)
            else:
                p += 0.02 * torch.randn(p.shape, generator=g)
    return base, ft


def make_artifact(out: Path):
    """(base, artifact dir): the fine-tune compressed against the base and saved with `save_delta`."""
    from deltacome_ao import DeltaCoMeConfig, compress_, save_delta

    base, ft = tiny_pair()
    config = DeltaCoMeConfig(base=base, group_size=16, progress=False)
    with torch.no_grad():
        compress_(ft, config)
    save_delta(ft, out, base=base, config=config, metadata={"task": "fuzz"})
    return base, out


def state_bytes(model: torch.nn.Module) -> dict:
    """{name: (type, dtype, shape, bytes)} of every tensor, compressed weights by inner tensor."""
    from deltacome_ao.delta_tensor import DeltaTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DeltaTensor):
            out[k] = (type(v).__name__, repr(v.attributes))
            for n in v.tensor_data_names:
                t = getattr(v, n)
                out[f"{k}:{n}"] = (type(t).__name__, str(t.dtype), tuple(t.shape), _raw(t))
        else:
            out[k] = (type(v).__name__, str(v.dtype), tuple(v.shape), _raw(v))
    return out


def _raw(t: torch.Tensor) -> bytes:
    if t.device.type == "meta":
        return b"<meta>"
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


INPUT = torch.arange(24).reshape(2, 12) % 64


# --- mutations -----------------------------------------------------------------------------------


def _header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, min(8 + n, len(data))


def _walk_pick(rng: random.Random, document):
    """A random path into `document`: a random top-level field, then random children."""
    path, node = [], document
    while True:
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node, key=str))
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
        else:
            return path
        path.append(key)
        node = node[key]
        if len(path) > 1 and rng.random() < 0.35:
            return path


def _get(document, path):
    for k in path:
        document = document[k]
    return document


def _changed_value(rng: random.Random, value, document):
    """A plausible other value of the same type (or the same container with one change)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value * 2, 0, -value, value + 1000, 2**62])
    if isinstance(value, float):
        return rng.choice([value * 2, -value, 0.0, value + 1e-3, 1e300, float("nan"), float("inf")])
    if isinstance(value, str):
        choices = ["", value[:-1], value + "x", value.upper(), "float16", "bfloat16", "int8", "uint8",
                   "MixedPrecisionDeltaTensor", "BitDeltaTensor", "0" * 64, "f" * 64]
        choices += [k for k in document.get("layers", {})][:3] + list(document.get("kept", []))[:3]
        if len(value) == 64:  # a hex digest: one digit changed
            i = rng.randrange(64)
            choices.append(value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:])
        return rng.choice(choices)
    if isinstance(value, list):
        value = list(value)
        op = rng.randrange(5)
        if op == 0 and value:
            del value[rng.randrange(len(value))]
        elif op == 1 and value:
            value.append(copy.deepcopy(rng.choice(value)))
        elif op == 2:
            value.reverse()
        elif op == 3 and value:
            value[rng.randrange(len(value))] = rng.choice([None, "x", -1, 0, 1.5, [], {}])
        else:
            value.append(rng.choice([1, "x", None]))
        return value
    if isinstance(value, dict):
        value = dict(value)
        op = rng.randrange(3)
        if op == 0 and value:
            del value[rng.choice(sorted(value))]
        elif op == 1 and value:
            k = rng.choice(sorted(value))
            value[k + rng.choice([".x", "_", "0"])] = value.pop(k)
        else:
            value[rng.choice(["extra", "model.layers.9.mlp.up_proj", "lm_head.weight"])] = rng.choice(
                [None, 1, "x", [], {}])
        return value
    return rng.choice([0, "x", [], {}])


WRONG_TYPES = (None, "x", "", 0, -1, 1.5, True, [], [1, 2], {}, {"a": 1})


def mutate_document(rng: random.Random, document: dict) -> tuple[dict, str]:
    document = copy.deepcopy(document)
    path = _walk_pick(rng, document)
    if not path:
        return {"x": 1}, "document replaced"
    parent, key = _get(document, path[:-1]), path[-1]
    op = rng.choice(("delete", "wrong_type", "change", "change"))
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "wrong_type" or op == "delete":
        parent[key] = copy.deepcopy(rng.choice(WRONG_TYPES))
    else:
        parent[key] = _changed_value(rng, parent[key], document)
        op = "change"
    return document, f"{op} {'.'.join(map(str, path))}"


def _dumps(document) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def mutate(rng: random.Random, kind: str, tensors: bytes, config: bytes) -> tuple[bytes, bytes, str]:
    """(new delta.safetensors bytes, new delta_config.json bytes, description)."""
    t, c = bytearray(tensors), bytearray(config)
    h0, h1 = _header_span(tensors)
    if kind == "data_bitflip":
        i = rng.randrange(h1, len(t))
        bit = rng.randrange(8)
        t[i] ^= 1 << bit
        return bytes(t), config, f"flip bit {bit} of byte {i} (data)"
    if kind == "data_bytes":
        i = rng.randrange(h1, len(t))
        n = rng.choice([1, 2, 4, 16])
        for j in range(i, min(i + n, len(t))):
            t[j] = rng.randrange(256)
        return bytes(t), config, f"{n} random byte(s) at {i} (data)"
    if kind == "header_byte":
        i = rng.randrange(h0, h1)
        t[i] = rng.choice([rng.randrange(256), rng.randrange(32, 127), ord(rng.choice('0123456789"{}[],:'))])
        return bytes(t), config, f"byte {i} of the header"
    if kind == "length_prefix":
        i, bit = rng.randrange(8), rng.randrange(8)
        t[i] ^= 1 << bit
        return bytes(t), config, f"flip bit {bit} of length byte {i}"
    if kind == "truncate_tensors":
        n = rng.choice([0, rng.randrange(8), rng.randrange(len(t)), len(t) - rng.randrange(1, 64)])
        return bytes(t[:n]), config, f"delta.safetensors truncated to {n} bytes"
    if kind == "append_tensors":
        extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64])))
        return bytes(t) + extra, config, f"{len(extra)} byte(s) appended to delta.safetensors"
    if kind == "header_edit":
        header = json.loads(bytes(t[h0:h1]))
        names = sorted(k for k in header if k != "__metadata__")
        name = rng.choice(names)
        entry = header[name]
        op = rng.choice(("dtype", "shape", "offsets", "metadata", "rename", "delete", "swap"))
        if op == "dtype":
            entry["dtype"] = rng.choice(["F16", "BF16", "F32", "I8", "U8", "I32", "F64", "BOOL", "X9"])
        elif op == "shape":
            entry["shape"] = _changed_value(rng, list(entry["shape"]), {})
        elif op == "offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[a + 1, b + 1], [a, b - 1], [a - 1, b], [b, a], [0, b - a]])
        elif op == "metadata":
            meta = header.setdefault("__metadata__", {})
            if meta and rng.random() < 0.5:
                del meta[rng.choice(sorted(meta))]
            else:
                meta[rng.choice(["format_version", "deltacome", "extra"])] = rng.choice(["0", "2", "99", "x"])
        elif op == "rename":
            header[name + rng.choice(["x", ".0", ":y"])] = header.pop(name)
        elif op == "delete":
            del header[name]
        else:  # two tensors of the same size exchange their bytes
            same = [n for n in names if n != name and header[n]["data_offsets"][1] - header[n]["data_offsets"][0]
                    == entry["data_offsets"][1] - entry["data_offsets"][0] and header[n]["dtype"] == entry["dtype"]]
            if same:
                other = rng.choice(same)
                entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
            else:
                entry["dtype"] = "U8" if entry["dtype"] != "U8" else "I8"
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + bytes(t[h1:]), config, f"header {op} {name}"
    if kind == "json_byte":
        i = rng.randrange(len(c))
        c[i] = rng.choice([rng.randrange(256), rng.randrange(32, 127), ord(rng.choice('0123456789"{}[],:.-e'))])
        return tensors, bytes(c), f"byte {i} of delta_config.json"
    if kind == "truncate_json":
        n = rng.randrange(len(c))
        return tensors, bytes(c[:n]), f"delta_config.json truncated to {n} bytes"
    if kind == "json_edit":
        document, what = mutate_document(rng, json.loads(config))
        return tensors, _dumps(document), what
    if kind == "json_reformat":
        document = json.loads(config)
        return tensors, json.dumps(document, indent=rng.choice([None, 1, 4]), sort_keys=rng.random() < 0.5).encode(), "reformatted"
    raise ValueError(kind)


# --- one load --------------------------------------------------------------------------------------


def classify(base, reference, artifact_dir: Path, errors: tuple, verify: str = "full") -> tuple[str, bool, str]:
    """(outcome, base modified on failure, detail) of loading `artifact_dir` onto a copy of `base`."""
    from deltacome_ao import load_delta

    target = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_delta(target, artifact_dir, verify=verify)
        except Exception as e:  # noqa: BLE001 - classifying every exception is the point
            modified = state_bytes(target) != reference["base"]
            kind = "clear_error" if isinstance(e, errors) else "other_error"
            return kind, modified, f"{type(e).__module__}.{type(e).__name__}: {str(e)[:300]}"
        if state_bytes(target) != reference["state"]:
            return "silent_different", False, "tensors differ"
        try:
            with torch.no_grad():
                logits = target(INPUT).logits
        except Exception as e:  # noqa: BLE001
            return "forward_error", False, f"{type(e).__name__}: {str(e)[:300]}"
        if not torch.equal(logits, reference["logits"]):
            return "silent_different", False, "logits differ"
    return "identical", False, ""


def run(seeds=(0, 1), count: int = 600, workdir=None, verify: str = "full", progress: bool = False,
        kinds=KINDS) -> dict:
    """Fuzz `count` mutations for each seed; returns {"counts", "base_modified", "by_kind", "examples"}."""
    from deltacome_ao import load_delta
    from deltacome_ao.format import CONFIG_NAME, WEIGHTS_NAME

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="fuzz-artifact-")) if own else Path(workdir)
    try:
        base, original = make_artifact(root / "original")
        tensors, config = (original / WEIGHTS_NAME).read_bytes(), (original / CONFIG_NAME).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_delta(copy.deepcopy(base), original)
        with torch.no_grad():
            reference = {"base": state_bytes(base), "state": state_bytes(loaded), "logits": loaded(INPUT).logits}
        errors = documented_errors()
        counts = collections.Counter({o: 0 for o in OUTCOMES})
        by_kind = collections.defaultdict(collections.Counter)
        error_types = collections.Counter()
        examples = collections.defaultdict(list)
        base_modified = 0
        work = root / "mutated"
        weights = [WEIGHTS[k] for k in kinds]
        for seed in seeds:
            rng = random.Random(seed)
            for i in range(count):
                kind = rng.choices(kinds, weights)[0]
                new_tensors, new_config, what = mutate(rng, kind, tensors, config)
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                (work / WEIGHTS_NAME).write_bytes(new_tensors)
                (work / CONFIG_NAME).write_bytes(new_config)
                outcome, modified, detail = classify(base, reference, work, errors, verify)
                detail = detail.replace(str(root), "<workdir>")
                counts[outcome] += 1
                by_kind[kind][outcome] += 1
                base_modified += modified
                if outcome.endswith("error"):
                    error_types[detail.split(":")[0]] += 1
                label = "base_modified" if modified else outcome
                if label not in ("identical", "clear_error") and len(examples[label]) < 20:
                    examples[label].append(
                        {"seed": seed, "index": i, "kind": kind, "mutation": what, "detail": detail})
                if progress and (i + 1) % 100 == 0:
                    print(f"seed {seed}: {i + 1}/{count} {dict(counts)}", file=sys.stderr)
        return {"seeds": list(seeds), "count": count, "verify": verify, "total": sum(counts.values()),
                "counts": dict(counts), "base_modified": base_modified,
                "by_kind": {k: dict(v) for k, v in by_kind.items()}, "error_types": dict(error_types.most_common()),
                "examples": dict(examples)}
    finally:
        torch.set_num_threads(threads)
        if own:
            shutil.rmtree(root, ignore_errors=True)


def table(result: dict) -> str:
    lines = ["| outcome | loads |", "|---|---:|"]
    lines += [f"| {o} | {result['counts'].get(o, 0)} |" for o in OUTCOMES]
    lines.append(f"| failed loads that modified the base | {result['base_modified']} |")
    lines.append(f"| **total** | {result['total']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--count", type=int, default=600, help="mutations per seed")
    parser.add_argument("--verify", choices=["full", "sample", "none"], default="full")
    parser.add_argument("--json", type=Path, help="write the full result (counts, per kind, examples) here")
    parser.add_argument("--quick", action="store_true",
                        help="CPU check mode: seed 0, 100 mutations, JSON to $TMPDIR/deltacome-benchmarks/fuzz-artifact.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.count = [0], 100
        args.json = args.json or Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "fuzz-artifact.json"
    start = time.perf_counter()
    result = run(args.seeds, args.count, verify=args.verify, progress=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(table(result))
    print(f"\nerror types: {result['error_types']}")
    print(f"{result['total']} mutations in {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    bad = sum(result["counts"][o] for o in ("silent_different", "forward_error", "other_error")) + result["base_modified"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
