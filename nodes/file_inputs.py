"""Node inputs that name a file in one of ComfyUI's model folders.

The nodes' dropdowns list names relative to a folder; a name typed by hand (a merge spec) or
left over from another machine's workflow may not be there. Every node turns such a name into
a path here, so the error always says which input, which value, and what to do instead.
"""

from __future__ import annotations

from ..extract.errors import ExtractionInputError
from . import comfy_adapter as comfy

PICK_FROM_LIST = "pick one from the list."


def listed_file(input_name: str, name: str, folder: str = "loras", *,
                fix: str = PICK_FROM_LIST, optional_suffix: str = "") -> str:
    """The full path of ``name`` in ComfyUI's ``folder`` (``loras``, ``checkpoints``, ...).

    ``optional_suffix`` (e.g. ``.safetensors``) is tried after ``name`` as given, for names
    typed by hand; names picked from a dropdown are exact. Raises ExtractionInputError naming
    ``input_name``, the value and ``fix`` when neither is in the folder.
    """
    for candidate in (name, name + optional_suffix) if optional_suffix else (name,):
        path = comfy.model_full_path(folder, candidate)
        if path is not None:
            return path
    raise ExtractionInputError(f"{input_name} {name!r} is not in the {folder} folder; {fix}")
