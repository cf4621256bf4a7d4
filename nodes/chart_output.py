"""Turn a report chart into a node's IMAGE output and its on-node preview."""

from __future__ import annotations

import torch
from PIL import Image

from ..charts import to_array
from . import comfy_adapter as comfy


def chart_outputs(img: Image.Image, name: str) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """``(IMAGE [1, H, W, 3] float in 0..1, ui "images" entries)`` for a chart image.

    The preview PNG goes to ComfyUI's temp folder, as PreviewImage does, so the chart shows on
    the node without filling the output folder.
    """
    image = torch.from_numpy(to_array(img)).unsqueeze(0)
    return image, [comfy.save_preview_png(img, name)]
