"""Text-encoder parameter paths and the LoRA keys ComfyUI's loader applies to a CLIP.

Inside the extraction a text-encoder parameter is named ``text_encoders.<key>``, where
``<key>`` is its name in ComfyUI's CLIP state dict (``clip_l.transformer.text_model...``,
``clip_g...``, ``t5xxl.transformer...``): the name the node reads from a CLIP, and the name a
checkpoint's encoder is converted to (``extract/te_sources.py``).

The keys written mirror ``comfy.lora.model_lora_keys_clip`` (same in ComfyUI 0.3.64 and 0.33):
- every ``<key>.weight`` is reachable as ``text_encoders.<key>`` (the comfy style);
- for CLIP encoder layers 0..31, the kohya names ``lora_te_`` (one encoder), ``lora_te1_`` /
  ``lora_te2_`` (CLIP-L + CLIP-G, SDXL) + ``text_model_encoder_layers_<b>_<module>``;
- T5-XXL weights: ``lora_te<n>_<path with _>`` with n = 1 + (CLIP-G present) + (CLIP-L present);
- the diffusers style (PEFT ``lora_A`` / ``lora_B``): CLIP encoder layers 0..31 as
  ``text_encoder.text_model.encoder.layers.<b>.<module>`` (``text_encoder_2.`` for CLIP-G next to
  CLIP-L); ComfyUI maps no diffusers name to any other text-encoder weight (embeddings, final
  norm, projection, T5), so in that style those are flagged and left out (``te_unmapped``);
- only ``.weight`` keys are mapped, so a ``.bias`` travels as ``.diff_b`` on its weight's
  prefix, and other parameters (``logit_scale``) cannot be patched by the loader at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .lora_keys import LoraKeys, diffusion_path, keys_for_param

TE_PREFIX = "text_encoders."

# comfy.lora.LORA_CLIP_MAP: the CLIP modules kohya names.
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
_CLIP_LAYER = re.compile(
    r"^(?P<enc>clip_[lgh])\.transformer\.text_model\.encoder\.layers\.(?P<b>\d+)\.(?P<mod>.+)$")
_T5 = "t5xxl.transformer."
_TE_BLOCK = re.compile(r"\.(?:layers|block)\.(\d+)\.")

UNPATCHABLE_NOTE = ("ComfyUI's LoRA loader patches only .weight and .bias parameters of a text "
                    "encoder; this parameter cannot be stored")


VAE_PREFIXES = ("first_stage_model.", "vae.")


def left_out_reason(key: str) -> str:
    """Why a key outside the diffusion model and the extracted text encoders is not extracted."""
    if key.startswith(VAE_PREFIXES):
        return "not part of the diffusion model (VAE: LoRA loaders do not patch it)"
    return ("not part of the diffusion model (text encoder / VAE; text encoders are extracted "
            "from CLIP inputs, or from whole checkpoints unless --no-text-encoder)")


def is_te_key(key: str) -> bool:
    return key.startswith(TE_PREFIX)


def model_path(key: str) -> str | None:
    """The path a key is paired by: text-encoder keys keep their full name (so they never
    collide with diffusion-model paths); other keys go through :func:`diffusion_path`."""
    if is_te_key(key):
        return key
    return diffusion_path(key)


def encoder_of(path: str) -> str:
    """``text_encoders.clip_l.transformer...`` -> ``clip_l``."""
    return path[len(TE_PREFIX):].split(".", 1)[0]


def encoders_in(keys: Iterable[str]) -> tuple[str, ...]:
    """The text encoders (``clip_l``, ``clip_g``, ``t5xxl``...) present among the keys, sorted."""
    return tuple(sorted({encoder_of(k) for k in keys if is_te_key(k)}))


def te_block(key: str) -> str:
    """The block a text-encoder key is shown under: ``clip_l.3`` for layer 3, else ``clip_l``."""
    enc = encoder_of(key)
    m = _TE_BLOCK.search(key)
    return f"{enc}.{m.group(1)}" if m else enc


def _kohya_prefix(path_key: str, encoders: tuple[str, ...]) -> str | None:
    """The kohya prefix ComfyUI maps for a CLIP state-dict key (module, no ``.weight``), if any."""
    m = _CLIP_LAYER.match(path_key)
    if m is not None:
        mod = LORA_CLIP_MAP.get(m.group("mod"))
        if mod is None or int(m.group("b")) >= 32:
            return None
        enc = m.group("enc")
        if enc == "clip_g":
            te = "lora_te2_" if "clip_l" in encoders else "lora_te_"
        elif enc == "clip_l" and "clip_h" in encoders:
            te = "lora_te1_"  # both encoders map to lora_te_ here: stay unambiguous
        else:
            te = "lora_te_" if len(encoders) == 1 else "lora_te1_"
        return f"{te}text_model_encoder_layers_{m.group('b')}_{mod}"
    if path_key.startswith(_T5):
        n = 1 + ("clip_g" in encoders) + ("clip_l" in encoders)
        return f"lora_te{n}_" + path_key[len(_T5):].replace(".", "_")
    return None


TE_UNMAPPED_NOTE = ("not stored: ComfyUI's loader maps no diffusers (text_encoder.) LoRA key to "
                    "this text-encoder parameter; key_style diffusers")


def _diffusers_prefix(path_key: str, encoders: tuple[str, ...]) -> str | None:
    """The diffusers (PEFT) prefix ComfyUI maps for a CLIP state-dict module, if any."""
    m = _CLIP_LAYER.match(path_key)
    if m is None or m.group("mod") not in LORA_CLIP_MAP or int(m.group("b")) >= 32:
        return None
    te = "text_encoder_2." if m.group("enc") == "clip_g" and "clip_l" in encoders else "text_encoder."
    return f"{te}text_model.encoder.layers.{m.group('b')}.{m.group('mod')}"


def te_unmapped(te_paths: Iterable[str], weight_paths: set[str],
                encoders: tuple[str, ...]) -> dict[str, str]:
    """Text-encoder parameters the diffusers style cannot store (path -> reason)."""
    out: dict[str, str] = {}
    for p in te_paths:
        if not is_te_key(p):
            continue
        module = p[len(TE_PREFIX):].rsplit(".", 1)[0]
        patchable = p.endswith(".weight") or (p.endswith(".bias") and
                                              p[: -len(".bias")] + ".weight" in weight_paths)
        if patchable and _diffusers_prefix(module, encoders) is None:
            out[p] = TE_UNMAPPED_NOTE
    return out


def te_keys_for_param(path: str, style: str, module_has_weight: bool,
                      encoders: tuple[str, ...]) -> tuple[LoraKeys, str] | None:
    """LoRA keys and role of a text-encoder parameter, or None when the loader cannot patch it."""
    key = path[len(TE_PREFIX):]
    if key.endswith(".weight"):
        module = key[: -len(".weight")]
        role = "weight"
    elif key.endswith(".bias") and module_has_weight:
        module = key[: -len(".bias")]
        role = "bias"
    else:
        return None
    if style == "diffusers":   # unmapped modules are flagged by te_unmapped, never written
        return LoraKeys(_diffusers_prefix(module, encoders) or TE_PREFIX + module, peft=True), role
    prefix = (_kohya_prefix(module, encoders) if style == "kohya" else None) or TE_PREFIX + module
    return LoraKeys(prefix), role


def lora_keys_for(path: str, style: str, module_has_weight: bool,
                  encoders: tuple[str, ...] = ()) -> tuple[LoraKeys, str] | None:
    """LoRA keys for any paired path: text encoder or diffusion model."""
    if is_te_key(path):
        return te_keys_for_param(path, style, module_has_weight, encoders)
    return keys_for_param(path, style, module_has_weight)


def te_key_map(te_paths: Iterable[str]) -> dict[str, str]:
    """LoRA prefix -> text-encoder ``.weight`` path, as ``model_lora_keys_clip`` maps them
    (comfy, kohya and diffusers names; used to check files against the models they came from)."""
    paths = [p for p in te_paths if is_te_key(p) and p.endswith(".weight")]
    encoders = encoders_in(paths)
    out: dict[str, str] = {}
    for p in paths:
        module = p[len(TE_PREFIX): -len(".weight")]
        out[TE_PREFIX + module] = p
        for other in (_kohya_prefix(module, encoders), _diffusers_prefix(module, encoders)):
            if other is not None:
                out[other] = p
    return out


