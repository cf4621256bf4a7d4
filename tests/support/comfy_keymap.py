"""ComfyUI 0.3.64's LoRA key mapping and LoRA application, as pure functions for tests.

An independent re-implementation (no ``comfy`` import) of what ``LoraLoader`` does to a
diffusion model: ``comfy.lora.model_lora_keys_unet`` (generic part), ``comfy.lora.load_lora``
(which LoRA keys are consumed, which are logged as ``lora key not loaded``) and
``comfy.lora.calculate_weight`` with ``LoRAAdapter`` (the weight math, in float32, result cast
back to the weight's dtype as ``ModelPatcher.patch_weight_to_device`` does).

ComfyUI accepts a patch for any state-dict key but, when it loads the model, only patches the
parameters of modules that own *all* their parameters (``ModelPatcher._load_list``): a parameter
sitting on a module that also has children (a DiT's ``pos_embed``, a block's ``modulation``)
or a buffer is silently left unpatched. ``comfy_patchable_keys(module)`` gives the keys that do
get patched; pass it to ``apply_lora(..., patchable=...)`` to model that.

Not modelled: architecture-specific aliases (diffusers/SD3/Flux key names), LoHa/LoKr/OFT/GLoRA
adapters (their keys count as unloaded here) and fp8 stochastic rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping

import torch

DIFFUSION_PREFIX = "diffusion_model."

# (up, down, mid) suffixes in ComfyUI's lookup order; the first up key present wins.
LORA_KEY_FORMATS: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)

logger = logging.getLogger(__name__)


class LoraMergeError(ValueError):
    """A LoRA patch that ComfyUI would accept but not merge (it only logs these)."""


def comfy_unet_key_map(model_keys: Iterable[str]) -> dict[str, str]:
    """LoRA prefix -> model key, as ``model_lora_keys_unet`` builds it for any diffusion model.

    For ``diffusion_model.X.weight``: ``lora_unet_`` + X with ``.`` -> ``_``, and
    ``diffusion_model.X``. For every other ``diffusion_model.`` key: the key itself. Later keys
    win on collisions (``a_b.weight`` vs ``a.b.weight``), as in ComfyUI's dict.
    """
    key_map: dict[str, str] = {}
    for k in model_keys:
        if not k.startswith(DIFFUSION_PREFIX):
            continue
        if k.endswith(".weight"):
            module = k[len(DIFFUSION_PREFIX): -len(".weight")]
            key_map["lora_unet_" + module.replace(".", "_")] = k
            key_map[DIFFUSION_PREFIX + module] = k
        else:
            key_map[k] = k
    return key_map


def comfy_patchable_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of ``model`` that ComfyUI's ModelPatcher patches when it loads the model.

    Those are the parameters of every module none of whose parameters belong to a child
    (leaf modules, in practice). ``model`` is the whole model (keys ``diffusion_model.*``).
    """
    keys: set[str] = set()
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if any(n not in own for n, _ in module.named_parameters(recurse=True)):
            continue
        keys.update(f"{name}.{n}" for n in own)  # ComfyUI joins with "." even for the root
    return keys


def _bias_of(target: str) -> str:
    # ComfyUI cuts len(".weight") chars off whatever the target is
    return target[: -len(".weight")] + ".bias"


def _load_patches(lora_keys: Mapping[str, torch.Tensor] | Iterable[str], key_map: Mapping[str, str],
                  ) -> tuple[dict[str, tuple], set[str]]:
    """``load_lora``: ``{model key: patch}`` and the set of LoRA keys consumed.

    Patches are ``("lora", up, down, alpha, mid, dora, reshape)``, ``("diff", t)`` or
    ``("set", t)``. With only key names (no tensors) the patch values are None.
    """
    lora = lora_keys if isinstance(lora_keys, Mapping) else dict.fromkeys(lora_keys)
    patches: dict[str, tuple] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        used.add(name)
        return lora[name]

    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            t = take(f"{x}.alpha")
            alpha = float(t.item()) if t is not None else 1.0
        dora = take(f"{x}.dora_scale") if f"{x}.dora_scale" in lora else None

        for up_sfx, down_sfx, mid_sfx in LORA_KEY_FORMATS:
            if x + up_sfx in lora:
                up, down = take(x + up_sfx), take(x + down_sfx)  # KeyError if down is missing, as in ComfyUI
                mid = take(x + mid_sfx) if mid_sfx is not None and x + mid_sfx in lora else None
                reshape = None
                if f"{x}.reshape_weight" in lora:
                    t = take(f"{x}.reshape_weight")
                    reshape = t.tolist() if t is not None else None
                patches[target] = ("lora", up, down, alpha, mid, dora, reshape)
                break

        if f"{x}.w_norm" in lora:
            patches[target] = ("diff", take(f"{x}.w_norm"))
            if f"{x}.b_norm" in lora:
                patches[_bias_of(target)] = ("diff", take(f"{x}.b_norm"))
        if f"{x}.diff" in lora:
            patches[target] = ("diff", take(f"{x}.diff"))
        if f"{x}.diff_b" in lora:
            patches[_bias_of(target)] = ("diff", take(f"{x}.diff_b"))
        if f"{x}.set_weight" in lora:
            patches[target] = ("set", take(f"{x}.set_weight"))
    return patches, used


def unloaded_lora_keys(model_keys: Iterable[str], lora_keys: Iterable[str],
                       key_map: Mapping[str, str] | None = None) -> set[str]:
    """LoRA keys ComfyUI would log as ``lora key not loaded`` (needs key names only)."""
    lora_keys = list(lora_keys)
    if key_map is None:
        key_map = comfy_unet_key_map(model_keys)
    _, used = _load_patches(lora_keys, key_map)
    return {k for k in lora_keys if k not in used}


def _pad_to(weight: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if len(shape) != weight.dim() or any(n < o for n, o in zip(shape, weight.shape, strict=True)):
        raise LoraMergeError(f"cannot pad {tuple(weight.shape)} to {shape}")
    out = weight.new_zeros(shape)
    out[tuple(slice(0, d) for d in weight.shape)] = weight
    return out


def _lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """``up @ down`` over flattened trailing dims (mid folded in first), reshaped to ``shape``."""
    up, down = up.float(), down.float()
    if mid is not None:
        mid = mid.float()
        rank, fan_in = down.shape[0], down.shape[1]
        folded = down.transpose(0, 1).flatten(1) @ mid.transpose(0, 1).flatten(1)
        down = folded.reshape(fan_in, rank, mid.shape[2], mid.shape[3]).transpose(0, 1)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _dora(weight: torch.Tensor, dora_scale: torch.Tensor, delta: torch.Tensor, scale: float,
          strength: float) -> torch.Tensor:
    """DoRA merge as in ComfyUI (output-axis norms use the unpatched weight there)."""
    magnitude = dora_scale.float()
    patched = weight + delta * scale
    ones = [1] * (weight.dim() - 1)
    if magnitude.shape[0] == patched.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
    else:
        norm = (patched.transpose(0, 1).reshape(patched.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(patched.shape[1], *ones).transpose(0, 1))
    patched = patched * (magnitude / (norm + torch.finfo(weight.dtype).eps))
    return patched if strength == 1.0 else weight + strength * (patched - weight)


def _apply_patch(weight: torch.Tensor, patch: tuple, strength: float, key: str) -> torch.Tensor:
    """One patch on a float32 weight; raises LoraMergeError where ComfyUI would log and skip."""
    kind = patch[0]
    if kind == "set":
        return patch[1].to(weight.dtype).expand_as(weight).clone()  # copy_ broadcasts like this
    if kind == "diff":
        diff = patch[1]
        if strength == 0.0:
            return weight
        if diff.shape != weight.shape:
            raise LoraMergeError(f"WARNING SHAPE MISMATCH {key} WEIGHT NOT MERGED {diff.shape} != {weight.shape}")
        return weight + strength * diff.float()
    _, up, down, alpha, mid, dora, reshape = patch
    if reshape is not None:
        weight = _pad_to(weight, reshape)
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    try:
        delta = _lora_delta(up, down, mid, weight.shape)
    except RuntimeError as e:
        raise LoraMergeError(f"ERROR lora {key} {e}") from e
    if dora is not None:
        return _dora(weight, dora, delta, scale, strength)
    return weight + (strength * scale) * delta


def apply_lora(model_sd: Mapping[str, torch.Tensor], lora_sd: Mapping[str, torch.Tensor], strength: float = 1.0,
               *, key_map: Mapping[str, str] | None = None, patchable: Collection[str] | None = None,
               strict: bool = True) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Merge ``lora_sd`` into ``model_sd`` the way ComfyUI's LoraLoader would.

    Returns ``(patched_sd, unloaded_keys)``: a new dict (untouched entries are the same tensor
    objects; patched ones are computed in float32 and cast back to their dtype) and the LoRA
    keys ComfyUI would log as ``lora key not loaded``. ``key_map`` defaults to
    ``comfy_unet_key_map(model_sd)``.

    ComfyUI also accepts, then silently drops or only logs, patches it cannot merge: a target
    missing from the model (``NOT LOADED``), a diff of the wrong shape, a LoRA product that does
    not reshape to the weight, and (when ``patchable`` is given, see ``comfy_patchable_keys``) a
    target that ComfyUI's load never patches. With ``strict`` these raise ``LoraMergeError``;
    otherwise they are logged and the weight is left as it was, as in ComfyUI.
    """
    if key_map is None:
        key_map = comfy_unet_key_map(model_sd.keys())
    patches, used = _load_patches(lora_sd, key_map)
    unloaded = {k for k in lora_sd if k not in used}
    for k in lora_sd:  # ComfyUI's order: the LoRA file's key order
        if k in unloaded:
            logger.warning("lora key not loaded: %s", k)

    out = dict(model_sd)
    for target, patch in patches.items():
        if target not in model_sd:
            if strict:
                raise LoraMergeError(f"NOT LOADED {target}")
            logger.warning("NOT LOADED %s", target)
            continue
        if patchable is not None and target not in patchable:
            msg = f"{target} is not patched by ComfyUI on load (its module has children, or it is a buffer)"
            if strict:
                raise LoraMergeError(msg)
            logger.warning("%s", msg)
            continue
        original = model_sd[target]
        try:
            merged = _apply_patch(original.float(), patch, strength, target)
        except LoraMergeError as e:
            if strict:
                raise
            logger.warning("%s", e)
            continue
        out[target] = merged.to(original.dtype)
    return out, unloaded
