"""ComfyUI's handling of a diffusers-named Flux model and its diffusers-named LoRAs, for tests.

An independent re-implementation (no ``comfy`` import, written from ComfyUI 0.3.64 / 0.33 code,
not from the pack) of:
- ``comfy.utils.flux_to_diffusers``: diffusers parameter -> LDM parameter, a row slice of a fused
  LDM weight ``(key, (dim, start, size))``, or ``(key, None, function)``;
- ``comfy.model_detection.convert_diffusers_mmdit`` for Flux (what ``UNETLoader`` does);
- the Flux part of ``comfy.lora.model_lora_keys_unet`` (``transformer.<module>`` for weights);
- ``comfy.lora.load_lora`` (which keys are consumed; ``.diff_b`` on a tuple target builds the
  key ``"().bias"``, which matches no parameter: the patch is dropped without a warning) and the
  LoRA / diff weight math with the slice and function of the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Target = str | tuple


def swap_scale_shift(w: torch.Tensor) -> torch.Tensor:
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_diffusers(depth: int, depth_single: int, hidden: int, prefix: str = "") -> dict[str, Target]:
    m: dict[str, Target] = {}
    h = hidden
    for i in range(depth):
        f, t = f"transformer_blocks.{i}", f"{prefix}double_blocks.{i}"
        for end in ("weight", "bias"):
            for j, q in enumerate("qkv"):
                m[f"{f}.attn.to_{q}.{end}"] = (f"{t}.img_attn.qkv.{end}", (0, j * h, h))
                m[f"{f}.attn.add_{q}_proj.{end}"] = (f"{t}.txt_attn.qkv.{end}", (0, j * h, h))
        block = {
            "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        }
        for a, b in block.items():
            for end in ("weight", "bias"):
                m[f"{f}.{a}.{end}"] = f"{t}.{b}.{end}"
        for a, b in {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                     "attn.norm_added_q": "txt_attn.norm.query_norm",
                     "attn.norm_added_k": "txt_attn.norm.key_norm"}.items():
            m[f"{f}.{a}.weight"] = f"{t}.{b}.NORM"   # .scale (0.3.64) or .weight (0.33)
    for i in range(depth_single):
        f, t = f"single_transformer_blocks.{i}", f"{prefix}single_blocks.{i}"
        for end in ("weight", "bias"):
            for j, q in enumerate("qkv"):
                m[f"{f}.attn.to_{q}.{end}"] = (f"{t}.linear1.{end}", (0, j * h, h))
            m[f"{f}.proj_mlp.{end}"] = (f"{t}.linear1.{end}", (0, 3 * h, 4 * h))
            m[f"{f}.norm.linear.{end}"] = f"{t}.modulation.lin.{end}"
            m[f"{f}.proj_out.{end}"] = f"{t}.linear2.{end}"
        m[f"{f}.attn.norm_q.weight"] = f"{t}.norm.query_norm.NORM"
        m[f"{f}.attn.norm_k.weight"] = f"{t}.norm.key_norm.NORM"
    basic = {
        "proj_out": "final_layer.linear", "x_embedder": "img_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "context_embedder": "txt_in",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    for a, b in basic.items():
        for end in ("weight", "bias"):
            m[f"{a}.{end}"] = f"{prefix}{b}.{end}"
    for end in ("weight", "bias"):
        m[f"norm_out.linear.{end}"] = (f"{prefix}final_layer.adaLN_modulation.1.{end}", None, swap_scale_shift)
    return m


def _norm_name(m: dict[str, Target], norm_suffix: str) -> dict[str, Target]:
    return {k: (v.replace(".NORM", "." + norm_suffix) if isinstance(v, str) else v) for k, v in m.items()}


def flux_map_for(sd: Mapping[str, torch.Tensor], prefix: str = "", norm_suffix: str = "scale") -> dict[str, Target]:
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    return _norm_name(flux_to_diffusers(depth, single, sd["x_embedder.bias"].shape[0], prefix), norm_suffix)


def convert_diffusers_flux(sd: Mapping[str, torch.Tensor], norm_suffix: str = "scale") -> dict[str, torch.Tensor]:
    """``convert_diffusers_mmdit`` for Flux: the LDM state dict UNETLoader builds (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in flux_map_for(sd, "", norm_suffix).items():
        w = sd.get(k)
        if w is None:
            continue
        if isinstance(t, str):
            out[t] = w.clone()
            continue
        key, offset = t[0], t[1]
        fn: Callable = t[2] if len(t) > 2 else (lambda a: a)
        if offset is None:
            out[key] = fn(w)
            continue
        dim, start, size = offset
        old = out.get(key)
        need = start + size
        if old is None or old.shape[dim] < need:
            shape = list(w.shape)
            shape[dim] = need
            new = torch.zeros(shape, dtype=w.dtype)
            if old is not None:
                new.narrow(dim, 0, old.shape[dim]).copy_(old)
            old = new
        old.narrow(dim, start, size).copy_(fn(w))
        out[key] = old
    return out


def flux_lora_key_map(diffusers_sd: Mapping[str, torch.Tensor], norm_suffix: str = "scale") -> dict[str, Target]:
    """LoRA prefix -> target, the ``transformer.`` entries ``model_lora_keys_unet`` adds for Flux."""
    return {f"transformer.{k[:-len('.weight')]}": t
            for k, t in flux_map_for(diffusers_sd, "diffusion_model.", norm_suffix).items()
            if k.endswith(".weight")}


def load_and_apply(model_sd: dict[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
                   key_map: Mapping[str, Target]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply ``lora`` at strength 1 to ``model_sd`` (keys with ``diffusion_model.``) as ComfyUI does.

    Returns the patched state dict and the LoRA keys ComfyUI would log as "lora key not loaded".
    """
    out = {k: v.clone().float() for k, v in model_sd.items()}
    loaded: set[str] = set()
    patches: list[tuple[Target, str, tuple]] = []
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = float(lora[f"{x}.alpha"])
            loaded.add(f"{x}.alpha")
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up in lora:
                loaded.update({x + up, x + down})
                patches.append((target, "lora", (lora[x + up], lora[x + down], alpha)))
                break
        if f"{x}.diff" in lora:
            loaded.add(f"{x}.diff")
            patches.append((target, "diff", (lora[f"{x}.diff"],)))
        if f"{x}.diff_b" in lora:
            loaded.add(f"{x}.diff_b")
            # load_lora: "{}.bias".format(to_load[x][:-len(".weight")]); a tuple target gives "().bias".
            patches.append((f"{target[:-len('.weight')]}.bias", "diff", (lora[f"{x}.diff_b"],)))
    for target, kind, v in patches:
        key, offset, fn = (target, None, None) if isinstance(target, str) else (
            target[0], target[1], target[2] if len(target) > 2 else None)
        if key not in out:
            continue                      # add_patches ignores keys the model does not have
        w = out[key] if offset is None else out[key].narrow(*offset)
        if kind == "lora":
            up, down, alpha = v
            d = up.float().flatten(1) @ down.float().flatten(1)
            if alpha is not None:
                d = d * (alpha / down.shape[0])
            d = d.reshape(w.shape)
        else:
            d = v[0].float().reshape(w.shape)
        w += fn(d) if fn is not None else d
    return out, sorted(k for k in lora if k not in loaded)
