"""Model key paths and the LoRA key styles that ComfyUI's loader accepts.

ComfyUI maps a LoRA key prefix to a model weight by these rules (``comfy.lora.model_lora_keys_unet``):
for every ``diffusion_model.<module>.weight`` it accepts ``diffusion_model.<module>`` and
``lora_unet_<module with dots as underscores>``; for every other parameter
``diffusion_model.<param path>`` (the full key, used with ``.diff``). ``.diff_b`` patches the
``.bias`` next to the ``.weight`` that the prefix maps to.

The ``diffusers`` style (PEFT names, for diffusers-named inputs) is defined in
``diffusers_keys``; ``auto`` resolves to it or to ``comfy`` per input.
"""

from __future__ import annotations

from dataclasses import dataclass

from .diffusers_keys import diffusers_prefix

# auto: diffusers for a diffusers-named input, else comfy (resolved per input by
# key_style.resolve_key_style before any key is built).
KEY_STYLES = ("auto", "comfy", "kohya", "diffusers")

# (up, down, mid) suffixes of low-rank LoRA pairs, in the order ComfyUI's LoRA adapter looks
# for them (the first up key present decides the format of a prefix). Shared by validation
# (validation/lora_apply.py) and resize (resize/lora_file.py).
UP_DOWN_FORMATS: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)

# Prefixes under which full checkpoints store the diffusion model.
DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Prefixes of the parts of a full checkpoint that are not the diffusion model.
NON_DIFFUSION_PREFIXES = (
    "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.",
    "text_encoder.", "text_encoder_2.", "clip_l.", "clip_g.", "t5xxl.", "model_ema.",
)


def diffusion_path(key: str) -> str | None:
    """The parameter path inside the diffusion model, or None for VAE/text-encoder keys."""
    for p in DIFFUSION_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    if key.startswith(NON_DIFFUSION_PREFIXES):
        return None
    return key  # a bare diffusion-model file (models/diffusion_models): keys are paths


@dataclass(frozen=True)
class LoraKeys:
    """Where one parameter's extracted tensors go in the LoRA file."""

    prefix: str
    peft: bool = False          # diffusers style: PEFT's lora_B (up) / lora_A (down) names

    @property
    def up(self) -> str:
        return f"{self.prefix}.lora_B.weight" if self.peft else f"{self.prefix}.lora_up.weight"

    @property
    def down(self) -> str:
        return f"{self.prefix}.lora_A.weight" if self.peft else f"{self.prefix}.lora_down.weight"

    @property
    def alpha(self) -> str:
        return f"{self.prefix}.alpha"

    @property
    def dora_scale(self) -> str:
        # ComfyUI's loader reads "<prefix>.dora_scale" next to the factors in every key style.
        return f"{self.prefix}.dora_scale"

    @property
    def diff(self) -> str:
        return f"{self.prefix}.diff"

    @property
    def diff_b(self) -> str:
        return f"{self.prefix}.diff_b"


def module_prefix(module: str, style: str) -> str:
    """The LoRA prefix of a module (its weight key without ``.weight``) in a key style."""
    if style == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    if style == "diffusers":
        return diffusers_prefix(module)
    return "diffusion_model." + module


def keys_for_param(path: str, style: str, module_has_weight: bool) -> tuple[LoraKeys, str]:
    """LoRA keys for a parameter path, and which suffix role it plays (weight/bias/param).

    ``.weight`` parameters use the module prefix; a ``.bias`` whose module has a ``.weight``
    becomes ``.diff_b`` on the module prefix; every other parameter (``pos_embed``,
    ``modulation``, norm ``.scale``, a lone bias) is stored under its full path as ``.diff``,
    the generic form ComfyUI maps for non-weight parameters in every key style (kohya names
    exist only for ``.weight`` keys).
    """
    peft = style == "diffusers"
    if path.endswith(".weight"):
        return LoraKeys(module_prefix(path[: -len(".weight")], style), peft), "weight"
    if path.endswith(".bias") and module_has_weight:
        return LoraKeys(module_prefix(path[: -len(".bias")], style), peft), "bias"
    if peft:  # ComfyUI maps no diffusers key to these; diffusers_keys.unmapped_reason flags them
        return LoraKeys(diffusers_prefix(path), peft), "param"
    return LoraKeys("diffusion_model." + path), "param"
