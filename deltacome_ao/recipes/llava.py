"""LLaVA: by default every matmul weight is compressed, the vision tower's and the projector's
included. `LLAVA_LANGUAGE_ONLY` is the Delta-CoMe paper's choice — only the language model's
projections, the vision tower and the multimodal projector kept as the fine-tune has them; pass it as
`DeltaCoMeConfig(recipe=LLAVA_LANGUAGE_ONLY)` (not registered: it leaves much of a fine-tune dense)."""

from . import Recipe

LLAVA_LANGUAGE_ONLY = Recipe(
    "llava-language-only",
    targets=r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    skip=r"(vision|multi_modal_projector)",
)
