"""Inputs and config building shared by the extraction nodes (V1 and V2).

The inputs come from the option declarations (``extract/options.py``, ``memory/options.py``):
required ones first, in declaration order, then the MODEL/CLIP sockets and the optional ones.
Saved workflows map widget values by position, so that order is the declaration order.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..extract.config import ExtractConfig
from ..extract.option_spec import Option
from ..extract.options import EXTRACT, EXTRACT_OPTIONS
from .comfy_io import io, option_input
from .model_inputs import model_and_clip_inputs


def extraction_inputs(default_prefix: str, extra_required: Sequence[Option] = ()) -> list[io.Input]:
    """LoraExtract's inputs with its file prefix default; ``extra_required`` after the required."""
    required = [o for o in EXTRACT_OPTIONS if o.node and not o.optional]
    optional = [o for o in EXTRACT_OPTIONS if o.node and o.optional]
    overrides = {"filename_prefix": {"default": default_prefix}}
    return [*(option_input(o, **overrides.get(o.name, {})) for o in required),
            *(option_input(o) for o in extra_required),
            *model_and_clip_inputs(),
            *(option_input(o) for o in optional)]


def build_config(device: str, **node_values: object) -> ExtractConfig:
    """The validated ExtractConfig for the extraction options' widget values."""
    fields = {EXTRACT[name].config_field: EXTRACT[name].config_value(v)
              for name, v in node_values.items() if EXTRACT[name].config_field is not None}
    return ExtractConfig(**fields, device=device).validate()


def save_root_and_prefix(save_to: str, filename_prefix: str, output_dir: str, loras_dir: str) -> tuple[str, str]:
    """The folder files go under, and the prefix relative to it.

    With ``models/loras`` a leading ``loras/`` (the default prefix) is dropped, so the file
    lands directly where LoraLoader looks instead of in ``loras/loras/``.
    """
    if save_to == "models/loras":
        p = filename_prefix.replace("\\", "/")
        return loras_dir, p[len("loras/"):] if p.startswith("loras/") else p
    return output_dir, filename_prefix
