"""ComfyUI nodes: thin glue over the core. Nothing here imports ComfyUI at import time."""

from .extract_node import LoraExtract

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoraExtract": LoraExtract,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoraExtract": "LoRA Extract (fine-tuned - original)",
}
