"""The architecture matrix: tiny models of many Hugging Face architectures, each checked end to end.

    python benchmarks/architectures.py            # every architecture -> docs/architectures.md
    tests/test_architectures.py                   # the same checks, asserted

For each architecture a random base is built from a transformers config (tiny shapes, every model
type's own modules) and two synthetic fine-tunes that move *every* parameter: each matrix (each expert
matrix of a stacked parameter too) by a rank-4 update of decaying spectrum (5% of the matrix's norm)
plus full-rank noise (0.2%), each vector (norms, biases) by 2% noise. `check` then measures:

- the share of changed parameters that is compressed (outside the input/output embeddings, which are
  reported apart: kept exact unless `DeltaCoMeConfig(embeddings=True)`), and what is left and why;
- the logit error of the compressed model against the fine-tune, relative to the base–fine-tune gap;
- `torch.compile(fullgraph=True)` against eager;
- the delta artifact round trip (`save_delta` -> `load_delta` on a fresh base: bit-identical logits);
- the Hugging Face round trip through the model's *own* `save_pretrained` -> `from_pretrained`
  (bit-identical logits);
- `MultiDeltaModel`: a batch mixing the two fine-tunes and the base, each row against that model
  alone (or, where a mixed batch could not give every row its own model, the refusal at `load_delta`);
- the delta's size: compressed bytes against the fp16 bytes of the parameters it covers.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ARCHITECTURES", "Arch", "tiny_base", "tiny_finetune", "inputs_for", "check", "format_table"]

VOCAB, HIDDEN = 128, 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: a transformers `model_type` and the config fields of its tiny model."""

    name: str
    model_type: str
    config: dict
    auto: str = "AutoModelForCausalLM"
    moe: bool = False
    notes: str = ""
    compile_text_only: bool = False  # transformers cannot compile the image path with fullgraph=True (LLaVA)


def _llava_config() -> dict:
    return dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **{**_COMMON, "vocab_size": VOCAB}),
        image_token_index=VOCAB - 1, image_seq_length=16, vision_feature_layer=-1,
    )


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", "llama", dict(_COMMON, tie_word_embeddings=False)),
    Arch("llama (tied)", "llama", dict(_COMMON, tie_word_embeddings=True)),
    Arch("mistral", "mistral", dict(_COMMON)),
    Arch("qwen2", "qwen2", dict(_COMMON), notes="q/k/v biases"),
    Arch("qwen3", "qwen3", dict(_COMMON, head_dim=16), notes="q/k norms"),
    Arch("gemma2", "gemma2", dict(_COMMON, head_dim=16), notes="scaled embedding, tied, soft-capping"),
    Arch("gemma3_text", "gemma3_text", dict(_COMMON, head_dim=16), notes="scaled embedding, tied"),
    Arch("phi3", "phi3", dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2), notes="fused qkv / gate_up"),
    Arch("olmo2", "olmo2", dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    Arch("starcoder2", "starcoder2", dict(_COMMON, bos_token_id=1, eos_token_id=2), notes="c_fc / c_proj, biases"),
    Arch("gpt2", "gpt2", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2), notes="Conv1D (in, out) weights, learned positions"),
    Arch("gpt_neox", "gpt_neox", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                                     eos_token_id=2), notes="fused query_key_value"),
    Arch("falcon", "falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                 bos_token_id=1, eos_token_id=2), notes="FalconLinear: x @ W.T"),
    Arch("mixtral", "mixtral", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2), moe=True,
         notes="stacked experts (E, 2I, H) / (E, H, I)"),
    Arch("qwen2_moe", "qwen2_moe", dict(_COMMON, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                       num_experts=4, num_experts_per_tok=2), moe=True,
         notes="stacked experts + shared expert"),
    Arch("qwen3_moe", "qwen3_moe", dict(_COMMON, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                       head_dim=16), moe=True, notes="stacked experts"),
    Arch("llava", "llava", _llava_config(), auto="AutoModelForImageTextToText", compile_text_only=True,
         notes="CLIP vision tower + projector + llama"),
]}


def _config(arch: Arch):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.model_type, **copy.deepcopy(arch.config))


def tiny_base(arch: Arch, seed: int = 0) -> torch.nn.Module:
    """A random-init model of `arch` (eval mode, fp32)."""
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch.auto).from_config(_config(arch))
    return model.eval()


@torch.no_grad()
def tiny_finetune(base: torch.nn.Module, seed: int = 1, rank: int = 3, scale: float = 0.05,
                  noise: float = 0.002) -> torch.nn.Module:
    """A copy of `base` with every parameter moved (see the module docstring)."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for p in ft.parameters():
        if p.dim() >= 2:
            mats = p.view(-1, *p.shape[-2:])
            for m in mats:
                o, i = m.shape
                r = min(rank, o, i)
                u = torch.linalg.qr(torch.randn(o, r, generator=g))[0]
                v = torch.linalg.qr(torch.randn(i, r, generator=g))[0]
                s = 1 / (torch.arange(r) + 1.0)
                low = (u * s) @ v.T
                n = torch.randn(o, i, generator=g)
                norm = m.norm().clamp_min(1e-6)
                m += scale * norm * low / low.norm() + noise * norm * n / n.norm()
        else:
            p += 0.02 * (p.abs().mean() + 1e-3) * torch.randn(p.shape, generator=g)
    return ft


def inputs_for(arch: Arch, model: torch.nn.Module, batch: int = 3, length: int = 12, seed: int = 5) -> dict:
    """Model inputs for a forward: token ids (LLaVA: a 16-token image of random pixels, then text)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, length), generator=g)
    if arch.model_type != "llava":
        return {"input_ids": ids}
    config = model.config
    image = torch.full((batch, config.image_seq_length), config.image_token_index)
    size = config.vision_config.image_size
    return {"input_ids": torch.cat([image, ids], dim=1), "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@dataclass
class Row:
    """The measurements of one architecture (see `check`)."""

    arch: str
    model_type: str
    share: float = math.nan
    embedding_params: int = 0
    uncompressed: dict = field(default_factory=dict)
    error_ratio: float = math.nan
    compile_diff: float = math.nan
    artifact_exact: Optional[bool] = None
    hf_exact: Optional[bool] = None
    serving: str = ""
    serving_diff: float = math.nan
    refusal: str = ""
    delta_bytes: int = 0
    fp16_bytes: int = 0
    artifact_bytes: int = 0
    model_bytes: int = 0
    embeddings_error_ratio: float = math.nan
    embeddings_share: float = math.nan
    seconds: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


def _auto(arch: Arch):
    import transformers

    return getattr(transformers, arch.auto)


def check(arch: Arch, compile: bool = True, serving: bool = True, hf: bool = True, embeddings: bool = False,
          workdir: Optional[Path] = None, dtype: torch.dtype = torch.float32, backend: str = "inductor") -> Row:
    """Run every check of the matrix on `arch` (see the module docstring). Failures are recorded in
    `Row.errors` (check name -> message), never raised, so a table shows every architecture.
    `backend`: torch.compile's backend ("inductor", or "aot_eager": the same full-graph capture without
    code generation, a few times faster). With `compile_text_only` (LLaVA) the compile check runs on the
    text path: transformers' own image path does not compile with fullgraph=True (base model included)."""
    from .. import hf  # noqa: F401  (registers the quantizer: the model's own save_pretrained works)
    from ..artifact import load_delta, save_delta
    from ..compress import compress_, coverage_report
    from ..config import DeltaCoMeConfig
    from ..serving import MultiDeltaModel, UnsupportedDeltaError

    row = Row(arch.name, arch.model_type)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="deltacome-arch-"))
    clock = time.perf_counter
    t0 = clock()
    base = tiny_base(arch).to(dtype)
    fts = [tiny_finetune(base, seed=s) for s in (1, 2)]
    x = inputs_for(arch, base)
    config = DeltaCoMeConfig(base=base, progress=False)
    models = []
    for ft in fts:
        model = copy.deepcopy(ft)
        compress_(model, config)
        models.append(model)
    row.seconds["compress"] = clock() - t0
    model = models[0]
    cov = coverage_report(model, base)
    row.share, row.embedding_params = cov["share_outside_embeddings"], cov["embedding_params"]
    row.uncompressed = cov["uncompressed_by_reason"]
    ref, base_logits, got = _logits(fts[0], x), _logits(base, x), _logits(model, x)
    row.error_ratio = _rel(got, ref) / _rel(base_logits, ref)

    if compile:
        t0 = clock()
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            cx = {"input_ids": x["input_ids"][:, -8:]} if arch.compile_text_only else x
            row.compile_diff = _rel(_logits(compiled, cx), _logits(model, cx))
        except Exception as e:  # recorded: the table shows what fails
            row.errors["compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            torch._dynamo.reset()
        row.seconds["compile"] = clock() - t0

    t0 = clock()
    paths = []
    for i, m in enumerate(models):
        path = tmp / f"delta-{i}"
        save_delta(m, path, base=base, config=config, overwrite=True)
        paths.append(path)
    try:
        loaded = load_delta(copy.deepcopy(base), paths[0])
        row.artifact_exact = torch.equal(_logits(loaded, x), got)
    except Exception as e:
        row.errors["artifact"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row.artifact_bytes = sum(f.stat().st_size for f in paths[0].iterdir())
    from ..format import read_delta_config

    document = read_delta_config(paths[0])
    row.delta_bytes = document["bytes"]["compressed"]
    row.fp16_bytes = 2 * sum(math.prod(s["shape"]) for s in document["layers"].values())
    row.model_bytes = sum(p.numel() for p in fts[0].parameters()) * 2
    row.seconds["artifact"] = clock() - t0

    if hf:
        t0 = clock()
        try:
            model.save_pretrained(tmp / "hf")  # the model's own method
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded = _auto(arch).from_pretrained(tmp / "hf", dtype=dtype).eval()
            row.hf_exact = torch.equal(_logits(reloaded, x), got)
        except Exception as e:
            row.errors["hf"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        row.seconds["hf"] = clock() - t0

    if serving:
        t0 = clock()
        try:
            served = MultiDeltaModel(copy.deepcopy(base))
            try:
                for i, path in enumerate(paths):
                    served.load_delta(f"ft{i}", path)
            except UnsupportedDeltaError as e:
                row.serving = "refused"
                row.refusal = "stacked MoE experts" if "experts" in str(e) else str(e).split(":")[0][:80]
                row.errors["serving_refusal"] = str(e).splitlines()[0][:300]
            else:
                n = x["input_ids"].shape[0]
                ids = (["ft0", "ft1", None] * n)[:n]
                out = served(**x, delta_ids=ids).logits
                alone = {"ft0": got, "ft1": _logits(models[1], x), None: base_logits}
                diffs = [_rel(out[r], alone[d][r]) for r, d in enumerate(ids)]
                row.serving_diff = max(diffs)
                row.serving = "per row"
        except Exception as e:
            row.errors["serving"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        row.seconds["serving"] = clock() - t0

    if embeddings:
        t0 = clock()
        m = copy.deepcopy(fts[0])
        compress_(m, DeltaCoMeConfig(base=base, progress=False, embeddings=True))
        row.embeddings_error_ratio = _rel(_logits(m, x), ref) / _rel(base_logits, ref)
        row.embeddings_share = coverage_report(m, base)["share"]
        row.seconds["embeddings"] = clock() - t0
    return row


def format_table(rows: list[Row]) -> str:
    """The matrix as a markdown table."""
    def yes(v):
        return "—" if v is None else ("yes" if v else "**no**")

    lines = [
        "| architecture | compressed share (outside embeddings) | left uncompressed | logit error / base gap | "
        "compile == eager | artifact round trip | HF round trip | MultiDeltaModel rows | delta / fp16 of covered |",
        "|---|---:|---|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        left = ", ".join(f"{k} {v:,}" for k, v in r.uncompressed.items() if k not in ("embedding", "lm_head")) or "—"
        compile_ok = ("—" if math.isnan(r.compile_diff) else
                      f"yes ({r.compile_diff:.0e})" if r.compile_diff < 1e-4 else f"**no** ({r.compile_diff:.1e})")
        if "compile" in r.errors:
            compile_ok = "**error**"
        serving = ("—" if not r.serving else
                   f"== alone ({r.serving_diff:.0e})" if r.serving == "per row" and r.serving_diff < 1e-4 else
                   f"refused at load_delta ({r.refusal})" if r.serving == "refused" else f"**differs** ({r.serving_diff:.1e})")
        if "serving" in r.errors:
            serving = "**error**"
        lines.append(
            f"| {r.arch} | {100 * r.share:.1f}% | {left} | {r.error_ratio:.3f} | {compile_ok} | "
            f"{yes(r.artifact_exact) if 'artifact' not in r.errors else '**error**'} (bit-exact) | "
            f"{yes(r.hf_exact) if 'hf' not in r.errors else '**error**'} (bit-exact) | {serving} | "
            f"{r.delta_bytes / max(r.fp16_bytes, 1):.4f} |"
        )
    return "\n".join(lines)
