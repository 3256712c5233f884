"""Exceptions to the default selection, per architecture.

By default every weight a model uses as a matrix multiply gets a compressed delta (`nn.Linear`,
transformers' `Conv1D`, stacked MoE experts; `compress.matmul_layers`), whatever it is called; the
input and output embeddings keep the fine-tuned values unless `DeltaCoMeConfig(embeddings=True)`.
A recipe narrows that by name: two regular expressions over layer names (a module's name for a 2-D
weight, the parameter's full name for a stack of experts), `targets` selecting and `skip` vetoing.
`recipe_for` picks a registered recipe by `config.model_type`, else the generic one (everything).
No architecture needs one today; `llava.LLAVA_LANGUAGE_ONLY` is the paper's LLaVA choice (vision
tower and projector kept as the fine-tune has them), for `DeltaCoMeConfig(recipe=...)`.
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


# Every matmul weight (embeddings and lm_head are left out by the selection itself, not by name).
GENERIC = Recipe("generic", targets=r"")

RECIPES: dict[str, Recipe] = {}


def register_recipe(model_type: str, recipe: Recipe) -> Recipe:
    RECIPES[model_type] = recipe
    return recipe


def recipe_for(model_type: str | None) -> Recipe:
    return RECIPES.get(model_type or "", GENERIC)


from . import llava  # noqa: E402,F401  (the built-in recipes)
