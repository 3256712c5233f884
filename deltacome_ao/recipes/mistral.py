"""Mistral shares Llama's module names (GQA changes shapes, not names)."""

from . import Recipe, register_recipe
from .llama import LLAMA

MISTRAL = register_recipe("mistral", Recipe("mistral", targets=LLAMA.targets))
