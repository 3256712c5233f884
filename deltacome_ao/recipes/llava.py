"""LLaVA: only the language model's projections; the vision tower and the multimodal projector
keep the fine-tuned weights uncompressed, as in the Delta-CoMe paper."""

from . import Recipe, register_recipe

LLAVA = register_recipe(
    "llava",
    Recipe(
        "llava",
        targets=r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
        skip=r"(vision|multi_modal_projector)",
    ),
)
