"""Apply a LoRA file to model weights the way ComfyUI's LoraLoader does, in float32.

Two steps, so a whole model never has to be in memory:

1. :func:`index_lora` matches the LoRA's key *names* to the model's parameter paths with
   ComfyUI's generic key map (``diffusion_model.<module>`` and ``lora_unet_<module_with_
   underscores>`` for ``.weight`` parameters, ``diffusion_model.<path>`` for every other
   parameter) and records which LoRA keys ComfyUI would consume; the rest are the keys it logs
   as "lora key not loaded".
2. :func:`patched_weight` reads the few tensors of one patch and applies it to one weight:
   ``alpha / rank * up @ down`` (trailing dims flattened, reshaped to the weight: conv and 5-D
   patch embeddings), an optional Tucker ``lora_mid``, ``reshape_weight`` padding, ``.diff``,
   ``.diff_b`` (on the bias next to the weight) and ``.set_weight``.

Not covered (the patch is reported as unsupported instead of being guessed): DoRA
(``dora_scale``), LoHa/LoKr/OFT/GLoRA adapters, and architecture-specific aliases (diffusers,
``lycoris_`` names), which ComfyUI derives from the model config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError
from ..extract.keys.diffusers_keys import detect_diffusers_naming, diffusers_prefix
from ..extract.keys.lora_keys import UP_DOWN_FORMATS
from ..extract.keys.te_keys import is_te_key, te_key_map
from ..extract.sources import WeightSource

DIFFUSION_PREFIX = "diffusion_model."
KOHYA_UNET_PREFIX = "lora_unet_"


# LoRA key prefixes that patch the text encoders: LoraLoader applies them to CLIP, so they are
# not "unmatched" when we only look at the diffusion model.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoders.",
                         "text_encoder.", "text_encoder_2.", "lora_clip_")

KIND_LORA = "lora"
KIND_DIFF = "diff"
KIND_SET = "set"


class PatchNotMerged(ValueError):
    """A patch ComfyUI accepts but does not merge (it logs a warning and leaves the weight)."""


@dataclass(frozen=True)
class LoraPatch:
    """One patch on one model parameter, by LoRA key names (tensors are read when applied)."""

    target: str                  # the model parameter path, e.g. "input_blocks.1.1.proj_in.weight"
    kind: str                    # lora / diff / set
    prefix: str                  # the LoRA key prefix it came from
    tensor: str | None = None    # diff / set: the key of the tensor
    up: str | None = None
    down: str | None = None
    mid: str | None = None
    alpha: str | None = None
    reshape: str | None = None
    dora: str | None = None      # present: DoRA, which we do not apply


@dataclass
class LoraIndex:
    """Which patch goes on which model parameter, and the LoRA keys that go nowhere."""

    patches: dict[str, LoraPatch] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)       # ComfyUI: "lora key not loaded"
    text_encoder: list[str] = field(default_factory=list)    # keys for CLIP, not the model
    key_styles: list[str] = field(default_factory=list)      # comfy / kohya / diffusers, as found

    def rank(self, lora: WeightSource, target: str) -> int | None:
        """The rank of the LoRA patch on ``target`` (from the header, no tensor read)."""
        p = self.patches.get(target)
        if p is None or p.kind != KIND_LORA or p.down is None:
            return None
        return int(lora.shape(p.down)[0])


def comfy_key_map(model_paths: Iterable[str]) -> dict[str, str]:
    """LoRA prefix -> model parameter path, in ComfyUI's generic key map order.

    ``model_paths`` are diffusion-model parameter paths (no ``diffusion_model.`` prefix), and
    text-encoder paths ``text_encoders.<CLIP key>`` (mapped as ``model_lora_keys_clip`` does).
    On a collision (``a_b.weight`` and ``a.b.weight`` share a kohya name) the later path wins,
    as in ComfyUI's dict.
    """
    key_map: dict[str, str] = {}
    paths = list(model_paths)
    key_map.update(te_key_map(paths))
    for path in paths:
        if is_te_key(path):
            continue
        if path.endswith(".weight"):
            module = path[: -len(".weight")]
            key_map[KOHYA_UNET_PREFIX + module.replace(".", "_")] = path
            key_map[DIFFUSION_PREFIX + module] = path
        else:
            key_map[DIFFUSION_PREFIX + path] = path
    if detect_diffusers_naming(paths).is_diffusers:
        # A diffusers-named model: the diffusers-style keys ComfyUI maps for it (onto its own
        # converted model; here straight onto the diffusers parameter, so no q/k/v slicing).
        for path in paths:
            if path.endswith(".weight") and not is_te_key(path):
                key_map[diffusers_prefix(path[: -len(".weight")])] = path
    return key_map


def _bias_of(target: str) -> str:
    # ComfyUI cuts len(".weight") characters off the target, whatever it ends with.
    return target[: -len(".weight")] + ".bias"


def index_lora(lora_keys: Iterable[str], model_paths: Iterable[str]) -> LoraIndex:
    """Match LoRA keys to model parameters by ComfyUI's rules (key names only)."""
    keys = list(lora_keys)
    present = set(keys)
    used: set[str] = set()
    index = LoraIndex()
    styles: set[str] = set()

    def take(name: str) -> str | None:
        if name in present:
            used.add(name)
            return name
        return None

    for x, target in comfy_key_map(model_paths).items():
        alpha = take(f"{x}.alpha")
        dora = take(f"{x}.dora_scale")
        found = False
        for up_sfx, down_sfx, mid_sfx in UP_DOWN_FORMATS:
            if x + up_sfx in present:
                if x + down_sfx not in present:
                    raise ExtractionInputError(
                        f"LoRA key {x + up_sfx!r} has no matching {x + down_sfx!r}: the LoRA file "
                        "is incomplete (ComfyUI fails on it too). Re-extract or re-download it.")
                index.patches[target] = LoraPatch(
                    target=target, kind=KIND_LORA, prefix=x, up=take(x + up_sfx),
                    down=take(x + down_sfx), mid=take(x + mid_sfx) if mid_sfx else None,
                    alpha=alpha, reshape=take(f"{x}.reshape_weight"), dora=dora)
                found = True
                break
        w_norm = take(f"{x}.w_norm")
        if w_norm is not None:
            index.patches[target] = LoraPatch(target, KIND_DIFF, x, tensor=w_norm)
            b_norm = take(f"{x}.b_norm")
            if b_norm is not None:
                index.patches[_bias_of(target)] = LoraPatch(_bias_of(target), KIND_DIFF, x, tensor=b_norm)
        diff = take(f"{x}.diff")
        if diff is not None:
            index.patches[target] = LoraPatch(target, KIND_DIFF, x, tensor=diff)
        diff_b = take(f"{x}.diff_b")
        if diff_b is not None:
            index.patches[_bias_of(target)] = LoraPatch(_bias_of(target), KIND_DIFF, x, tensor=diff_b)
        set_weight = take(f"{x}.set_weight")
        if set_weight is not None:
            index.patches[target] = LoraPatch(target, KIND_SET, x, tensor=set_weight)
        if found or diff is not None or diff_b is not None or w_norm is not None or set_weight is not None:
            styles.add("kohya" if x.startswith((KOHYA_UNET_PREFIX, "lora_te"))
                       else "diffusers" if x.startswith(("transformer.", "unet.", "text_encoder.",
                                                          "text_encoder_2."))
                       else "comfy")
    for k in keys:
        if k in used:
            continue
        (index.text_encoder if k.startswith(TEXT_ENCODER_PREFIXES) else index.unmatched).append(k)
    index.key_styles = sorted(styles)
    return index


def _alpha_value(lora: WeightSource, key: str) -> float:
    t = lora.get(key, "cpu", torch.float32)
    if t.numel() != 1:
        raise ExtractionInputError(
            f"LoRA key {key!r} has shape {list(t.shape)}; an alpha must be a single number. "
            "The LoRA file is malformed.")
    return float(t.reshape(()))


def _fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Tucker (LoCon ``lora_mid``): new_down[a, i, h, w] = sum_b down[b, i] * mid[a, b, h, w]."""
    return torch.einsum("bi,abhw->aihw", down.flatten(1), mid)


def _pad(weight: torch.Tensor, shape: list[int], target: str) -> torch.Tensor:
    if len(shape) != weight.dim() or any(n < o for n, o in zip(shape, weight.shape, strict=True)):
        raise PatchNotMerged(f"{target}: reshape_weight {shape} cannot hold a weight of shape "
                             f"{list(weight.shape)}")
    out = weight.new_zeros(shape)
    out[tuple(slice(0, d) for d in weight.shape)] = weight
    return out


def patched_weight(weight: torch.Tensor, patch: LoraPatch, lora: WeightSource,
                   strength: float = 1.0) -> torch.Tensor:
    """``weight`` with ``patch`` applied, in float32 (``weight`` itself is not modified).

    Raises :class:`PatchNotMerged` where ComfyUI would log the patch and skip it (a ``.diff`` of
    the wrong shape, a LoRA product that does not reshape to the weight).
    """
    w = weight.to(torch.float32)
    device = w.device
    if patch.kind == KIND_SET:
        assert patch.tensor is not None
        return lora.get(patch.tensor, device, torch.float32).expand_as(w).clone()
    if patch.kind == KIND_DIFF:
        assert patch.tensor is not None
        diff = lora.get(patch.tensor, device, torch.float32)
        if tuple(diff.shape) != tuple(w.shape):
            raise PatchNotMerged(f"{patch.tensor}: shape {list(diff.shape)} does not match the "
                                 f"weight {patch.target} {list(w.shape)}")
        return w + strength * diff
    assert patch.up is not None and patch.down is not None
    if patch.dora is not None:
        raise PatchNotMerged(f"{patch.dora}: DoRA patches are not supported by validation")
    if patch.reshape is not None:
        w = _pad(w, [int(v) for v in lora.get(patch.reshape, "cpu", torch.float32).tolist()],
                 patch.target)
    up = lora.get(patch.up, device, torch.float32)
    down = lora.get(patch.down, device, torch.float32)
    rank = down.shape[0]
    if patch.mid is not None:
        down = _fold_mid(down, lora.get(patch.mid, device, torch.float32))
    scale = _alpha_value(lora, patch.alpha) / rank if patch.alpha is not None else 1.0
    try:
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    except RuntimeError as e:
        raise PatchNotMerged(f"{patch.up}: up {list(up.shape)} @ down {list(down.shape)} does not "
                             f"fit the weight {patch.target} {list(w.shape)}") from e
    return w + (strength * scale) * delta
