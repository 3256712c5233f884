"""Quality metrics for comparing a (compressed) causal LM with its reference.

Generic over any module that maps ``input_ids`` to logits (HF causal LMs return an
object with ``.logits``; plain tensors are accepted too), so it can score models
rebuilt from compressed deltas without knowing how they were made.  Everything runs
under ``torch.no_grad()`` and reduces in fp32, whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["exact_match_accuracy", "kl_divergence", "perplexity"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs):
    """Run the model; return (fp32 logits, the raw output) so callers can reuse a KV cache."""
    out = model(input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float(), out


@torch.no_grad()
def exact_match_accuracy(
    model: torch.nn.Module,
    prompts: Sequence[str],
    answers: Sequence[str],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    batch_size: int = 128,
    eos_token_id: int | None = None,
) -> float:
    """Fraction of prompts whose greedy continuation decodes exactly to the answer.

    Prompts are grouped by token length so batches need no padding (padding would
    need per-model attention-mask/position handling); each group is decoded greedily
    with the model's KV cache.  ``decode`` receives the generated ids (the EOS token
    included when produced) and is responsible for cutting at EOS.  Generation of a
    batch stops early once every row has emitted ``eos_token_id`` (taken from the
    model config when not given).
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if not prompts:
        return float("nan")
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    device = _device(model)
    groups: dict[int, list[int]] = defaultdict(list)
    encoded = [encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)

    correct = 0
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
            generated = _greedy(model, ids, max_new_tokens, eos_token_id)
            for row, gen in zip(rows, generated.tolist()):
                correct += decode(gen) == answers[row]
    return correct / len(prompts)


def _greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns only the new tokens."""
    new_tokens = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits, out = _logits(model, ids, use_cache=True)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        new_tokens.append(nxt)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits, out = _logits(
                model, nxt[:, None], past_key_values=out.past_key_values, use_cache=True
            )
    return torch.stack(new_tokens, dim=1)


@torch.no_grad()
def kl_divergence(
    model: torch.nn.Module, reference: torch.nn.Module, batches: Iterable[torch.Tensor], start: int = 1
) -> float:
    """Mean per-token KL(reference || model) of next-token distributions, in nats.

    Over every position of every (unpadded) ``[batch, seq]`` id tensor that predicts a
    token at index ``start`` or later (e.g. only the answer of a prompt + answer row): a
    token-weighted mean, 0 for identical models, larger the more the model's predictions drift.
    """
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(_device(reference))
        ref_logp = F.log_softmax(_logits(reference, ids)[0][:, start - 1 : -1], dim=-1)
        logp = F.log_softmax(_logits(model, ids.to(_device(model)))[0][:, start - 1 : -1].to(ref_logp.device), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        total += kl.sum().item()
        count += kl.numel()
    return total / count


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[torch.Tensor], start: int = 1) -> float:
    """exp of the mean next-token negative log-likelihood of the tokens at index ``start`` or later."""
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(_device(model))
        logits = _logits(model, ids)[0][:, start - 1 : -1]
        target = ids[:, start:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += nll.item()
        count += target.numel()
    return math.exp(total / count)
