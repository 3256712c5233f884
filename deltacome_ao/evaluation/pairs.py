"""Small but real base / fully fine-tuned model pairs, made on CPU from offline data.

Delta compression has to be judged on a genuine fine-tune: a base model that learned
something (here: Python source from the standard library) and a fine-tuned copy whose
*every* weight moved to learn a new skill it lacked (here: exact-answer arithmetic).
Both are tiny Llama models with byte-level tokens, built deterministically in a few
minutes on two CPU cores, so the pair can be rebuilt anywhere and shipped in the repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, PretrainedConfig, Qwen2Config

from ..calibrate import STDLIB_CORPUS_FILES, stdlib_text
from .metrics import exact_match_accuracy, kl_divergence, perplexity

__all__ = [
    "BOS", "EOS", "PAD", "VOCAB_SIZE", "encode", "decode",
    "Task", "ArithmeticTask", "WordTask", "PairSpec", "PAIRS", "ZOO", "get_pair", "load_pair", "build_pair",
    "train_pair", "relative_deltas", "shipped_dir",
]

# --- byte-level tokens: ids 0..255 are raw bytes, then three specials -------------
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """UTF-8 bytes as ids, optionally wrapped in BOS/EOS."""
    return [BOS] * bos + list(text.encode("utf-8")) + [EOS] * eos


def decode(ids) -> str:
    """Inverse of :func:`encode`: stops at the first EOS, drops BOS/PAD."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


# --- offline corpus: fixed files of the Python 3.11 standard library ---------------
PRETRAIN_FILES = STDLIB_CORPUS_FILES
HELDOUT_FILES = ("configparser.py", "difflib.py", "pprint.py")


def _windows(data: bytes, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random BOS-prefixed windows of ``seq_len`` tokens from ``data``."""
    starts = torch.randint(0, len(data) - seq_len, (n,), generator=gen).tolist()
    rows = [[BOS] + list(data[s : s + seq_len - 1]) for s in starts]
    return torch.tensor(rows, dtype=torch.long)


# --- fine-tuning tasks ---------------------------------------------------------------
class Task:
    """A supervised task with exact answers: items -> (prompt, answer) strings.

    Every item of one task formats to the same prompt and answer length, so eval batches need
    no padding and the answer starts at the same token everywhere.  Items are tuples; the task's
    whole item list is shuffled once with ``split_seed`` and its last ``heldout`` items are never
    trained on.  Subclasses define ``_all_items`` and ``format``.
    """

    heldout: int
    split_seed: int

    def _all_items(self) -> list[tuple]:
        raise NotImplementedError

    def format(self, *item) -> tuple[str, str]:
        raise NotImplementedError

    def _items(self) -> list[tuple]:
        items = self._all_items()
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.split_seed))
        return [items[int(i)] for i in perm]

    def train_items(self) -> list[tuple]:
        return self._items()[: -self.heldout]

    def heldout_items(self) -> list[tuple]:
        return self._items()[-self.heldout :]

    @property
    def answer_len(self) -> int:
        return len(encode(self.format(*self._all_items()[0])[1]))

    @property
    def answer_start(self) -> int:
        """Index of the first answer token in :meth:`example` (BOS + prompt)."""
        return self.example(*self._all_items()[0])[1]

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode(prompt, bos=True)

    def example(self, *item) -> tuple[list[int], int]:
        """Token ids of one full training sequence and the length of its prompt part."""
        prompt, answer = self.format(*item)
        return encode(prompt + answer, bos=True, eos=True), len(encode(prompt)) + 1

    def eval_problems(self, n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs drawn from the held-out items."""
        held = self.heldout_items()
        idx = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))[:n]
        return [self.format(*held[int(i)]) for i in idx]

    def accuracy(self, model: torch.nn.Module, n: int = 200, seed: int = 0) -> float:
        """Greedy exact-match accuracy on ``n`` held-out problems."""
        problems = self.eval_problems(n, seed)
        return exact_match_accuracy(
            model, [p for p, _ in problems], [a for _, a in problems],
            self.encode_prompt, decode, max_new_tokens=self.answer_len + 1,
        )

    def text_batches(
        self, kind: str = "task", n_batches: int = 4, batch_size: int = 16,
        seq_len: int = 128, seed: int = 0,
    ) -> list[torch.Tensor]:
        """Held-out token batches for KL / perplexity, as unpadded ``[batch, seq]`` tensors.

        ``kind="task"``: full held-out problems ``BOS prompt answer EOS`` (one per row, fixed
        length; ``seq_len`` unused).  ``kind="python"``: ``seq_len`` windows of stdlib
        files never used in pre-training.
        """
        if kind == "task":
            held = self.heldout_items()
            idx = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))
            rows = [self.example(*held[int(i)])[0] for i in idx[: n_batches * batch_size]]
            ids = torch.tensor(rows, dtype=torch.long)
        elif kind == "python":
            gen = torch.Generator().manual_seed(seed)
            ids = _windows(stdlib_text(HELDOUT_FILES), n_batches * batch_size, seq_len, gen)
        else:
            raise ValueError(f"unknown kind {kind!r} (use 'task' or 'python')")
        return list(ids.split(batch_size))


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """Fixed-width addition: prompt ``07+45=``, answer ``052``, or ``250`` with ``reverse``.

    ``reverse`` writes the answer least-significant digit first, so each digit depends
    only on digits already seen plus one carry: a 2.9M model learns it in a few hundred
    CPU steps (the plain order needed higher learning rates and a larger delta).  Items are
    all ``(10**digits)**2`` operand pairs.
    """

    digits: int = 2
    reverse: bool = False
    heldout: int = 1000
    split_seed: int = 1234

    def _all_items(self) -> list[tuple[int, int]]:
        n = 10**self.digits
        return [divmod(i, n) for i in range(n * n)]

    def format(self, a: int, b: int) -> tuple[str, str]:
        d = self.digits
        answer = f"{a + b:0{d + 1}d}"
        return f"{a:0{d}d}+{b:0{d}d}=", answer[::-1] if self.reverse else answer


@dataclass(frozen=True)
class WordTask(Task):
    """A made-up lowercase word of fixed length put into a template (``style``):

    - ``"code"`` (code continuation): ``def get_spoxle(self): return self.`` → ``_spoxle``
    - ``"json"`` (formatting): ``city=spoxle;`` → ``{"city": "spoxle"}``, the key one of four
      equally long names.
    - ``"reverse"`` (string manipulation): ``reverse(spoxle)=`` → ``elxops``, the letters in
      reverse order.

    The first two need the model to copy the word from the prompt into a new syntactic frame,
    which the base (pre-trained on Python source) does only by luck; ``reverse`` needs each answer
    letter fetched from a position that moves back as the answer moves forward (no copy offset
    is constant), which the base never does.  Items are ``words`` distinct
    words drawn with ``word_seed`` (times the four keys for ``json``).
    """

    style: str = "code"
    letters: int = 6
    words: int = 6000
    word_seed: int = 99
    heldout: int = 1000
    split_seed: int = 1234

    KEYS = ("name", "city", "user", "mode")

    def _words(self) -> list[str]:
        gen = torch.Generator().manual_seed(self.word_seed)
        seen: dict[str, None] = {}
        while len(seen) < self.words:
            codes = torch.randint(0, 26, (self.words, self.letters), generator=gen).tolist()
            for row in codes:
                seen.setdefault("".join(chr(97 + c) for c in row))
                if len(seen) == self.words:
                    break
        return list(seen)

    def _all_items(self) -> list[tuple]:
        words = self._words()
        if self.style in ("code", "reverse"):
            return [(w,) for w in words]
        if self.style == "json":
            return [(w, self.KEYS[i % len(self.KEYS)]) for i, w in enumerate(words)]
        raise ValueError(f"unknown WordTask style {self.style!r} (use 'code', 'json' or 'reverse')")

    def format(self, word: str, key: str = "") -> tuple[str, str]:
        if self.style == "code":
            return f"def get_{word}(self): return self.", f"_{word}"
        if self.style == "reverse":
            return f"reverse({word})=", word[::-1]
        return f"{key}={word};", f'{{"{key}": "{word}"}}'


# --- pair specification ------------------------------------------------------------
ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}


@dataclass(frozen=True)
class PairSpec:
    """Everything that determines a pair; with the same software and CPU, two builds of
    one spec give bit-identical weights.

    ``base_of`` names another pair whose base this one fine-tunes (no pre-training of its
    own): several fine-tunes of one base are what multi-delta serving is for.
    """

    name: str
    task: Task
    model: dict = field(default_factory=dict)
    arch: str = "llama"
    base_of: str | None = None
    pretrain_steps: int = 250
    pretrain_batch: int = 16
    pretrain_seq_len: int = 256
    pretrain_lr: float = 2e-3
    finetune_steps: int = 400
    finetune_batch: int = 128
    finetune_lr: float = 3e-4
    seed: int = 0
    threads: int = 2

    def config(self) -> PretrainedConfig:
        if self.base_of:
            return PAIRS[self.base_of].config()
        return ARCHS[self.arch](
            vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
            tie_word_embeddings=False, **self.model,
        )


# Chosen by measurement on 2 CPU cores (see docs/pairs.md).  GQA and intermediate sizes
# that are not multiples of 128 give varied matrix shapes; each architecture has its own.
# initializer_range 0.05 (~0.8/sqrt(hidden)) instead of HF's 0.02: with the tiny default
# the short pre-training leaves weights near their init scale, so the fine-tune moved
# them by 35 %+ and learned slower; at 0.05 the delta is ~12 %, like a real fine-tune.
_LLAMA = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
    initializer_range=0.05,
)
# Word tasks have ~4x longer sequences than arithmetic: half the batch, fewer steps.
_WORD_FT = dict(finetune_steps=300, finetune_batch=64, finetune_lr=3e-4)
PAIRS: dict[str, PairSpec] = {
    "llama-arith": PairSpec(
        name="llama-arith",
        task=ArithmeticTask(digits=2, reverse=True),
        model=_LLAMA,
        pretrain_steps=250, pretrain_batch=16, pretrain_seq_len=256, pretrain_lr=2e-3,
        finetune_steps=400, finetune_batch=128, finetune_lr=3e-4,
    ),
    # Two more fine-tunes of llama-arith's base: three real deltas over one base for serving.
    "llama-code": PairSpec(name="llama-code", task=WordTask(style="code"), base_of="llama-arith", **_WORD_FT),
    "llama-json": PairSpec(name="llama-json", task=WordTask(style="json"), base_of="llama-arith", **_WORD_FT),
    # Other architectures, each with its own base (same corpus, same pre-training recipe).
    "mistral-code": PairSpec(
        name="mistral-code", arch="mistral", task=WordTask(style="code", word_seed=7),
        model=dict(
            hidden_size=192, intermediate_size=520, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05,
            sliding_window=128,
        ),
        **_WORD_FT,
    ),
    "qwen2-json": PairSpec(
        name="qwen2-json", arch="qwen2", task=WordTask(style="json", word_seed=11),
        model=dict(
            hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=5,
            num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.05,
        ),
        **_WORD_FT,
    ),
    # Beyond the zoo (issue 15's "new pairs"): a fourth architecture and a fourth task.  Phi-3
    # fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, and uses full
    # multi-head attention (no GQA).  Reversal sequences are short (24 tokens), so the
    # arithmetic recipe's batch and steps.
    "phi3-reverse": PairSpec(
        name="phi3-reverse", arch="phi3", task=WordTask(style="reverse", word_seed=23),
        model=dict(
            hidden_size=192, intermediate_size=472, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=6, max_position_embeddings=512, initializer_range=0.05,
        ),
        finetune_steps=400, finetune_batch=128, finetune_lr=3e-4,
    ),
}
# The zoo benchmarks/quality.py runs: three architectures, three tasks.  Pairs beyond it
# (phi3-reverse) are shipped and benchmarked by name (--pairs).
ZOO = ("llama-arith", "mistral-code", "qwen2-json")


# --- training -------------------------------------------------------------------------
def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _train(model, batches, steps: int, lr: float, weight_decay: float, bar: tqdm, stage: str) -> float:
    """AdamW with clipping over ``steps`` (input_ids, labels) batches; returns last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    loss = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=max(1, steps // 20))
        ids, labels = batches(step)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        bar.set_postfix(stage=stage, loss=f"{loss:.3f}")
        bar.update()
    model.eval()
    return loss


def _pretrain_batches(spec: PairSpec):
    data = stdlib_text(PRETRAIN_FILES)
    gen = torch.Generator().manual_seed(spec.seed)

    def batch(step: int):
        ids = _windows(data, spec.pretrain_batch, spec.pretrain_seq_len, gen)
        return ids, ids
    return batch


def _finetune_batches(spec: PairSpec):
    """Batches of full problems; loss only on answer + EOS, as in supervised fine-tuning."""
    pairs = spec.task.train_items()
    gen = torch.Generator().manual_seed(spec.seed + 1)

    def batch(step: int):
        idx = torch.randint(0, len(pairs), (spec.finetune_batch,), generator=gen).tolist()
        examples = [spec.task.example(*pairs[i]) for i in idx]
        ids = torch.tensor([e for e, _ in examples], dtype=torch.long)
        labels = ids.clone()
        for row, (_, n_prompt) in enumerate(examples):
            labels[row, :n_prompt] = -100
        return ids, labels
    return batch


@torch.no_grad()
def relative_deltas(base: torch.nn.Module, ft: torch.nn.Module) -> dict[str, float]:
    """||W_ft - W_base||_F / ||W_base||_F over all parameters ("all") and per kind of
    weight summed over layers ("q_proj", "lm_head", ...): how big the fine-tune is."""
    sums = defaultdict(lambda: [0.0, 0.0])
    for (name, b), f in zip(base.named_parameters(), ft.parameters()):
        kind = name.split(".")[-2] if ".layers." in name else name.removesuffix(".weight")
        for key in ("all", kind):
            sums[key][0] += (f - b).pow(2).sum().item()
            sums[key][1] += b.pow(2).sum().item()
    return {k: math.sqrt(d / n) for k, (d, n) in sums.items()}


def train_pair(spec: PairSpec) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Pre-train the base (or load ``spec.base_of``'s), fully fine-tune a copy; return both
    models and build facts."""
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    pretrain_steps = 0 if spec.base_of else spec.pretrain_steps
    with tqdm(total=pretrain_steps + spec.finetune_steps, desc=f"build {spec.name}") as bar:
        if spec.base_of:
            base = _load(get_pair(spec.base_of)[0])
            pre_loss = None
        else:
            base = AutoModelForCausalLM.from_config(spec.config()).float()
            pre_loss = _train(base, _pretrain_batches(spec), pretrain_steps, spec.pretrain_lr, 0.1, bar, "pretrain")
        pretrain_s = time.perf_counter() - start
        ft = AutoModelForCausalLM.from_config(spec.config()).float()
        ft.load_state_dict(base.state_dict())
        ft_loss = _train(ft, _finetune_batches(spec), spec.finetune_steps, spec.finetune_lr, 0.0, bar, "finetune")
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    task = spec.task
    python = task.text_batches("python")
    deltas = relative_deltas(base, ft)
    info = {
        "spec": asdict(spec),
        "torch": torch.__version__,
        "corpus": {
            "pretrain_files": sorted(PRETRAIN_FILES),
            "heldout_files": sorted(HELDOUT_FILES),
            "pretrain_sha256": hashlib.sha256(stdlib_text(PRETRAIN_FILES)).hexdigest(),
            "heldout_sha256": hashlib.sha256(stdlib_text(HELDOUT_FILES)).hexdigest(),
        },
        "train_seconds": round(train_s, 1),
        "pretrain_seconds": round(pretrain_s, 1),
        "train_cpu_seconds": round(cpu_s, 1),
        "threads": torch.get_num_threads(),
        "final_loss": {"pretrain": pre_loss, "finetune": ft_loss},
        "params": sum(p.numel() for p in base.parameters()),
        "relative_delta_norm": deltas.pop("all"),
        "relative_delta_by_kind": deltas,
        "accuracy_200_heldout": {"base": task.accuracy(base), "finetuned": task.accuracy(ft)},
        "python_perplexity": {"base": perplexity(base, python), "finetuned": perplexity(ft, python)},
        "kl_base_vs_finetuned": {
            "task": kl_divergence(base, ft, task.text_batches("task")),
            "python": kl_divergence(base, ft, python),
        },
    }
    return base, ft, info


# --- storage ----------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]  # the source checkout this module runs from (if any)


def shipped_dir() -> Optional[Path]:
    """Where the shipped pairs are: ``$DELTACOME_PAIRS_DIR``, else ``assets/pairs`` of the source
    checkout this module runs from; None when neither exists (e.g. an installed wheel)."""
    env = os.environ.get("DELTACOME_PAIRS_DIR")
    if env:
        return Path(env)
    here = REPO / "assets" / "pairs"
    return here if here.is_dir() else None


def default_cache_dir() -> Path:
    """``$DELTACOME_CACHE/pairs`` or ``~/.cache/deltacome_ao/pairs``; pairs live in ``<dir>/<name>``."""
    root = os.environ.get("DELTACOME_CACHE") or Path.home() / ".cache" / "deltacome_ao"
    return Path(root) / "pairs"


def _roles(name: str) -> tuple[str, ...]:
    """Model directories a pair stores: a pair fine-tuned from another pair's base stores only its fine-tune."""
    return ("finetuned",) if PAIRS[name].base_of else ("base", "finetuned")


def _complete(pair_dir: Path, name: str) -> bool:
    return all((pair_dir / r / f).is_file() for r in _roles(name) for f in ("config.json", "pair.json"))


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def build_pair(name: str, out_dir: Path) -> dict:
    """Train pair ``name`` and write ``out_dir/{base,finetuned}`` atomically (fp32 safetensors;
    only ``finetuned`` for a pair whose base is another pair's)."""
    spec = PAIRS[name]
    base, ft, info = train_pair(spec)
    models = {"base": base, "finetuned": ft}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        for role in _roles(name):
            model = models[role]
            model.save_pretrained(tmp / role)
            (tmp / role / "pair.json").write_text(json.dumps({"role": role, **info}, indent=2) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            os.replace(out_dir, old / "pair")
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def get_pair(name: str = "llama-arith", cache_dir: str | Path | None = None, rebuild: bool = False,
             build: bool = False) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir) of pair ``name``: the shipped copy (`shipped_dir`), else the cache.

    Neither present: FileNotFoundError saying how to build it, unless ``build=True`` (trains it into
    the cache, a few minutes on 2 cores). ``rebuild=True`` ignores both copies and rebuilds.
    """
    if name not in PAIRS:
        raise KeyError(f"unknown pair {name!r}; known: {sorted(PAIRS)}")
    root = shipped_dir()
    shipped = root / name if root is not None else None
    cached = Path(cache_dir or default_cache_dir()) / name
    base_of = PAIRS[name].base_of
    base_dir = get_pair(base_of, cache_dir, rebuild, build)[0] if base_of else None
    if not rebuild and shipped is not None and _complete(shipped, name):
        found = shipped
    elif not rebuild and _complete(cached, name):
        found = cached
    elif rebuild or build:
        build_pair(name, cached)
        found = cached
    else:
        raise FileNotFoundError(
            f"pair {name!r} is neither shipped ({shipped or 'no assets/pairs here: not a source checkout; set '}"
            f"{'' if shipped else 'DELTACOME_PAIRS_DIR'}) nor cached ({cached}); build it with "
            f"`python -m deltacome_ao.evaluation.pairs build --name {name}` (a few minutes) or get_pair(..., build=True)"
        )
    return base_dir or found / "base", found / "finetuned"


def load_pair(name: str = "llama-arith", cache_dir: str | Path | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Both models of pair ``name`` in fp32 and eval mode."""
    return tuple(_load(d) for d in get_pair(name, cache_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deltacome_ao.evaluation.pairs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="(re)build a pair and report its accuracies")
    b.add_argument("--name", nargs="+", default=["llama-arith"], choices=sorted(PAIRS))
    b.add_argument("--force", action="store_true", help="rebuild even if a complete copy exists")
    b.add_argument("--out", type=Path, help="directory to write the pairs into (default: the cache), as <out>/<name>")
    args = parser.parse_args(argv)

    for name in args.name:
        out = (args.out or default_cache_dir()) / name
        if _complete(out, name) and not args.force:
            info = json.loads((out / "finetuned" / "pair.json").read_text())
            print(f"{out} exists (use --force to rebuild)")
        else:
            info = build_pair(name, out)
            print(f"wrote {out}")
        acc = info["accuracy_200_heldout"]
        print(f"{name}: accuracy base={acc['base']:.3f} finetuned={acc['finetuned']:.3f}  "
              f"train time {info['train_seconds']:.0f}s  relative delta {info['relative_delta_norm']:.3f}")


if __name__ == "__main__":
    main()
