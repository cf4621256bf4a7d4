"""The LoraLoadComplete node: LoraLoader, plus the parameters ComfyUI's load leaves unpatched."""

from __future__ import annotations

import logging
import os

from . import comfy_adapter as comfy
from .comfy_io import io
from .extract_node import CATEGORY
from .file_inputs import listed_file

log = logging.getLogger(__name__)


# The last LoRA file read, as (path, size, mtime, state dict): a queue that changes only the
# strengths reuses it, as LoraLoader does (V3 nodes keep no instance state between runs).
_last_loaded: list[tuple[str, int, float, dict]] = []


def _load_cached(path: str) -> dict:
    stat = os.stat(path)
    if _last_loaded and _last_loaded[0][:3] == (path, stat.st_size, stat.st_mtime):
        return _last_loaded[0][3]
    lora = comfy.load_lora_file(path)
    _last_loaded[:] = [(path, stat.st_size, stat.st_mtime, lora)]
    return lora


class LoraLoadComplete(io.ComfyNode):
    """Apply a LoRA to MODEL (and CLIP) exactly as LoraLoader does, and apply every key.

    ComfyUI accepts ``.diff`` patches on parameters that sit directly on a module with
    sub-modules (WAN ``blocks.N.modulation``, SD3 ``pos_embed``) but never applies them when it
    loads the model. This node registers a load callback on the patched model that applies them
    through the ModelPatcher, so unloading or changing the strength restores them like any
    other patched weight.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLoadComplete",
            display_name="Load LoRA (complete)",
            category=CATEGORY,
            description=("Loads a LoRA like 'Load LoRA' (same keys, same strengths) and also "
                         "applies the diffs ComfyUI's loader skips: parameters of modules with "
                         "sub-modules, such as WAN's blocks.N.modulation and SD3's pos_embed."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA is applied to."),
                io.Combo.Input("lora_name", options=comfy.lora_file_names(),
                               tooltip="A LoRA from the loras folder."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to modify the diffusion model (as in 'Load "
                                       "LoRA')."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the text encoder to patch too."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               optional=True,
                               tooltip="How strongly to modify the CLIP model (ignored without a "
                                       "CLIP)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA applied."),
                io.Clip.Output(tooltip="The CLIP with the LoRA applied (empty when no CLIP is "
                                       "connected)."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float, clip=None,
                strength_clip: float = 1.0) -> io.NodeOutput:
        if clip is None:
            strength_clip = 0.0
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        path = listed_file("lora_name", lora_name, folder="loras",
                           fix="refresh the node (R) and pick an existing file.")
        new_model, new_clip, extra = comfy.load_lora_complete(
            model, clip, _load_cached(path), strength_model, strength_clip)
        if extra:
            log.info("%s: %d patched parameter(s) ComfyUI's load skips are applied on load "
                     "(e.g. %s)", lora_name, len(extra), extra[0])
        return io.NodeOutput(new_model, new_clip)
