"""LoRA resizing against the base model (torch/safetensors/numpy only, never ComfyUI).

Decompose each LoRA layer exactly (QR + small SVD), score its dimensions with recipes that
compare them to the base model's layers or to the LoRA itself, keep the best by threshold or
target size, and write one file per recipe.
"""

from .base_model import BaseModel
from .key_map import BaseTarget, KeyMap, build_key_map, map_prefixes
from .merge import LoraInput, open_lora_input, parse_lora_spec
from .pipeline import ResizeOptions, resize_lora
from .recipe import DEFAULT_RECIPES, Recipe, parse_recipe, parse_recipes
from .report import LayerResize, RecipeOutcome, ResizeReport

__all__ = [
    "DEFAULT_RECIPES", "BaseModel", "BaseTarget", "KeyMap", "LayerResize", "LoraInput", "Recipe",
    "RecipeOutcome", "ResizeOptions", "ResizeReport", "build_key_map", "map_prefixes",
    "open_lora_input", "parse_lora_spec", "parse_recipe", "parse_recipes", "resize_lora",
]
