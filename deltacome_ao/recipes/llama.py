"""Llama: q/k/v/o projections and the gate/up/down MLP (the layers Delta-CoMe compresses)."""

from . import Recipe, register_recipe

LLAMA = register_recipe(
    "llama", Recipe("llama", targets=r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
)
