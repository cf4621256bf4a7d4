"""ComfyUI LoRA extraction and resizing pack.

ComfyUI imports this folder as a custom node package (under a module name derived from its
path, hence relative imports only) and calls ``comfy_entrypoint`` for its nodes (ComfyUI's V3
node API); ``pip install`` makes the same folder importable as ``lora_extract`` with the
``lora-extract`` command. Importing it never imports ComfyUI: the node modules, which subclass
ComfyUI's ``io.ComfyNode``, are imported only when ComfyUI calls ``comfy_entrypoint``.

There is deliberately no ``NODE_CLASS_MAPPINGS`` here: ComfyUI reads it before
``comfy_entrypoint`` and would then take the nodes from it, and building it would import
ComfyUI's node API on every import of the pack.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension that lists the pack's nodes."""
    if not __package__:
        # Loaded as a lone file, not as a package (pytest does that with the repository root
        # when the checkout's folder name is not a Python identifier): no nodes to give.
        raise ImportError("the LoRA extraction pack must be imported as a package")
    from .nodes import LoraExtractExtension

    return LoraExtractExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
