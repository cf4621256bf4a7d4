"""The extraction nodes' model inputs: a MODEL pair, a CLIP pair, or both, as two sources.

Either pair alone is enough. A pair with one side missing, no pair at all, or a CLIP pair of
two different text-encoder types is refused before any work, with the inputs named.
"""

from __future__ import annotations

from ..extract.errors import ExtractionInputError
from ..extract.keys.te_keys import encoders_in
from ..extract.sources import WeightSource
from ..extract.te_sources import CombinedSource
from . import comfy_adapter as comfy
from .comfy_io import io


def model_and_clip_inputs() -> list[io.Input]:
    """The optional MODEL and CLIP pairs (either pair alone is enough, checked below)."""
    return [
        io.Model.Input("finetuned_model", optional=True,
                       tooltip="The fine-tuned model: the LoRA will hold what it changed. "
                               "Optional when a CLIP pair is connected."),
        io.Model.Input("original_model", optional=True,
                       tooltip="The base model the fine-tune started from."),
        io.Clip.Input("finetuned_clip", optional=True,
                      tooltip="The fine-tuned text encoder (CLIP output of Load Checkpoint / Load "
                              "CLIP). Its changes go into the same file, under the keys "
                              "LoraLoader applies to the CLIP."),
        io.Clip.Input("original_clip", optional=True,
                      tooltip="The text encoder the fine-tune started from (same type as "
                              "finetuned_clip)."),
    ]


def _pair_state(tuned, base, tuned_name: str, base_name: str) -> bool:
    """Whether the pair is connected; one side alone is an error."""
    if tuned is None and base is None:
        return False
    if tuned is None or base is None:
        have, miss = (tuned_name, base_name) if base is None else (base_name, tuned_name)
        raise ExtractionInputError(
            f"{have} is connected but {miss} is not: connect both inputs of the pair (the "
            "fine-tuned one and the original it started from), or neither.")
    return True


def node_sources(finetuned_model=None, original_model=None, finetuned_clip=None,
                 original_clip=None) -> tuple[WeightSource, WeightSource]:
    """(base, tuned) sources over the connected pairs (MODEL and/or CLIP)."""
    has_model = _pair_state(finetuned_model, original_model, "finetuned_model", "original_model")
    has_clip = _pair_state(finetuned_clip, original_clip, "finetuned_clip", "original_clip")
    if not has_model and not has_clip:
        raise ExtractionInputError(
            "nothing to extract: connect finetuned_model and original_model (MODEL), or "
            "finetuned_clip and original_clip (CLIP), or both pairs.")
    tuned: list[WeightSource] = []
    base: list[WeightSource] = []
    if has_model:
        tuned.append(comfy.ComfyModelSource(finetuned_model, "finetuned_model"))
        base.append(comfy.ComfyModelSource(original_model, "original_model"))
    if has_clip:
        t = comfy.ComfyClipSource(finetuned_clip, "finetuned_clip")
        b = comfy.ComfyClipSource(original_clip, "original_clip")
        check_same_clip_type(t, b)
        tuned.append(t)
        base.append(b)
    if len(tuned) == 1:
        return base[0], tuned[0]
    return (CombinedSource(base, "original_model + original_clip"),
            CombinedSource(tuned, "finetuned_model + finetuned_clip"))


def check_same_clip_type(tuned: comfy.ComfyClipSource, base: comfy.ComfyClipSource) -> None:
    """Two CLIPs of different text-encoder types cannot be a fine-tune pair."""
    te_t, te_b = encoders_in(tuned.keys()), encoders_in(base.keys())
    if tuned.type_name != base.type_name or te_t != te_b:
        raise ExtractionInputError(
            f"finetuned_clip is {tuned.type_name} ({', '.join(te_t) or 'no encoders'}) but "
            f"original_clip is {base.type_name} ({', '.join(te_b) or 'no encoders'}): a CLIP pair "
            "must be the same text-encoder type. Load both from the same model family.")
