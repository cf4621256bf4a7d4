"""Text-encoder options of ``lora-extract extract``, and opening a model with its encoders.

A whole checkpoint (SD1.x, SDXL, SD3) or an encoder-only file carries text encoders; unless
``--no-text-encoder`` is given they are extracted too, named as ComfyUI's CLIP names them
(``extract/te_sources.py``), so the keys written are those LoraLoader applies to the CLIP.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..extract import open_source
from ..extract.sources import WeightSource
from ..extract.te_sources import with_text_encoders

# LoRA key prefixes that address a text encoder (comfy, kohya, diffusers names).
TE_LORA_PREFIXES = ("text_encoders.", "lora_te", "text_encoder.", "text_encoder_2.")


def add_text_encoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-text-encoder", action="store_true",
                   help="extract the diffusion model only, even from whole checkpoints")
    p.add_argument("--text-encoder-rank", type=int, default=0,
                   help="rank (cap) for text-encoder layers (0: same as --rank)")


def open_model(path: str, text_encoders: bool) -> WeightSource:
    """The model file as a source; with its text encoders under ComfyUI CLIP names if asked."""
    source = open_source(path)
    return with_text_encoders(source) if text_encoders else source


def lora_has_text_encoder(keys: Iterable[str]) -> bool:
    """Whether a LoRA file has keys for a text encoder (then validate compares the encoders)."""
    return any(k.startswith(TE_LORA_PREFIXES) for k in keys)
