"""Launch configurations and dispatch thresholds, kept as data.

NOT TUNED YET: every GPU value below is a starting point chosen from register-budget arithmetic
(checked with `benchmarks/kernels.py --aot`: no spills on sm_90), not from measurements — no GPU has
run these kernels so far. `benchmarks/kernels.py --tune` times the candidates on a GPU and prints
the winners to paste here; measured dispatch thresholds go into `DISPATCH_BY_GPU`, keyed by a
substring of `torch.cuda.get_device_name()`.

There is deliberately no `triton.autotune` on the serving path: autotuning benchmarks inside the
first call, which breaks CUDA-graph capture and `torch.compile(mode="reduce-overhead")`. Under
`TRITON_INTERPRET=1` a single large-block config is used (the interpreter pays per block step).
"""

from __future__ import annotations

import os

__all__ = [
    "DISPATCH_DEFAULT", "DISPATCH_BY_GPU", "GEMV", "GEMV_FP32_OVERRIDES", "GEMV_INTERPRET", "GEMV_CANDIDATES",
    "GEMM", "GEMM_FP32_OVERRIDES", "GEMM_INTERPRET", "GEMM_CANDIDATES", "TPROJ", "TPROJ_FP32_OVERRIDES",
    "TPROJ_INTERPRET", "DEQUANT", "DEQUANT_INTERPRET",
    "interpreting", "dispatch_thresholds", "gemv_block_m", "gemv_config", "gemm_config", "tproj_config",
    "dequant_config",
]

# ---------------------------------------------------------------------------------------------
# Dispatch: which implementation serves a call with M tokens (rows of x).
#   M <= decode_max_tokens          -> fused GEMV (one launch; base + delta)
#   M <= fused_gemm_max_tokens      -> fused tensor-core GEMM (t-projection + base/delta GEMM)
#   otherwise                       -> dequantise the factors once, then cuBLAS (3 matmuls)
# decode_max_tokens cannot exceed 16 (the GEMV kernel's largest token block).
DISPATCH_DEFAULT = {"decode_max_tokens": 16, "fused_gemm_max_tokens": 256}
# Measured overrides, keyed by a substring of torch.cuda.get_device_name(); e.g. "H100": {...}.
DISPATCH_BY_GPU: dict[str, dict[str, int]] = {}

# ---------------------------------------------------------------------------------------------
# Fused GEMV (decode). Keyed by BLOCK_M, the token block (tokens are padded up to it).
#   BC    : output "columns" per program; the program owns 8*BC output features (see delta_gemv.py)
#   BK    : reduction block of the base GEMV
#   BR_T  : singular vectors per t-program;  BC_T: its column block (8*BC_T input features per step)
#   BR_U  : singular vectors per step of the Û part
# BLOCK_M < 16 uses CUDA-core FMAs with a [BLOCK_M, 8*BC, BK] fp32 accumulator (keep it <= 64
# registers a thread); BLOCK_M == 16 uses tl.dot (tensor cores need every dim >= 16).
GEMV = {
    1: {"BC": 4, "BK": 256, "BR_T": 16, "BC_T": 16, "BR_U": 32, "num_warps": 8},  # 16 KB of W per step
    2: {"BC": 4, "BK": 64, "BR_T": 16, "BC_T": 8, "BR_U": 16, "num_warps": 4},
    4: {"BC": 4, "BK": 32, "BR_T": 16, "BC_T": 4, "BR_U": 16, "num_warps": 4},
    16: {"BC": 4, "BK": 128, "BR_T": 16, "BC_T": 16, "BR_U": 32, "num_warps": 4},
}
# fp32 activations: tl.dot runs in "ieee" fp32 (no tf32), which needs more registers.
GEMV_FP32_OVERRIDES = {16: {"BK": 64}}
GEMV_INTERPRET = {
    block_m: {"BC": 16, "BK": 128, "BR_T": 32, "BC_T": 16, "BR_U": 32, "num_warps": 1} for block_m in GEMV
}
# What `benchmarks/kernels.py --tune` tries (merged over the BLOCK_M entry).
GEMV_CANDIDATES = [
    {"BC": bc, "BK": bk, "num_warps": nw}
    for bc in (1, 2, 4, 8) for bk in (64, 128, 256) for nw in (2, 4, 8)
]

# ---------------------------------------------------------------------------------------------
# Fused prefill: t = (x V̂ᵀ)·sqrt|s| ("t-projection", TPROJ), then y = x W_baseᵀ + t (sign·sqrt|s|·Ûᵀ)
# in one tensor-core GEMM whose K loop runs over in_features and then over the rank (GEMM).
# GEMM configs by token count: (largest token count, config); the first entry that fits is used.
# Small M needs narrow N tiles so that every SM streams a share of W_base (M=64, BN=32: 128 programs
# for out=4096); large M wants big tiles for tensor-core reuse.
GEMM = [
    (64, {"BM": 64, "BN": 32, "BK": 128, "BR": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}),
    (256, {"BM": 64, "BN": 64, "BK": 64, "BR": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}),
    (None, {"BM": 128, "BN": 128, "BK": 64, "BR": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}),
]
GEMM_INTERPRET = {"BM": 32, "BN": 64, "BK": 64, "BR": 32, "GROUP_M": 8, "num_warps": 1, "num_stages": 1}
GEMM_CANDIDATES = [
    {"BM": bm, "BN": bn, "BK": bk, "num_warps": nw, "num_stages": ns}
    for bm in (64, 128) for bn in (32, 64, 128) for bk in (64, 128) for nw in (4, 8) for ns in (3,)
]
# t-projection by token count, like GEMM. Small M: split the in_features loop (SPLIT_K) so that the
# ≈r/BR rank chunks become enough programs (r ≈ 1000, BR = 32: 31 chunks; × 4 = 124 programs).
TPROJ = [
    (64, {"BM": 64, "BR": 32, "BK": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}),
    (256, {"BM": 64, "BR": 32, "BK": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3}),
    (None, {"BM": 64, "BR": 32, "BK": 64, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3}),
]
# fp32 activations ("ieee" fp32 tl.dot) spill with the tiles above; the dispatcher sends fp32 prefill
# to cuBLAS anyway, these only serve explicit calls of the fused path.
GEMM_FP32_OVERRIDES = {"BM": 64, "BN": 64, "BK": 32, "num_warps": 8, "num_stages": 3}
TPROJ_FP32_OVERRIDES = {"BK": 32, "num_warps": 8}
TPROJ_INTERPRET = {"BM": 32, "BR": 32, "BK": 64, "SPLIT_K": 1, "num_warps": 1, "num_stages": 1}

# ---------------------------------------------------------------------------------------------
# Whole-factor dequantisation (the cuBLAS prefill path).
DEQUANT = {"BLOCK_R": 16, "BLOCK_L": 256, "num_warps": 4}
DEQUANT_INTERPRET = {"BLOCK_R": 32, "BLOCK_L": 256, "num_warps": 1}


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dispatch_thresholds(device_name: str | None = None) -> dict[str, int]:
    out = dict(DISPATCH_DEFAULT)
    if device_name:
        for key, values in DISPATCH_BY_GPU.items():
            if key in device_name:
                out.update(values)
                break
    out["decode_max_tokens"] = min(out["decode_max_tokens"], max(GEMV))
    return out


def gemv_block_m(tokens: int) -> int:
    """Smallest GEMV token block holding `tokens` (1, 2, 4 or 16)."""
    for block_m in sorted(GEMV):
        if tokens <= block_m:
            return block_m
    raise ValueError(f"the fused GEMV takes at most {max(GEMV)} tokens, got {tokens}")


def gemv_config(block_m: int, fp32: bool = False) -> dict:
    if interpreting():
        return dict(GEMV_INTERPRET[block_m])
    cfg = dict(GEMV[block_m])
    if fp32:
        cfg.update(GEMV_FP32_OVERRIDES.get(block_m, {}))
    return cfg


def gemm_config(tokens: int, fp32: bool = False) -> dict:
    if interpreting():
        return dict(GEMM_INTERPRET)
    return {**_by_tokens(GEMM, tokens), **(GEMM_FP32_OVERRIDES if fp32 else {})}


def _by_tokens(table, tokens: int) -> dict:
    for max_tokens, cfg in table:
        if max_tokens is None or tokens <= max_tokens:
            return dict(cfg)
    return dict(table[-1][1])


def tproj_config(tokens: int, fp32: bool = False) -> dict:
    if interpreting():
        return dict(TPROJ_INTERPRET)
    return {**_by_tokens(TPROJ, tokens), **(TPROJ_FP32_OVERRIDES if fp32 else {})}


def dequant_config() -> dict:
    return dict(DEQUANT_INTERPRET if interpreting() else DEQUANT)
