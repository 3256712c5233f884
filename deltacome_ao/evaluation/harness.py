"""Run a (compressed) pair model through EleutherAI's lm-evaluation-harness.

``task.accuracy`` in :mod:`deltacome_ao.pairs` is our own greedy exact-match loop.  Numbers
reported with a standard harness are easier to trust and to compare, so this module runs
the same held-out problems through lm-eval's ``HFLM`` as a *local* task (a YAML file and a
JSONL file written to disk; nothing is downloaded) and returns the same metric.

Three pieces:

* :class:`ByteTokenizer` - the pairs' byte-level vocabulary (ids 0-255 = UTF-8 bytes,
  BOS 256, EOS 257, PAD 258) as a ``transformers.PreTrainedTokenizer``, because HFLM needs
  a Hugging Face tokenizer and the pairs have none.
* :func:`write_task` - the lm-eval task directory for a pair's held-out problems.
* :func:`harness_accuracy` - HFLM + lm-eval's evaluator on that task.

Why the result equals ``task.accuracy`` exactly (checked in ``tests/test_harness.py``):

* Prompt ids are identical: the tokenizer prepends BOS whenever special tokens are added
  (what HFLM asks for, with ``add_bos_token=True``), and :func:`harness_accuracy` asserts
  ``tok_batch_encode(prompt) == task.encode_prompt(prompt)`` for every problem.
* Generation is greedy with the same budget (``max_gen_toks`` = the reference's
  ``max_new_tokens``) and stops at EOS only; ``until`` holds no newline, because the
  reference counts an answer followed by a newline as wrong.
* The text is cut the same way: HF ``generate`` pads a row with PAD after its EOS, decoding
  drops special tokens, and bytes are decoded with ``errors="replace"`` like
  :func:`deltacome_ao.pairs.decode`.
* The score is Python string equality (a ``process_results`` hook) rather than lm-eval's
  built-in ``exact_match``, which compares NumPy unicode arrays; those drop trailing NUL
  characters, so ``"821\\x00"`` would count as ``"821"`` there but not in the reference.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizer

from .pairs import BOS, EOS, PAD, PAIRS, VOCAB_SIZE

__all__ = ["ByteTokenizer", "write_task", "harness_eval", "harness_accuracy"]


# --- tokenizer ------------------------------------------------------------------------
class ByteTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer with the pairs' ids, usable wherever transformers or lm-eval
    expect a tokenizer.

    Token strings are ``chr(byte)`` for the 256 byte ids and ``<bos>``/``<eos>``/``<pad>``
    for 256/257/258.  ``encode(text)`` gives ``[BOS] + utf8 bytes`` (``add_special_tokens=False``
    leaves BOS out), matching ``pairs.encode(text, bos=True)``.  ``decode`` turns byte runs
    back into text with ``errors="replace"``; special tokens are rendered by name unless
    ``skip_special_tokens=True``.  Nothing stops at EOS here: lm-eval cuts at its ``until``
    strings itself.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", **kwargs) -> None:
        def special(tok):
            return tok if isinstance(tok, AddedToken) else AddedToken(
                tok, lstrip=False, rstrip=False, normalized=False, special=True)

        bos_token, eos_token, pad_token = special(bos_token), special(eos_token), special(pad_token)
        # Fixed ids, set before the base class registers the special tokens, so they are not
        # appended at the end of the vocabulary in some other order.
        self._added_tokens_decoder = {BOS: bos_token, EOS: eos_token, PAD: pad_token}
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # never rewrite decoded text
        # Text is always bytes, as in pairs.encode: a literal "<eos>" in a prompt is 5 bytes.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        """Byte ids only (256); ``len(tokenizer)`` counts the three specials too (259)."""
        return 256

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        raise KeyError(f"not a byte token: {token!r}")

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < 256:
            return chr(index)
        raise KeyError(f"id {index} outside the vocabulary of {VOCAB_SIZE}")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run = [], bytearray()
        for tok in tokens:
            if tok in self._added_tokens_encoder:       # a special token rendered by name
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(tok)
            else:
                run.append(ord(tok))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> list[int]:
        """``[BOS] a`` (``[BOS] a [BOS] b`` for pairs), the way every pair prompt starts."""
        if token_ids_1 is None:
            return [BOS] + list(token_ids_0)
        return [BOS] + list(token_ids_0) + [BOS] + list(token_ids_1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1] + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else mask + [1] + [0] * len(token_ids_1)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2 if pair else 1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The vocabulary is fixed (256 bytes + 3 named specials): nothing to write."""
        return ()


# --- local lm-eval task -----------------------------------------------------------------
_METRICS_PY = '''\
"""Generated by deltacome_ao.harness: exact match as plain Python string equality."""


def process_results(doc, results):
    return {"exact_match": float(results[0] == doc["answer"])}
'''


def _task_name(pair: str) -> str:
    return "deltacome_" + "".join(c if c.isalnum() else "_" for c in pair)


def _max_new_tokens(task, answers: list[str]) -> int:
    """The reference's generation budget: ``answer_len + 1`` (room for the answer and EOS)."""
    answer_len = getattr(task, "answer_len", None)
    if answer_len is None:
        answer_len = max(len(a.encode("utf-8")) for a in answers)
    return int(answer_len) + 1


def write_task(out_dir: str | Path, pair: str = "llama-arith", n: int = 200, seed: int = 0) -> str:
    """Write an lm-eval task for ``pair``'s held-out problems to ``out_dir``; return its name.

    Files: ``<name>.yaml`` (``generate_until``, greedy, stop at EOS only, zero-shot),
    ``<name>.jsonl`` (one ``{"prompt", "answer"}`` per problem, the same ``n`` problems
    ``task.accuracy(n=n, seed=seed)`` scores) and ``deltacome_metrics.py`` (the exact-match
    hook; see the module docstring for why not lm-eval's own).  Use it from the command
    line with ``lm_eval --include_path OUT_DIR --tasks <name> ...``.
    """
    task = PAIRS[pair].task
    problems = task.eval_problems(n, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _task_name(pair)
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for prompt, answer in problems:
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    (out / "deltacome_metrics.py").write_text(_METRICS_PY)
    max_gen = _max_new_tokens(task, [a for _, a in problems])
    cfg = "\n".join([
        f"# Generated by deltacome_ao.harness.write_task({pair!r}, n={n}, seed={seed}).",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        f"  cache_dir: {json.dumps(str((out / 'hf_datasets_cache').resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        "num_fewshot: 0",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{answer}}"',
        'target_delimiter: ""',
        "generation_kwargs:",
        "  until: []          # HFLM adds the EOS token's text; a newline is not a stop",
        "  do_sample: false",
        f"  max_gen_toks: {max_gen}",
        "process_results: !function deltacome_metrics.process_results",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (out / f"{name}.yaml").write_text(cfg)
    return name


# --- evaluation ---------------------------------------------------------------------------
@contextmanager
def _quiet(level: int = logging.ERROR):
    """lm-eval logs a page per run at INFO; keep it to errors while we run it."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "accelerate")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _make_lm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                add_bos_token=True, max_length=model.config.max_position_embeddings)


def harness_eval(
    model, pair: str = "llama-arith", n: int = 200, seed: int = 0, *,
    batch_size: int = 64, task_dir: str | Path | None = None,
) -> dict:
    """Run ``model`` through lm-eval's HFLM on the local task; return accuracy and samples.

    Returns ``{"accuracy", "task", "n", "generations": [(prompt, answer, generated), ...]}``.
    Uses ``lm_eval.evaluator.evaluate`` with a ``TaskManager`` on the task directory rather
    than ``simple_evaluate``, which would also seed the global RNGs, ask the Hub for the
    model's sha and collect environment info; the evaluation itself is the same.
    ``task_dir`` keeps the task files (a temporary directory otherwise).
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    task = PAIRS[pair].task
    problems = task.eval_problems(n, seed)
    tokenizer = ByteTokenizer()
    with tempfile.TemporaryDirectory(prefix="deltacome_lm_eval_") as tmp, _quiet():
        out = Path(task_dir) if task_dir is not None else Path(tmp)
        name = write_task(out, pair, n, seed)
        lm = _make_lm(model, tokenizer, batch_size)
        for prompt, _ in problems:   # the harness must feed exactly the reference's ids
            ids, _mask = lm.tok_batch_encode([prompt])
            if ids[0].tolist() != task.encode_prompt(prompt):
                raise AssertionError(f"harness ids {ids[0].tolist()} != task ids for {prompt!r}")
        loaded = TaskManager(include_path=str(out), include_defaults=False).load([name])
        results = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=True)
    samples = results["samples"][name]
    generations = sorted(
        ((s["doc_id"], s["doc"]["prompt"], s["doc"]["answer"], s["filtered_resps"][0]) for s in samples),
    )
    return {
        "accuracy": float(results["results"][name]["exact_match,none"]),
        "task": name,
        "n": len(samples),
        "generations": [g[1:] for g in generations],
    }


def harness_accuracy(model, pair: str = "llama-arith", n: int = 200, seed: int = 0, *, batch_size: int = 64) -> float:
    """Greedy exact-match accuracy of ``model`` on ``pair``'s held-out problems, measured by
    lm-eval's ``HFLM`` on a local task; equals ``PAIRS[pair].task.accuracy(model, n, seed)``."""
    return harness_eval(model, pair, n, seed, batch_size=batch_size)["accuracy"]
