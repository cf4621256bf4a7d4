"""Turn a selection into output tensors, metadata and a file name."""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..extract.errors import ExtractionInputError
from .decompose import DecomposedLayer
from .recipe import Recipe, format_threshold

OUTPUT_FORMAT = "1"


def layer_tensors(layer: DecomposedLayer, mask: torch.Tensor, rescale: float,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Balanced factors of the kept dimensions, ``alpha = scale * k`` so the input's scale stays.

    ``alpha / k * up @ down = rescale * U_k S_k Vh_k``; each factor carries sqrt of it.
    """
    keep = mask.to(layer.S.device)
    k = int(keep.sum())
    if k == 0:
        return {}
    s = layer.S[keep] * (rescale / layer.output_scale)
    root = s.clamp_min(0).sqrt()
    up = (layer.U[:, keep] * root).reshape(layer.out_features, k, *layer.up_tail)
    down = (layer.Vh[keep] * root[:, None]).reshape(k, *layer.down_tail)
    out = {
        f"{layer.prefix}.lora_up.weight": up.to(dtype).contiguous(),
        f"{layer.prefix}.lora_down.weight": down.to(dtype).contiguous(),
        f"{layer.prefix}.alpha": torch.tensor(layer.output_scale * k, dtype=torch.float32),
    }
    for key in (f"{layer.prefix}.lora_up.weight", f"{layer.prefix}.lora_down.weight"):
        if not bool(torch.isfinite(out[key]).all()):
            raise ExtractionInputError(
                f"layer {layer.prefix!r}: resized factors overflow {dtype}; use output dtype "
                "bf16 or fp32.")
    return out


def output_metadata(source_metadata: dict[str, str], recipe: Recipe, threshold: float,
                    ranks: dict[str, int], *, lora_name: str, base_name: str, output_dtype: str,
                    merge: list[tuple[str, float]] | None) -> dict[str, str]:
    """The source file's metadata, plus the recipe, threshold and per-layer ranks."""
    meta = dict(source_metadata)
    params = json.loads(recipe.to_json())
    params["threshold"] = format_threshold(threshold) if math.isinf(threshold) else threshold
    meta.update({
        "lora_resize.format": OUTPUT_FORMAT,
        "lora_resize.recipe": recipe.text,
        "lora_resize.params": json.dumps(params),
        "lora_resize.threshold": format_threshold(threshold),
        "lora_resize.ranks": json.dumps(ranks),
        "lora_resize.source": lora_name,
        "lora_resize.base": base_name,
        "lora_resize.output_dtype": output_dtype,
    })
    if merge is not None:
        meta["lora_resize.merge"] = json.dumps(merge)
    return meta


_UNSAFE = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


def output_file_name(lora_name: str, recipe: Recipe, threshold: float) -> str:
    """``<lora_name>_<recipe_details>_th<threshold>.safetensors`` (path characters replaced)."""
    stem = _UNSAFE.sub("_", lora_name).strip(". ") or "lora"
    return f"{stem}_{recipe.details()}_th{format_threshold(threshold)}.safetensors"


def check_not_an_input(path: str, inputs: list[str | None]) -> None:
    """Never write onto the base model or a LoRA being resized, whatever ``overwrite`` says."""
    for inp in inputs:
        if not inp or not os.path.exists(path):
            continue
        try:
            same = os.path.samefile(path, inp)
        except OSError:
            same = os.path.realpath(path) == os.path.realpath(inp)
        if same:
            raise ExtractionInputError(
                f"the output {path} would replace an input of this resize ({inp}); choose "
                "another output folder.")


def free_output_path(folder: str, file_name: str, overwrite: bool) -> str:
    """``folder/file_name``; when taken (and not ``overwrite``), the first free ``..._N`` variant."""
    path = os.path.join(folder, file_name)
    if overwrite or not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(file_name)
    n = 2
    while os.path.exists(os.path.join(folder, f"{stem}_{n}{ext}")):
        n += 1
    return os.path.join(folder, f"{stem}_{n}{ext}")
