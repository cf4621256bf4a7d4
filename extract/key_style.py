"""Which key style a run writes: ``auto`` resolved against the model's naming, and the
parameters the diffusers style cannot store recorded on the plan (run set-up, not key naming)."""

from __future__ import annotations

from dataclasses import replace

from .config import ExtractConfig
from .errors import ExtractionInputError
from .keys.diffusers_keys import UNET, Naming, comfy_unmapped, detect_diffusers_naming
from .keys.te_keys import is_te_key, te_unmapped
from .pairing import PairPlan


def resolve_key_style(cfg: ExtractConfig, paths: list[str]) -> tuple[ExtractConfig, Naming, list[str]]:
    """The config with ``key_style`` resolved for these parameter paths, the naming, and notes.

    ``auto``: ``diffusers`` for a diffusers-named model, else ``comfy``. ``diffusers`` on a model
    in ComfyUI naming is refused (ComfyUI would match none of its keys); ``comfy``/``kohya`` on a
    diffusers-named model is allowed but noted (ComfyUI's loader maps those keys for no model).
    """
    naming = detect_diffusers_naming(paths)
    notes: list[str] = []
    style = cfg.key_style
    if style == "auto":
        style = "diffusers" if naming.is_diffusers else "comfy"
        if naming.is_diffusers:   # the usual case (ComfyUI naming -> comfy) needs no note
            notes.append(f"key_style auto: the input is in {_describe(naming)}, so keys are in "
                         "the diffusers style.")
    elif style == "diffusers" and not naming.is_diffusers:
        raise ExtractionInputError(
            "key_style 'diffusers' needs a model in diffusers naming (Flux transformer_blocks.N.attn."
            "to_q, SD3, SD/SDXL down_blocks...); this one is in ComfyUI naming (e.g. "
            f"{paths[0]!r}). Use key_style auto, comfy or kohya.")
    elif naming.is_diffusers and (style == "comfy" or naming.family != UNET):
        # kohya names of a diffusers UNet (lora_unet_down_blocks_0_...) are mapped; no others.
        notes.append(f"the input is in {_describe(naming)} but key_style is {style}: ComfyUI "
                     "loads diffusers models under its own names, so its loader will match none of "
                     "these keys. Use key_style diffusers (or auto) for ComfyUI.")
    return replace(cfg, key_style=style), naming, notes


def _describe(naming: Naming) -> str:
    return f"diffusers naming ({naming.family})" if naming.is_diffusers else "ComfyUI (LDM) naming"


def resolve_for_plan(cfg: ExtractConfig, plan: PairPlan) -> tuple[ExtractConfig, list[str]]:
    """``resolve_key_style`` for a paired input; records the naming family on the plan."""
    all_paths = [kp.path for kp in plan.common]
    # The naming is the diffusion model's; text encoders (text_encoders.<CLIP key>) have their
    # own keys in every style.
    paths = [p for p in all_paths if not is_te_key(p)]
    if not paths and cfg.key_style == "diffusers":
        raise ExtractionInputError(
            "key_style 'diffusers' needs a diffusion model in diffusers naming; this input has "
            "only text encoders. Use key_style auto, comfy or kohya.")
    cfg, naming, notes = resolve_key_style(cfg, paths)
    if cfg.key_style == "diffusers":
        plan.comfy_unmapped = comfy_unmapped(paths, plan.weight_paths, naming.family)
        plan.comfy_unmapped.update(te_unmapped(all_paths, plan.weight_paths, plan.encoders))
    return cfg, notes
