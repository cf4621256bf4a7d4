"""ComfyUI nodes (V3 schema): thin glue over the core.

Importing this package imports ComfyUI's node API (``comfy_api.latest``, through
``comfy_io.py``); the pack imports it only when ComfyUI loads the pack
(``comfy_entrypoint`` in the pack's ``__init__.py``), never for the command line.
"""

from .comfy_io import ComfyExtension, io
from .extract_node import LoraExtract
from .extract_v2_node import LoraExtractV2
from .load_complete_node import LoraLoadComplete
from .merge_node import LoraMerge
from .resize_node import LoraResize
from .validate_node import LoraValidate

# In the order ComfyUI lists them.
NODE_LIST: list[type[io.ComfyNode]] = [
    LoraExtract, LoraExtractV2, LoraResize, LoraMerge, LoraValidate, LoraLoadComplete,
]
# Node id -> class, as ComfyUI registers them (the ids saved workflows refer to; each class is
# named as its schema's node_id, which a test checks). Not built from the schemas, which list
# the model folders.
NODE_CLASS_MAPPINGS: dict[str, type[io.ComfyNode]] = {cls.__name__: cls for cls in NODE_LIST}


class LoraExtractExtension(ComfyExtension):
    """The pack as a ComfyUI extension: its node list."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
