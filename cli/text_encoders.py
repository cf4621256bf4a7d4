"""Text-encoder options of ``lora-extract extract``, and opening a model with its encoders.

A whole checkpoint (SD1.x, SDXL, SD3) or an encoder-only file carries text encoders; unless
``--no-text-encoder`` is given they are extracted too, named as ComfyUI's CLIP names them
(``extract/te_sources.py``), so the keys written are those LoraLoader applies to the CLIP.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..extract import ExtractionInputError, open_source
from ..extract.lora_detect import looks_like_lora, lora_like_keys
from ..extract.sources import WeightSource
from ..extract.te_sources import with_text_encoders

# LoRA key prefixes that address a text encoder (comfy, kohya, diffusers names).
TE_LORA_PREFIXES = ("text_encoders.", "lora_te", "text_encoder.", "text_encoder_2.")


def add_text_encoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-text-encoder", action="store_true",
                   help="extract the diffusion model only, even from whole checkpoints")


def open_model(path: str, text_encoders: bool, role: str = "model") -> WeightSource:
    """The model file as a source; with its text encoders under ComfyUI CLIP names if asked.

    ``role`` (e.g. "fine-tuned model") names the argument when the file is a LoRA instead."""
    source = open_source(path)
    refuse_lora_as_model(source, path, role)
    return with_text_encoders(source) if text_encoders else source


def refuse_lora_as_model(source: WeightSource, path: str, role: str) -> None:
    """A LoRA where a whole model belongs: say so, and which command takes a LoRA."""
    keys = source.keys()
    if not looks_like_lora(keys):
        return
    example = lora_like_keys(keys)[0]
    raise ExtractionInputError(
        f"{path} is a LoRA file (e.g. key {example!r}), not a {role}: this argument takes a "
        "whole model. For a LoRA you have: 'lora-extract resize BASE_MODEL LORA -r RECIPE -o "
        "FOLDER' shrinks it; 'lora-extract validate BASE TUNED LORA' checks it against the "
        "models it came from (the LoRA goes last).")


def lora_has_text_encoder(keys: Iterable[str]) -> bool:
    """Whether a LoRA file has keys for a text encoder (then validate compares the encoders)."""
    return any(k.startswith(TE_LORA_PREFIXES) for k in keys)
