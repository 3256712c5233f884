"""Train a real PEFT LoRA adapter on a zoo pair's base and task (CPU, minutes, fixed seeds).

    python -m deltacome_ao.evaluation.lora_train --pair llama-json --r 16 --out assets/lora/llama-json-r16

The adapter is what `compress_lora` is measured on (benchmarks/lora_import.py, docs/lora.md): a
LoRA fine-tune of the same base and task as the zoo's full fine-tune, so the two deltas can be
compared on the same accuracy / KL measurements. Supervised like the zoo's fine-tunes: the loss
covers only the answer (and EOS), the prompt is masked.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .pairs import PAIRS, REPO, load_pair

__all__ = ["LoraRecipe", "train_lora", "PROJECTIONS"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that determines a trained adapter (same software and CPU: the same bytes)."""

    pair: str = "llama-json"
    r: int = 16
    lora_alpha: int = 32
    target_modules: tuple = PROJECTIONS + ("lm_head",)
    steps: int = 200
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    threads: int = 2
    extra: dict = field(default_factory=dict)


def _lr(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train_lora(recipe: LoraRecipe = LoraRecipe(), out_dir: str | Path | None = None, progress: bool = True):
    """Train the adapter; returns (PeftModel in eval mode, facts). With `out_dir`: `save_pretrained`
    there (adapter_config.json, adapter_model.safetensors) plus `lora_train.json` with the facts."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    base, _ = load_pair(recipe.pair)
    task = PAIRS[recipe.pair].task
    config = LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.target_modules),
                        lora_dropout=0.0, task_type="CAUSAL_LM", **recipe.extra)
    model = get_peft_model(base, config)
    items = task.train_items()
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    loss = float("nan")
    for step in tqdm(range(recipe.steps), desc=f"LoRA r={recipe.r} on {recipe.pair}", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe.steps, recipe.lr)
        idx = torch.randint(0, len(items), (recipe.batch,), generator=gen).tolist()
        examples = [task.example(*items[i]) for i in idx]
        ids = torch.tensor([e for e, _ in examples], dtype=torch.long)
        labels = ids.clone()
        for row, (_, n_prompt) in enumerate(examples):
            labels[row, :n_prompt] = -100
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
    model.eval()
    facts = {"recipe": asdict(recipe), "train_seconds": round(time.perf_counter() - start, 1), "final_loss": loss,
             "torch": torch.__version__, "accuracy_200_heldout": task.accuracy(model)}
    if out_dir is not None:
        out = Path(out_dir)
        # the LoRA factors only (PEFT would also copy lm_head's unchanged base weight when it is a target)
        model.save_pretrained(str(out), save_embedding_layers=False)
        config_file = out / "adapter_config.json"
        config = json.loads(config_file.read_text())
        base_dir = Path(str(config.get("base_model_name_or_path") or ""))
        if base_dir.is_absolute() and base_dir.is_relative_to(REPO):  # no machine-specific path in the asset
            config["base_model_name_or_path"] = str(base_dir.relative_to(REPO))
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / "lora_train.json").write_text(json.dumps(facts, indent=2) + "\n")
    return model, facts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m deltacome_ao.evaluation.lora_train", description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="llama-json", choices=sorted(PAIRS))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    _, facts = train_lora(LoraRecipe(pair=args.pair, r=args.r, lora_alpha=args.alpha, steps=args.steps,
                                     batch=args.batch, lr=args.lr), args.out)
    print(json.dumps({k: facts[k] for k in ("train_seconds", "final_loss", "accuracy_200_heldout")}))


if __name__ == "__main__":
    main()
