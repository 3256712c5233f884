"""Tiny Hugging Face causal LMs and synthetic fine-tunes shared by the tests."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB, HIDDEN, LAYERS = 128, 64, 2
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NAMES = sorted(f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJ)


def tiny(arch: str = "llama", seed: int = 0, anisotropic: bool = False, **overrides) -> torch.nn.Module:
    """A random-init model; `anisotropic` rescales embedding dims so hidden states are anisotropic,
    as in trained models (what calibration exploits)."""
    config_cls, model_cls = ARCHS[arch]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    if anisotropic:
        hidden = kwargs["hidden_size"]
        with torch.no_grad():
            model.model.embed_tokens.weight *= torch.logspace(-1, 0.5, hidden)[torch.randperm(hidden)]
    return model


def finetune(base: torch.nn.Module, seed: int = 1, rank: int = 2, scale: float = 0.01, noise: float = 1e-4):
    """Deepcopy of `base` with a rank-`rank` delta plus noise on every 2-D weight (embeddings and
    lm_head included) and a small change of every 1-D parameter (norms, biases)."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.ndim == 2:
                o, i = p.shape
                low = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / rank**0.5
                p += scale * low + noise * torch.randn(o, i, generator=g)
            else:
                p += scale * torch.randn(p.shape, generator=g)
    return ft


def structured_finetune(base: torch.nn.Module, seed: int = 10, rank: int = 4, scale: float = 0.05):
    """base + a rank-`rank` delta with decaying spectrum on every projection only."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and name.endswith("proj.weight"):
                o, i = p.shape
                u = torch.linalg.qr(torch.randn(o, rank, generator=g))[0]
                v = torch.linalg.qr(torch.randn(i, rank, generator=g))[0]
                s = 1 / (torch.arange(rank) + 1.0) ** 0.5
                p += scale * p.norm() / s.norm() * (u * s) @ v.T
    return ft


def ids(seed: int = 2, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_error(model, reference, x) -> float:
    with torch.no_grad():
        ref = reference(x).logits
        return ((model(x).logits - ref).norm() / ref.norm()).item()
