"""Diffusers-named diffusion models: detection, and the ``diffusers`` (PEFT) LoRA key style.

Models trained with diffusers-based trainers keep diffusers parameter names (Flux
``transformer_blocks.N.attn.to_q``, SD/SDXL ``down_blocks.0.attentions.0...``, SD3
``transformer_blocks.N.attn.add_q_proj``). ComfyUI loads such a model by converting it to its own
(LDM) names, fusing q/k/v into one weight, and maps LoRA keys in diffusers naming only under a
prefix (``comfy.lora.model_lora_keys_unet`` with ``comfy.utils.flux_to_diffusers``,
``mmdit_to_diffusers``, ``unet_to_diffusers``; identical for these keys in 0.3.64 and 0.33):

- Flux and SD3: ``transformer.<diffusers module>``. ``to_q``/``to_k``/``to_v`` (and
  ``add_*_proj``, Flux ``proj_mlp``) map onto row slices of the fused LDM weight, so separate
  per-projection factors patch exactly their slice. ``norm_out.linear`` (and SD3's last
  ``norm1_context.linear``) map through a scale/shift swap applied to the difference.
- SD/SDXL UNet: ``unet.<module>`` with ``.to_q`` etc. written ``.processor.to_q`` and
  ``.to_out.0`` written ``.processor.to_out``.

What the loader cannot apply, and this style therefore refuses to store (the report flags it):
a bias difference on a sliced or swapped target (``load_lora`` builds its ``.bias`` key by
cutting ``.weight`` off the target's name, which for these targets is a tuple: the patch lands on
no parameter, without a warning), and any parameter that is neither a ``.weight`` nor the bias of
one (ComfyUI maps other parameter names only under ``diffusion_model.``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Naming families (the value of ``detect_diffusers_naming``).
FLUX, SD3, UNET = "flux", "sd3", "unet"

# First path component of a diffusers UNet's modules; everything else uses ``transformer.``.
UNET_ROOTS = frozenset({
    "conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding", "class_embedding",
    "encoder_hid_proj", "down_blocks", "up_blocks", "mid_block",
})

_B = r"transformer_blocks\.\d+\."
_S = r"single_transformer_blocks\.\d+\."
# Diffusers modules that ComfyUI maps onto a slice of a fused weight or through a function:
# a LoRA on them loads, a ``.diff_b`` on them silently does not.
_SLICED = {
    FLUX: re.compile(rf"^(?:{_B}attn\.(?:to_[qkv]|add_[qkv]_proj)|{_S}attn\.to_[qkv]|{_S}proj_mlp"
                     r"|norm_out\.linear)$"),
    SD3: re.compile(rf"^(?:{_B}attn2?\.(?:to_[qkv]|add_[qkv]_proj)|norm_out\.linear)$"),
}
# Every weight module ``flux_to_diffusers`` maps (so a LoRA key on it loads in ComfyUI).
_FLUX_WEIGHTS = re.compile(
    rf"^(?:{_B}(?:attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|norm_q|norm_k|norm_added_q"
    r"|norm_added_k)|norm1\.linear|norm1_context\.linear|ff\.net\.(?:0\.proj|2)"
    r"|ff_context\.net\.(?:0\.proj|2))"
    rf"|{_S}(?:attn\.(?:to_[qkv]|norm_q|norm_k)|proj_mlp|proj_out|norm\.linear)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear|controlnet_x_embedder"
    r"|time_text_embed\.(?:timestep_embedder|text_embedder|guidance_embedder)\.linear_[12])$")

UNMAPPED_BIAS = ("not stored: ComfyUI's loader cannot apply a bias difference to a diffusers "
                 "projection it maps onto a slice of a fused weight (or through a scale/shift "
                 "swap); key_style diffusers")
UNMAPPED_PARAM = ("not stored: ComfyUI's loader maps no diffusers LoRA key to this parameter; "
                  "key_style diffusers")
UNMAPPED_PREFIX = "not stored: ComfyUI's loader"


@dataclass(frozen=True)
class Naming:
    """How the input model names its parameters."""

    family: str | None           # flux / sd3 / unet, or None: ComfyUI (LDM) naming or unknown

    @property
    def is_diffusers(self) -> bool:
        return self.family is not None


def detect_diffusers_naming(paths: list[str] | set[str]) -> Naming:
    """The diffusers family of a diffusion model from its parameter paths (prefix stripped).

    Mirrors the checks of ComfyUI's ``convert_diffusers_mmdit`` (Flux before SD3) and its
    diffusers-UNet fallback, so what is detected here is what ``UNETLoader`` converts.
    """
    keys = set(paths)
    if "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys):
        return Naming(FLUX)
    if "transformer_blocks.0.attn.add_q_proj.weight" in keys and "pos_embed.proj.weight" in keys:
        return Naming(SD3)
    if "conv_in.weight" in keys and any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return Naming(UNET)
    return Naming(None)


def diffusers_prefix(module: str) -> str:
    """The LoRA prefix ComfyUI maps for a diffusers module name (its weight key minus ``.weight``)."""
    if module.split(".", 1)[0] in UNET_ROOTS:
        # model_lora_keys_unet: k.replace(".to_", ".processor.to_"), then ".to_out.0" -> ".to_out".
        p = "unet." + module.replace(".to_", ".processor.to_")
        return p[:-2] if p.endswith(".to_out.0") else p
    return "transformer." + module


def unmapped_reason(path: str, role: str, family: str | None, last_block: int = -1) -> str | None:
    """Why ComfyUI's loader cannot apply this parameter in the diffusers style, or None.

    ``role`` is what ``keys_for_param`` says: weight, bias (of a module with a weight) or param.
    ``last_block``: SD3's last joint block, whose ``norm1_context.linear`` ComfyUI maps through
    the scale/shift swap (the others map by name).
    """
    if role == "param":
        return UNMAPPED_PARAM
    module = path.rsplit(".", 1)[0]
    if family == FLUX and not _FLUX_WEIGHTS.match(module):
        return UNMAPPED_PARAM
    sliced = _SLICED.get(family or "")
    if role == "bias" and sliced is not None and (
            sliced.match(module)
            or family == SD3 and module == f"transformer_blocks.{last_block}.norm1_context.linear"):
        return UNMAPPED_BIAS
    return None


def comfy_unmapped(paths: list[str], weight_paths: set[str], family: str | None) -> dict[str, str]:
    """``unmapped_reason`` for every parameter path of a diffusers-named model (path -> reason)."""
    blocks = [int(p.split(".")[1]) for p in paths if p.startswith("transformer_blocks.")]
    last = max(blocks, default=-1)
    out: dict[str, str] = {}
    for p in paths:
        role = ("weight" if p.endswith(".weight") else
                "bias" if p.endswith(".bias") and p[: -len(".bias")] + ".weight" in weight_paths
                else "param")
        why = unmapped_reason(p, role, family, last)
        if why is not None:
            out[p] = why
    return out


def unmapped_note(keys: list[str]) -> str:
    """The report note that counts the parameters the diffusers style could not store."""
    return (f"{len(keys)} changed parameter(s) such as {keys[0]!r} are not in the file: ComfyUI's "
            "loader has no diffusers key that applies them (see each layer's reason). Use the "
            "ComfyUI-named model with key_style comfy to keep them.")
