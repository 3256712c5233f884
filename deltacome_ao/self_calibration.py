"""Calibration without user data: sequences sampled from the model itself (`calibration="self"`).

GPTQ and the global allocation's sensitivities need activations, and most users have no data of the
fine-tune's task at compression time. The fine-tuned model carries its own distribution: sequences
sampled from it (from its BOS token, or from a few given prompts) exercise the directions its weights
use, and with `source="base"` the base model's samples give generic coverage. Sampling is plain
ancestral sampling at `temperature`, seeded (a `torch.Generator`, never the global RNG), with the
model's KV cache; a sampled EOS starts a new document (BOS) so every sequence has `length` tokens.

`DeltaCoMeConfig(calibration="self")` is `SelfCalibration()`; `calibration="base"` is
`SelfCalibration(source="base")`; pass a `SelfCalibration(...)` to choose the numbers. The samples are
drawn when the model is compressed (`compress.plan_compression`), from the model being compressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = ["SelfCalibration", "SELF_SOURCES", "as_self_calibration", "sample_sequences", "self_calibration_samples"]

SELF_SOURCES = ("self", "base")


@dataclass(frozen=True)
class SelfCalibration:
    """How to sample calibration sequences from a model (no user data).

    samples: number of sequences; length: tokens per sequence (BOS included); source: "finetuned" (the
    model being compressed) or "base" (the base model: generic coverage); temperature: softmax
    temperature (1.0: the model's own distribution, so the next-token loss gradients on the samples are
    the true Fisher); seed: the sampler's seed; prompts: token-id prompts to continue (cycled over the
    sequences; default: the BOS token alone); batch_size: sequences sampled together.
    """

    samples: int = 64
    length: int = 128
    source: str = "finetuned"
    temperature: float = 1.0
    seed: int = 0
    prompts: Optional[tuple] = None
    batch_size: int = 32

    def __post_init__(self):
        for name in ("samples", "length", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "length" else 1):
                raise ValueError(f"SelfCalibration.{name} must be an integer >= {2 if name == 'length' else 1}, got {v!r}")
        if self.source not in ("finetuned", "base"):
            raise ValueError(f"SelfCalibration.source must be 'finetuned' or 'base', got {self.source!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ValueError(f"SelfCalibration.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SelfCalibration.seed must be an integer, got {self.seed!r}")
        if self.prompts is not None:
            prompts = tuple(tuple(int(t) for t in p) for p in self.prompts)
            if not prompts or any(not p for p in prompts) or any(len(p) >= self.length for p in prompts):
                raise ValueError("SelfCalibration.prompts: non-empty token-id sequences shorter than length")
            object.__setattr__(self, "prompts", prompts)


def as_self_calibration(value: Any) -> Optional[SelfCalibration]:
    """The `SelfCalibration` a `calibration=` value means ("self", "base" or one), else None."""
    if isinstance(value, SelfCalibration):
        return value
    if isinstance(value, str) and value in SELF_SOURCES:
        return SelfCalibration(source="finetuned" if value == "self" else "base")
    return None


def _start_token(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
        v = getattr(config, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int) and v >= 0:
            return v
    raise ValueError("the model's config has no bos_token_id (nor eos_token_id) to start sampling from; pass "
                     "SelfCalibration(prompts=[[token ids], ...])")


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out)[:, -1].float()


@torch.no_grad()
def sample_sequences(model: nn.Module, spec: SelfCalibration = SelfCalibration(), forward=None) -> list[torch.Tensor]:
    """`spec.samples` sequences of `spec.length` tokens sampled from `model` -> a list of [batch, length]
    long tensors (batches of `spec.batch_size`). Deterministic for a seed on one machine.

    forward: `(input_ids, past) -> (output with .logits, new past)`, to sample from other weights than
    the model's own (default: the model, with its KV cache)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    for field in _POSITION_FIELDS:  # past the model's context the samples (and their statistics) are garbage
        limit = getattr(config, field, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < spec.length:
            raise ValueError(f"SelfCalibration.length={spec.length} is longer than the model's context "
                             f"({field}={limit}); use length <= {limit}")
    bos = None
    prompts = spec.prompts
    if prompts is None:
        bos = _start_token(model)
        prompts = ((bos,),)
    else:
        try:
            bos = _start_token(model)
        except ValueError:
            bos = None
    eos = getattr(config, "eos_token_id", None)
    eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if isinstance(eos, int) else set())
    device = next(iter(model.parameters())).device
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    if forward is None:
        def forward(ids, past):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            return out, getattr(out, "past_key_values", None)

    batches = []
    for start in range(0, spec.samples, spec.batch_size):
        n = min(spec.batch_size, spec.samples - start)
        rows = [list(prompts[(start + i) % len(prompts)]) for i in range(n)]
        width = min(len(r) for r in rows)  # rows start together; longer prompts are forced token by token
        ids = torch.tensor([r[:width] for r in rows], dtype=torch.long, device=device)
        out, past = forward(ids, None)
        seq = ids
        while seq.shape[1] < spec.length:
            logits = _logits(out)
            if vocab is not None:
                logits = logits[:, :vocab]
            probs = torch.softmax(logits.cpu().double() / spec.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            pos = seq.shape[1]
            forced = torch.tensor([rows[i][pos] if pos < len(rows[i]) else -1 for i in range(n)])
            nxt = torch.where(forced >= 0, forced, nxt)
            if bos is not None and eos:  # a finished document: the next one starts with BOS
                prev_eos = torch.tensor([int(t) in eos for t in seq[:, -1].tolist()])
                nxt = torch.where(prev_eos & (forced < 0), torch.full_like(nxt, bos), nxt)
            nxt = nxt.to(device)[:, None]
            seq = torch.cat([seq, nxt], dim=1)
            if seq.shape[1] < spec.length:
                if past is None:
                    out, past = forward(seq, None)
                else:
                    out, past = forward(nxt, past)
        batches.append(seq)
    return batches


def self_calibration_samples(model: nn.Module, spec: SelfCalibration, base: Any = None) -> list[torch.Tensor]:
    """The calibration samples `spec` asks for: sampled from `model` (the fine-tuned model being
    compressed), or with `source="base"` from the same architecture holding the `base` weights
    (`BaseWeights` / state dict: every tensor of the model that the base has is replaced)."""
    if spec.source == "finetuned":
        return sample_sequences(model, spec)
    if base is None:
        raise ValueError("SelfCalibration(source='base') needs the base weights")
    state = dict(model.state_dict())
    device = next(iter(model.parameters())).device
    params = {}
    for key, value in state.items():
        if key in base:
            params[key] = base[key].to(device=device, dtype=value.dtype)

    def forward(ids, past):
        out = torch.func.functional_call(model, params, (), {"input_ids": ids, "past_key_values": past,
                                                             "use_cache": True})
        return out, getattr(out, "past_key_values", None)

    return sample_sequences(model, spec, forward=forward)
