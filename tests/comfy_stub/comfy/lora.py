"""Stub of ``comfy.lora``: LoRA loading, the generic UNet key map and ``calculate_weight``."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import comfy.weight_adapter as weight_adapter
import torch
from comfy.weight_adapter.base import pad_tensor_to_shape

__all__ = ["load_lora", "model_lora_keys_unet", "model_lora_keys_clip", "calculate_weight",
           "pad_tensor_to_shape"]


def _bias_key(target: str) -> str:
    # ComfyUI strips len(".weight") characters whatever the target ends with, so a diff_b on a
    # non-.weight target yields a key that matches nothing; keep that behaviour.
    return "{}.bias".format(target[: -len(".weight")])


def load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, Any], log_missing: bool = True) -> dict[Any, Any]:
    """Turn a LoRA state dict into ``{model key: patch}`` using ``to_load`` (prefix -> model key).

    For each prefix ``x`` of ``to_load`` (in order; a later prefix mapping to the same model key
    overwrites the patch of an earlier one), as in ComfyUI 0.3.64:
    ``x.alpha`` and ``x.dora_scale`` are consumed whenever present; an up/down pair gives a
    ``LoRAAdapter``; then ``x.w_norm``/``x.b_norm`` and ``x.diff`` give ``("diff", (t,))`` on the
    weight, ``x.diff_b`` a ``("diff", (t,))`` on the sibling ``.bias``, and ``x.set_weight`` a
    ``("set", (t,))`` (each later one replacing an earlier patch on the same key).
    Every key of ``lora`` not consumed is logged as ``lora key not loaded: <key>`` (warning).
    """
    patch_dict: dict[Any, Any] = {}
    loaded_keys: set[str] = set()
    for x, target in to_load.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded_keys.add(f"{x}.alpha")

        dora_scale = None
        if f"{x}.dora_scale" in lora:
            dora_scale = lora[f"{x}.dora_scale"]
            loaded_keys.add(f"{x}.dora_scale")

        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[target] = adapter
                loaded_keys.update(adapter.loaded_keys)

        w_norm = lora.get(f"{x}.w_norm")
        if w_norm is not None:
            loaded_keys.add(f"{x}.w_norm")
            patch_dict[target] = ("diff", (w_norm,))
            b_norm = lora.get(f"{x}.b_norm")
            if b_norm is not None:
                loaded_keys.add(f"{x}.b_norm")
                patch_dict[_bias_key(target)] = ("diff", (b_norm,))

        diff = lora.get(f"{x}.diff")
        if diff is not None:
            patch_dict[target] = ("diff", (diff,))
            loaded_keys.add(f"{x}.diff")

        diff_b = lora.get(f"{x}.diff_b")
        if diff_b is not None:
            patch_dict[_bias_key(target)] = ("diff", (diff_b,))
            loaded_keys.add(f"{x}.diff_b")

        set_weight = lora.get(f"{x}.set_weight")
        if set_weight is not None:
            patch_dict[target] = ("set", (set_weight,))
            loaded_keys.add(f"{x}.set_weight")

    if log_missing:
        for k in lora.keys():
            if k not in loaded_keys:
                logging.warning(f"lora key not loaded: {k}")
    return patch_dict


def model_lora_keys_unet(model: torch.nn.Module, key_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the generic ComfyUI LoRA prefixes of ``model``'s diffusion-model keys to ``key_map``.

    For ``diffusion_model.<path>.weight``: ``lora_unet_<path with . -> _>`` and
    ``diffusion_model.<path>``; for any other ``diffusion_model.`` key: the key itself. The real
    function then adds architecture-specific aliases (diffusers, SD3, Flux, ...) that the stub
    lacks, and defaults ``key_map`` to one dict shared by all calls; the stub makes a new one.
    """
    if key_map is None:
        key_map = {}
    prefix = "diffusion_model."
    for k in model.state_dict().keys():
        if not k.startswith(prefix):
            continue
        if k.endswith(".weight"):
            path = k[len(prefix): -len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
        else:
            key_map[k] = k
    return key_map


# The CLIP modules kohya names, and their names (ComfyUI's LORA_CLIP_MAP).
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def model_lora_keys_clip(model: torch.nn.Module, key_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """LoRA prefixes of a CLIP's ``cond_stage_model`` keys, by ComfyUI 0.3.64's rules.

    Every ``<k>.weight``: ``text_encoders.<k>``. Encoder layers 0..31 of ``clip_h`` / ``clip_l``
    (``lora_te_``, ``lora_te1_``, diffusers ``text_encoder.``) and ``clip_g`` (with CLIP-L:
    ``lora_te2_``, ``text_encoder_2.``; alone: ``lora_te_``, ``text_encoder.``,
    ``lora_prior_te_``); T5-XXL ``lora_te<n>_<path>`` (n = 1 + CLIP-G + CLIP-L; with CLIP-L and
    no CLIP-G also n = 2 and 3); ``lora_te1_/lora_te2_text_projection``. Not modelled:
    HunyuanDiT's BERT and the 0.33 additions (unprefixed composite names, single llama TEs).
    """
    if key_map is None:
        key_map = {}
    sdk = set(model.state_dict().keys())
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders." + k[: -len(".weight")]] = k
    has = {e: any(k.startswith(e + ".transformer.text_model.encoder.layers.") for k in sdk)
           for e in ("clip_h", "clip_l", "clip_g")}
    for b in range(32):
        for mod, kohya in LORA_CLIP_MAP.items():
            tail = f"text_model_encoder_layers_{b}_{kohya}"
            dotted = f"text_model.encoder.layers.{b}.{mod}"
            for enc in ("clip_h", "clip_l"):
                k = f"{enc}.transformer.{dotted}.weight"
                if k in sdk:
                    for name in (f"lora_te_{tail}", f"lora_te1_{tail}", f"text_encoder.{dotted}"):
                        key_map[name] = k
            k = f"clip_g.transformer.{dotted}.weight"
            if k in sdk:
                names = ((f"lora_te2_{tail}", f"text_encoder_2.{dotted}") if has["clip_l"] else
                         (f"lora_te_{tail}", f"text_encoder.{dotted}", f"lora_prior_te_{tail}"))
                for name in names:
                    key_map[name] = k
    t5 = "t5xxl.transformer."
    for k in sdk:
        if k.startswith(t5) and k.endswith(".weight"):
            path = k[len(t5): -len(".weight")].replace(".", "_")
            n = 1 + has["clip_g"] + has["clip_l"]
            if has["clip_l"] and not has["clip_g"]:
                key_map[f"lora_te2_{path}"] = k
                n = 3
            key_map[f"lora_te{n}_{path}"] = k
    if "clip_g.transformer.text_projection.weight" in sdk:
        key_map["lora_prior_te_text_projection"] = "clip_g.transformer.text_projection.weight"
        key_map["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    if "clip_l.transformer.text_projection.weight" in sdk:
        key_map["lora_te1_text_projection"] = "clip_l.transformer.text_projection.weight"
    return key_map


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def calculate_weight(
    patches: list[tuple],
    weight: torch.Tensor,
    key: str,
    intermediate_dtype: torch.dtype = torch.float32,
    original_weights: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Apply ``patches`` (``(strength, value, strength_model, offset, function)`` tuples) to ``weight``.

    Semantics of ComfyUI 0.3.64 (``weight`` is modified in place where possible):
    ``offset`` narrows the weight to a slice; ``strength_model != 1`` scales the weight first;
    a *list* value (a ``get_key_patches`` entry: ``[(weight, convert_func), *patches]``) is
    resolved recursively to that weight and used as a diff; a ``WeightAdapterBase`` applies itself;
    ``(t,)`` or ``("diff", (t,))`` adds ``strength * t`` (a shape mismatch is logged and
    skipped); ``("set", (t,))`` copies ``t``; ``("model_as_lora", (t,))`` adds
    ``strength * (t - original)``; anything else, including the old ``("lora", (...))`` tuples,
    is logged as ``patch type not recognized``.
    """
    for strength, v, strength_model, offset, function in (p[:5] for p in patches):
        if function is None:
            function = _identity

        whole = None
        if offset is not None:
            whole = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])

        if strength_model != 1.0:
            weight *= strength_model

        if isinstance(v, list):
            # another model's weight with its own patches, used as a diff (model merging)
            base, convert = v[0]
            start = convert(comfy.model_management.cast_to_device(base, weight.device, intermediate_dtype, copy=True),
                            inplace=True)
            v = (calculate_weight(v[1:], start, key, intermediate_dtype=intermediate_dtype),)

        if isinstance(v, weight_adapter.WeightAdapterBase):
            out = v.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype,
                                     original_weights)
            if out is None:
                logging.warning(f"Calculate Weight Failed: {v.name} {key}")
            else:
                weight = out
                if whole is not None:
                    weight = whole
            continue

        if len(v) == 1:
            patch_type = "diff"
        elif len(v) == 2:
            patch_type, v = v[0], v[1]
        else:
            patch_type = None  # the real code would reuse a stale name or fail here

        if patch_type == "diff":
            diff = v[0]
            if len(v) > 1 and v[1]["pad_weight"] and diff.shape != weight.shape:
                logging.info(f"Pad weight {key} from {weight.shape} to shape: {diff.shape}")
                weight = pad_tensor_to_shape(weight, diff.shape)
            if strength != 0.0:
                if diff.shape != weight.shape:
                    logging.warning(f"WARNING SHAPE MISMATCH {key} WEIGHT NOT MERGED {diff.shape} != {weight.shape}")
                else:
                    weight += function(strength * comfy.model_management.cast_to_device(diff, weight.device,
                                                                                         weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        elif patch_type == "model_as_lora":
            if original_weights is None:
                raise TypeError("model_as_lora patches need original_weights")
            target = comfy.model_management.cast_to_device(v[0], weight.device, intermediate_dtype)
            original = comfy.model_management.cast_to_device(original_weights[key][0][0], weight.device,
                                                             intermediate_dtype)
            weight += function(strength * comfy.model_management.cast_to_device(target - original, weight.device,
                                                                                weight.dtype))
        else:
            logging.warning(f"patch type not recognized {patch_type} {key}")

        if whole is not None:
            weight = whole

    return weight
