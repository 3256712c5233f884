"""`export_lora`: a delta artifact as a PEFT LoRA adapter (PEFT, vLLM, SGLang, LoRAX, TGI load it).

A Delta-CoMe delta is low rank: `Û diag(s) V̂`, so `B = Û diag(s)` (out, r) and `A = V̂` (r, in)
is a LoRA of rank r with scaling 1 (`lora_alpha = r`). What LoRA engines cannot hold, and what this
module does about it:

- **Rank caps** (vLLM: `--max-lora-rank` ≤ 512, one `r` for all modules). With `rank` / `max_rank`
  each module keeps its top singular directions of the *dequantized* delta (the exact SVD of
  `Û diag(s) V̂`, by QR of the factors: the best rank-k approximation, Eckart–Young), not its first
  k stored vectors (`selection="stored"`, the naive truncation). `allocation="global"` spends a
  total budget — the parameters of rank `rank` everywhere — on the directions with the largest
  σ² per parameter across all modules (PEFT `rank_pattern`; capped by `max_rank`).
- **Kept tensors** (embeddings, lm_head, norms, biases: the fine-tune's non-linear deltas).
  PEFT: `modules_to_save` (exact); an embedding / lm_head delta can instead be a LoRA target
  (`embeddings="lora"`: its own truncated SVD, measured); biases of LoRA targets as `lora_bias`.
  vLLM refuses `modules_to_save` and LoRA bias: with `vllm=True` the embedding / lm_head deltas are
  LoRA targets (or dropped), norms and biases are dropped, every module is zero-padded to one `r`,
  and the factors are stored in fp16 / bf16 (`peft_format.vllm_problems` checks the result).

Everything that could not be represented exactly is listed in the report (`deltacome_lora.json` in
the adapter directory, also returned) with its size and the relative error of what was exported.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from ..artifact import DeltaCoMeModel, get_tensor, load_delta, read_delta_config
from ..checkpoint import few, write_dir_atomic
from ..compress import compressed_layers, is_conv1d
from ..decompose import delta_svd, product_svd
from ..delta_tensor import DeltaTensor, dtype_name
from ..hub import base_reference, card_text, looks_like_repo_id, resolve_delta_dir
from ..restore import forget, replaced_tensors
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    VLLM_MAX_RANK,
    adapter_config,
    lora_keys,
    vllm_problems,
)

__all__ = ["export_lora", "REPORT_NAME", "EMBEDDING_MODES", "ALLOCATIONS", "SELECTIONS"]

REPORT_NAME = "deltacome_lora.json"
EMBEDDING_MODES = ("full", "lora", "drop")
ALLOCATIONS = ("uniform", "global")
SELECTIONS = ("svd", "stored")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree sharing every tensor (so loading a delta onto it leaves `model` as it is)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _load(base: Any, delta: Path, verify: str):
    """(model with the delta on, {name: base tensor it replaced})."""
    if isinstance(base, torch.nn.Module):
        model = load_delta(_structural_copy(base), delta, verify=verify)
    else:
        model = DeltaCoMeModel.from_pretrained(base, delta, verify=verify)
    originals = replaced_tensors(model)
    forget(model)
    return model, originals


def _frob2(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖²_F without forming the product (Gram matrices, float64)."""
    left, right = left.double(), right.double()
    return float(torch.trace((left.T @ left) @ (right @ right.T)).clamp_min(0))


def _balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank-1 term's norm split evenly between B's column and A's row
    (keeps fp16 / bf16 factors away from their subnormal range)."""
    nb, na = b.norm(dim=0), a.norm(dim=1)
    c = torch.where((nb > 0) & (na > 0), (na / nb.clamp_min(1e-30)).sqrt(), torch.ones_like(nb))
    return b * c, a / c[:, None]


def _stored_factors(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (out, r), right (r, in)) with left @ right = the layer's dequantized delta, fp32:
    (Û diag(s), V̂) of low-rank kinds, the dense delta's SVD for others (BitDelta: full rank)."""
    f = weight.low_rank_factors()
    if f is not None:
        v, ut = f.dequantize()
        return (ut.T * f.s.float()).contiguous(), v.contiguous()
    svd = delta_svd(weight.delta_weight().float(), method="exact")
    return (svd.U * svd.S).contiguous(), svd.Vh.contiguous()


def _whitener(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """L (in, in), lower triangular, with L Lᵀ = H + damp · mean(diag H) · I (float64)."""
    h = hessian.double()
    h = h + damp * torch.diagonal(h).mean().clamp_min(1e-30) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(h)


class _Module:
    """One compressed layer's shape, stored rank and exact singular values of the dequantized delta —
    in weight space, or with a `whitener` L (L Lᵀ = the layer's input Hessian) in output space: the
    singular values of D̂ L, so that a dropped direction costs its σ² of ‖X (D̂ − B A)ᵀ‖². The factors
    themselves are rebuilt when exported (`factors`), one layer at a time, so a 7B export never holds
    every layer's fp32 factors at once."""

    def __init__(self, name: str, weight, whitener: Optional[torch.Tensor] = None):
        self.name, self.weight, self.whitener = name, weight, whitener
        self.out_features, self.in_features = weight.shape
        left, right = _stored_factors(weight)
        self.stored_rank = int(left.shape[1])
        self.S = self._svd(left, right).S
        self.norm2 = float(self.S.double().pow(2).sum())

    def _svd(self, left, right):
        if self.whitener is None:
            return product_svd(left, right)
        return product_svd(left, (right.double() @ self.whitener).float())

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def factors(self, k: int, selection: str):
        """(B (out, k'), A (k', in), left, right): the exported rank-k LoRA (fp32) and the stored factors."""
        left, right = _stored_factors(self.weight)
        if self.stored_rank <= k:
            return left, right, left, right  # everything: the stored factors themselves (exact)
        if selection == "stored":
            return left[:, :k], right[:k], left, right
        svd = self._svd(left, right)
        a = svd.Vh[:k]
        if self.whitener is not None:  # A L = V_kᵀ  ->  A = V_kᵀ L⁻¹
            a = torch.linalg.solve_triangular(self.whitener.T, a.double().T, upper=True).T.float()
        return svd.U[:, :k] * svd.S[:k], a, left, right


@torch.no_grad()
def _input_hessians(model: torch.nn.Module, names: list[str], samples) -> dict[str, torch.Tensor]:
    """{module: Σ xᵀx / N} of the inputs each named linear layer sees while `model` runs `samples`
    (input_ids tensors or dicts of model inputs)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for sample in samples:
            inputs = dict(sample) if isinstance(sample, dict) else {"input_ids": sample}
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if not counts[n]]
    if missing:
        raise ValueError(f"calibration never reached {missing[:3]}; give input_ids the model runs through them")
    return {n: (sums[n] / counts[n]).float() for n in names}


def _ranks(modules: list[_Module], rank: Optional[int], max_rank: Optional[int], allocation: str) -> dict[str, int]:
    caps = {m.name: min(m.rank, max_rank if max_rank is not None else m.rank) for m in modules}
    if allocation == "uniform":
        return {m.name: min(caps[m.name], rank if rank is not None else caps[m.name]) for m in modules}
    # global: the parameter budget of `rank` everywhere, spent on the largest σ² per parameter
    cost = {m.name: m.in_features + m.out_features for m in modules}
    budget = sum(min(m.rank, rank) * cost[m.name] for m in modules)
    items = sorted(((float(s) ** 2 / cost[m.name], m.name) for m in modules for s in m.S), reverse=True)
    chosen = {m.name: 0 for m in modules}
    for _, name in items:  # within a module σ decreases at a fixed cost: the picks are prefixes
        if chosen[name] < caps[name] and cost[name] <= budget:
            chosen[name] += 1
            budget -= cost[name]
    return chosen


def _classify(model: torch.nn.Module, name: str, compressed: set[str]) -> str:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, torch.nn.Embedding) and leaf == "weight":
        return "embedding"
    linear = isinstance(owner, torch.nn.Linear) or is_conv1d(owner)  # transformers' Conv1D (GPT-2) too
    if linear and leaf == "weight" and owner_name not in compressed:
        return "linear"
    if linear and leaf == "bias":
        return "bias"
    return "other"


def _rel(num2: float, den2: float) -> float:
    return math.sqrt(max(num2, 0.0) / den2) if den2 > 0 else 0.0


def export_lora(
    base: Any,
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: Optional[int] = None,
    max_rank: Optional[int] = None,
    allocation: str = "uniform",
    selection: str = "svd",
    calibration: Optional[Any] = None,
    damp: float = 0.01,
    embeddings: Optional[str] = None,
    embedding_rank: Optional[int] = None,
    vllm: bool = False,
    dtype: Optional[str | torch.dtype] = None,
    verify: str = "full",
    revision: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    base_revision: Optional[str] = None,
    overwrite: bool = False,
) -> dict:
    """Write the delta `delta` (a local artifact or Hub id) of `base` as a PEFT LoRA adapter in
    `out_dir`; returns the report (also written as `deltacome_lora.json` there).

    base: the base model (`nn.Module`, left untouched), a directory / Hub id, or None (the base the
        artifact records); checked against the delta's fingerprint (`verify`).
    rank: per-module rank (uniform), or the average rank of the budget (`allocation="global"`);
        None = every module at its full rank (the exact delta). max_rank: hard cap per module
        (default 512 = vLLM's largest `--max-lora-rank` with `vllm=True`).
    selection: "svd" (top singular directions of the dequantized delta) or "stored" (first stored
        vectors; the naive truncation, for comparison).
    calibration: input_ids tensors (or dicts of model inputs): the directions (and the global
        allocation) are then chosen in output space — the top singular directions of D̂ L with
        L Lᵀ = H + damp · mean(diag H) · I, H = Σ xᵀx / N of each layer's inputs on these samples —
        minimising ‖X (D̂ − B A)ᵀ‖ instead of ‖D̂ − B A‖ (also for lm_head's LoRA). Holds one
        (in, in) matrix per layer.
    embeddings: what to do with embedding / lm_head deltas: "full" (modules_to_save, exact; PEFT
        only; the default without `vllm`), "lora" (LoRA targets of rank `embedding_rank`, default
        `rank` / `max_rank` / full; the default with `vllm`) or "drop".
    vllm: produce what vLLM loads as-is (one `r`, zero-padded; no modules_to_save, no LoRA bias; fp16/bf16).
    dtype: of the LoRA factors: "float32" (exact checks), "float16", "bfloat16"; default the model's
        dtype (with `vllm`: fp16 unless the model is bf16).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    for label, v in (("rank", rank), ("max_rank", max_rank), ("embedding_rank", embedding_rank)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{label} must be a positive integer, got {v!r}")
    if allocation == "global" and rank is None:
        raise ValueError("allocation='global' needs rank= (the average rank whose parameter budget is spent)")
    embeddings = embeddings or ("lora" if vllm else "full")
    if embeddings not in EMBEDDING_MODES:
        raise ValueError(f"embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
    if vllm:
        if embeddings == "full":
            raise ValueError("vLLM refuses modules_to_save: use embeddings='lora' or 'drop' with vllm=True")
        max_rank = VLLM_MAX_RANK if max_rank is None else max_rank
        if max_rank > VLLM_MAX_RANK:
            raise ValueError(f"vLLM's --max-lora-rank is at most {VLLM_MAX_RANK}, got max_rank={max_rank}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if vllm and dtype == torch.float32:
        raise ValueError("vLLM serves LoRA in fp16 / bf16: use dtype float16 or bfloat16 with vllm=True")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")

    delta_path = resolve_delta_dir(delta, revision)
    document = read_delta_config(delta_path)
    if base is None:
        base = document.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{delta_path} records no base model; pass the base")
    model, originals = _load(base, delta_path, verify)
    model_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if dtype is None:
        dtype = model_dtype if (not vllm or model_dtype in (torch.float16, torch.bfloat16)) else torch.float16

    with torch.no_grad():
        layers = compressed_layers(model)
        stacked = sorted(n for n, w in layers.items() if w.dim() != 2)
        if stacked:
            raise NotImplementedError(
                f"{delta_path}: stacked MoE experts ({few(stacked)}) cannot be exported as a LoRA adapter (PEFT / vLLM "
                f"LoRA targets are 2-D linear modules); serve this delta with deltacome_ao (load_delta / MultiDeltaModel) "
                f"or the vLLM plugin (a model.save_pretrained directory)")
        # transformers' Conv1D (GPT-2) stores its weight (in, out): PEFT's lora_A / lora_B are those of the
        # (out, in) orientation, as for nn.Linear
        layers = {n: (w.t() if is_conv1d(model.get_submodule(n)) else w) for n, w in layers.items()}
        whiteners = {}
        if calibration is not None:
            dense_linears = [n.rpartition(".")[0] for n in document.get("kept", [])
                             if _classify(model, n, set(layers)) == "linear"]
            hessians = _input_hessians(model, list(layers) + dense_linears, list(calibration))
            whiteners = {n: _whitener(h, damp) for n, h in hessians.items()}
            del hessians
        modules = [_Module(name, w, whiteners.get(name)) for name, w in layers.items()]
        ranks = _ranks(modules, rank, max_rank, allocation)
        report_modules, lora = {}, {}  # lora: {module: (B, A, is_embedding)}
        total2 = lost2 = 0.0
        for m in modules:
            b, a, left, right = m.factors(ranks[m.name], selection)
            if dtype != torch.float32:
                b, a = _balanced(b, a)
            b, a = b.to(dtype), a.to(dtype)
            res_left, res_right = torch.cat([left, -b.float()], 1), torch.cat([right, a.float()], 0)
            err2, norm2 = _frob2(res_left, res_right), _frob2(left, right)
            out_err = None
            if m.whitener is not None:  # the error where it counts: ‖(D̂ − B A) L‖ / ‖D̂ L‖
                out_err = _rel(_frob2(res_left, res_right.double() @ m.whitener), m.norm2)
            del left, right, res_left, res_right
            total2, lost2 = total2 + norm2, lost2 + err2
            report_modules[m.name] = {"shape": [m.out_features, m.in_features], "stored_rank": m.stored_rank,
                                      "rank": int(b.shape[1]), "rel_error": _rel(err2, norm2)}
            if out_err is not None:
                report_modules[m.name]["output_rel_error"] = out_err
            if b.shape[1]:
                lora[m.name] = (b, a, False)

        # the kept tensors (and their tied aliases): what each becomes
        aliases = document.get("aliases", {})
        kept = list(document.get("kept", [])) + [al for al, target in aliases.items() if target in document.get("kept", [])]
        compressed = set(layers)
        dense, to_save, biases = {}, set(), {}
        lora_bias_ok = not vllm and embeddings != "lora"
        for name in kept:
            new = get_tensor(model, name).detach()
            old = originals.get(name)
            old = old.detach() if old is not None else None
            kind = _classify(model, name, compressed)
            diff = (new.float() - old.float()) if old is not None and old.shape == new.shape else None
            entry = {"kind": kind, "shape": list(new.shape),
                     "delta_norm": float(diff.norm()) if diff is not None else None,
                     "relative_delta": (float(diff.norm() / old.float().norm().clamp_min(1e-30)) if diff is not None else None)}
            owner = name.rpartition(".")[0]
            if diff is not None and not torch.any(diff):
                entry["as"] = "unchanged"
            elif kind in ("embedding", "linear") and embeddings == "full":
                entry["as"] = "modules_to_save"
                to_save.add(owner)
            elif kind in ("embedding", "linear") and embeddings == "lora" and diff is not None:
                k = min(embedding_rank or rank or max_rank or min(diff.shape), max_rank or min(diff.shape), min(diff.shape))
                whitener = whiteners.get(owner) if kind == "linear" else None
                if whitener is None:
                    svd = delta_svd(diff, rank=k, method="exact")
                    b, a = svd.U * svd.S, svd.Vh
                else:  # output space, as for the projections
                    svd = delta_svd((diff.double() @ whitener).float(), rank=k, method="exact")
                    b = svd.U * svd.S
                    a = torch.linalg.solve_triangular(whitener.T, svd.Vh.double().T, upper=True).T.float()
                if dtype != torch.float32:
                    b, a = _balanced(b, a)
                b, a = b.to(dtype), a.to(dtype)
                approx = b.float() @ a.float()
                entry.update({"as": "lora", "rank": int(b.shape[1]),
                              "rel_error": _rel(float((diff - approx).pow(2).sum()), float(diff.pow(2).sum()))})
                if b.shape[1]:
                    lora[owner] = (b, a, kind == "embedding")
            elif kind == "bias" and owner in lora and lora_bias_ok and diff is not None:
                entry["as"] = "lora_bias"
                biases[owner] = diff
            elif not vllm and (kind != "bias" or diff is None or owner not in compressed):
                entry["as"] = "modules_to_save"
                to_save.add(owner)
            else:
                entry["as"] = "dropped"
                entry["reason"] = ("vLLM refuses modules_to_save and LoRA bias" if vllm else
                                   "PEFT cannot combine lora_bias with embedding LoRA targets" if kind == "bias" else
                                   "embeddings='drop'")
            dense[name] = entry
        if embeddings == "drop":
            for name, entry in dense.items():
                if entry["kind"] in ("embedding", "linear") and entry.get("as") != "unchanged":
                    entry.update({"as": "dropped", "reason": "embeddings='drop'"})
        for owner in sorted(to_save & set(lora)):  # LoRA-targeted and saved whole (lm_head with a bias): whole
            lora.pop(owner)
            biases.pop(owner, None)
            for name, entry in dense.items():
                if name.rpartition(".")[0] == owner:
                    entry.update({"as": "modules_to_save", "rank": None, "rel_error": 0.0})

        # one r (vLLM: zero-padded) or rank_pattern (PEFT)
        r = max((b.shape[1] for b, _, _ in lora.values()), default=1)
        tensors, rank_pattern = {}, {}
        for module, (b, a, embedding) in sorted(lora.items()):
            k = b.shape[1]
            if vllm and k < r:
                b = torch.cat([b, b.new_zeros(b.shape[0], r - k)], 1)
                a = torch.cat([a, a.new_zeros(r - k, a.shape[1])], 0)
            elif k != r:
                rank_pattern[module] = k
            key_a, key_b = lora_keys(module, embedding)
            if embedding:  # ΔE = Aᵀ Bᵀ: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r)
                tensors[key_a], tensors[key_b] = b.T.contiguous(), a.T.contiguous()
            else:
                tensors[key_a], tensors[key_b] = a.contiguous(), b.contiguous()
        use_bias = bool(biases)
        if use_bias:
            for module, (b, _, _) in lora.items():
                tensors[f"{PREFIX}{module}.lora_B.bias"] = biases.get(module, torch.zeros(b.shape[0])).to(dtype).contiguous()
        for owner in sorted(to_save):
            sub = model.get_submodule(owner)
            for k, v in sub.state_dict().items():
                if isinstance(v, DeltaTensor):  # a module saved whole that holds a compressed weight: its dense value
                    v = v.dequantize().to(v.dtype)
                # a copy: tied modules saved whole (GPT-2's wte and lm_head) must not share memory in the file
                tensors[f"{PREFIX}{owner}.{k}"] = v.detach().clone().contiguous()

    # the base's name: given > the base's own Hub id > what the delta records > the base's path
    base_name, base_rev = base_reference(base, base_model_name_or_path, base_revision)
    recorded = document.get("base_model_name_or_path")
    if base_model_name_or_path is None and recorded and not looks_like_repo_id(base_name):
        base_name, base_rev = recorded, base_revision or document.get("base_revision")
    leaf_targets = sorted({m.rsplit(".", 1)[-1] for m in lora})
    config = adapter_config(
        r=r, target_modules=leaf_targets if vllm else sorted(lora), base_model_name_or_path=base_name,
        revision=base_rev, rank_pattern=rank_pattern, modules_to_save=sorted(to_save) or None, lora_bias=use_bias)
    not_represented = sorted(n for n, e in dense.items() if e.get("as") == "dropped")
    report = {
        "delta": str(delta_path),
        "target": "vllm" if vllm else "peft",
        "dtype": dtype_name(dtype),
        "r": r,
        "rank": rank,
        "max_rank": max_rank,
        "allocation": allocation,
        "selection": selection,
        "calibrated": calibration is not None,
        "embeddings": embeddings,
        "linear_rel_error": _rel(lost2, total2),
        "modules": report_modules,
        "dense": dense,
        "not_represented": not_represented,
        "modules_to_save": sorted(to_save),
        "bytes": {"adapter": sum(t.numel() * t.element_size() for t in tensors.values()),
                  "delta_artifact": int(sum((document.get("bytes") or {}).values()))},
    }

    def fill(tmp: Path):
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if vllm:  # by construction there are none; checked on the written files all the same
            report["vllm_problems"] = vllm_problems(tmp, max_lora_rank=max_rank)
            if report["vllm_problems"]:
                raise ValueError(f"the vLLM adapter would violate vLLM's constraints: {report['vllm_problems']}")
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(report, config, out.name), encoding="utf-8")

    write_dir_atomic(out, fill, overwrite)
    return report


def _card(report: dict, config: dict, name: str) -> str:
    base = config.get("base_model_name_or_path")
    front = {
        "base_model": base if looks_like_repo_id(base) else None,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "tags": ["lora", "deltacome", *(["vllm"] if report["target"] == "vllm" else [])],
    }
    dropped = report["not_represented"]
    body = f"""# {name}

A LoRA adapter exported from a Delta-CoMe delta (`{Path(report['delta']).name}`) by deltacome_ao's
`export_lora` ({report['target']} target, {report['dtype']}, r = {report['r']}, scaling 1).

| | |
|---|---|
| base model | {f'`{base}`' if base else 'not recorded'} |
| LoRA modules | {sum(1 for m in report['modules'].values() if m['rank'])} linear (relative error of the linear deltas: {report['linear_rel_error']:.3g}) |
| modules_to_save | {', '.join(report['modules_to_save']) or 'none'} |
| not represented | {', '.join(dropped) or 'nothing'} |
| adapter tensors | {report['bytes']['adapter']:,} B (the packed delta: {report['bytes']['delta_artifact']:,} B) |

Load with PEFT: `PeftModel.from_pretrained(base, "{name}")`; with vLLM:
`LLM(base, enable_lora=True, max_lora_rank={report['r'] if report['r'] <= 512 else 512})` and
`LoRARequest("{name}", 1, "{name}")`. Details in `{REPORT_NAME}`.
"""
    return card_text(front, body)
