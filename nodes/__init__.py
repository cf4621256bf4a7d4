"""ComfyUI nodes: thin glue over the core. Nothing here imports ComfyUI at import time."""

from .extract_node import LoraExtract
from .extract_v2_node import LoraExtractV2
from .load_complete_node import LoraLoadComplete
from .merge_node import LoraMerge
from .resize_node import LoraResize
from .validate_node import LoraValidate

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoraExtract": LoraExtract,
    "LoraExtractV2": LoraExtractV2,
    "LoraResize": LoraResize,
    "LoraMerge": LoraMerge,
    "LoraValidate": LoraValidate,
    "LoraLoadComplete": LoraLoadComplete,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoraExtract": "LoRA Extract (fine-tuned - original)",
    "LoraExtractV2": "LoRA Extract V2 (block-swap VRAM manager)",
    "LoraResize": "LoRA Resize (base-model aware)",
    "LoraMerge": "LoRA Merge (weighted, to a rank or size)",
    "LoraValidate": "LoRA Validate (original + LoRA = fine-tuned?)",
    "LoraLoadComplete": "Load LoRA (complete)",
}
