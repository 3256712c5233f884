"""Which linear layers of a model get a compressed delta, per architecture.

A recipe is a pair of regular expressions over module names: `targets` selects the layers to
compress, `skip` vetoes some of them (vision towers, projectors). Everything not selected keeps the
fine-tuned model's own weights. `recipe_for` picks by `config.model_type` and falls back to the
generic rule, which covers any Hugging Face causal LM whose projections are named `*proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Recipe", "GENERIC", "RECIPES", "recipe_for", "register_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    targets: str
    skip: str | None = None

    def selects(self, module_name: str) -> bool:
        if not re.search(self.targets, module_name):
            return False
        return not (self.skip and re.search(self.skip, module_name))


# Attention and MLP projections, as the paper compresses them; lm_head and embeddings stay.
GENERIC = Recipe("generic", targets=r"(^|\.)[A-Za-z0-9_]*proj$", skip=r"(^|\.)lm_head$")

RECIPES: dict[str, Recipe] = {}


def register_recipe(model_type: str, recipe: Recipe) -> Recipe:
    RECIPES[model_type] = recipe
    return recipe


def recipe_for(model_type: str | None) -> Recipe:
    return RECIPES.get(model_type or "", GENERIC)


from . import llama, llava, mistral  # noqa: E402,F401  (registers the built-in recipes)
