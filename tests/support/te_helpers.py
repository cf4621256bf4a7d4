"""Small text encoders laid out as ComfyUI's CLIP holds them, and checkpoints that store them.

``SD1ClipModel`` / ``SDXLClipModel`` / ``SD3ClipModel`` have the children and parameter names of
ComfyUI's (``clip_l.transformer.text_model.encoder.layers.N.self_attn.q_proj.weight``,
``clip_l.logit_scale``, ``t5xxl.transformer.encoder.block.N...``), at toy sizes.
``*_checkpoint_sd`` write the same weights the way checkpoints store them (SD1
``cond_stage_model.transformer.*``; SDXL ``conditioner.embedders.0`` HF and ``.1`` OpenCLIP with
fused q/k/v and a transposed projection; SD3 ``text_encoders.*``), the inverse of ComfyUI's
conversion, so a test can check that our reading of a checkpoint gives the CLIP's own keys.
"""

from __future__ import annotations

import torch
from torch import nn


class _Layer(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(w)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            self.self_attn.add_module(n, nn.Linear(w, w))
        self.layer_norm2 = nn.LayerNorm(w)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(w, 2 * w)
        self.mlp.fc2 = nn.Linear(2 * w, w)


class _TextModel(nn.Module):
    """comfy.clip_model.CLIPTextModel: ``text_model`` + ``text_projection``."""

    def __init__(self, w: int, layers: int, vocab: int = 40, positions: int = 7) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(vocab, w)
        self.text_model.embeddings.position_embedding = nn.Embedding(positions, w)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([_Layer(w) for _ in range(layers)])
        self.text_model.final_layer_norm = nn.LayerNorm(w)
        self.text_projection = nn.Linear(w, w, bias=False)


class _ClipEncoder(nn.Module):
    """comfy.sd1_clip.SDClipModel: ``transformer`` + ``logit_scale``."""

    def __init__(self, w: int, layers: int) -> None:
        super().__init__()
        self.transformer = _TextModel(w, layers)
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))


class _T5(nn.Module):
    def __init__(self, w: int, blocks: int) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.shared = nn.Embedding(30, w)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.block = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Module()
            b.layer = nn.ModuleList([nn.Module()])
            b.layer[0].SelfAttention = nn.Module()
            for n in "qkvo":
                b.layer[0].SelfAttention.add_module(n, nn.Linear(w, w, bias=False))
            self.transformer.encoder.block.append(b)


class SD1ClipModel(nn.Module):
    def __init__(self, width: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.clip_l = _ClipEncoder(width, layers)
        self.dtypes = {torch.float32}


class SDXLClipModel(nn.Module):
    def __init__(self, width: int = 24, width_g: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.clip_l = _ClipEncoder(width, layers)
        self.clip_g = _ClipEncoder(width_g, layers)
        self.dtypes = {torch.float32}


class SD3ClipModel(nn.Module):
    def __init__(self, width: int = 24, width_g: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.clip_l = _ClipEncoder(width, layers)
        self.clip_g = _ClipEncoder(width_g, layers)
        self.t5xxl = _T5(20, layers)
        self.dtypes = {torch.float32}


def make_clip(cls: type, seed: int = 0, **kw):
    """A stub ``comfy.sd.CLIP`` around a seeded toy encoder of class ``cls``."""
    from comfy.sd import CLIP, ClipTarget

    torch.manual_seed(seed)
    # ComfyUI freezes its encoders (SDClipModel.freeze): no gradients.
    target = ClipTarget(tokenizer=None, clip=lambda: cls(**kw).requires_grad_(False))
    return CLIP(target)


def low_rank_deltas(sd: dict[str, torch.Tensor], rank: int, seed: int,
                    scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A rank-``rank`` delta for every matrix, a small dense one for every vector (like a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if v.dim() == 2:
            r = min(rank, *v.shape)
            out[k] = scale * (torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g)) / r
        else:
            out[k] = scale * torch.randn(v.shape, generator=g)
    return out


def tuned_clip(base, rank: int = 3, seed: int = 1):
    """A fine-tuned CLIP: a clone of ``base`` patched with low-rank deltas (as LoraLoader would)."""
    tuned = base.clone()
    deltas = low_rank_deltas(base.patcher.model_state_dict(), rank, seed)
    tuned.add_patches({k: (d,) for k, d in deltas.items()})
    return tuned, deltas


def _openclip(sd: dict[str, torch.Tensor], enc: str, prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP layout of one encoder (inverse of ComfyUI's transformers_convert)."""
    out = {}
    t = f"{enc}.transformer.text_model."
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
    layers = sorted({int(k[len(t + "encoder.layers."):].split(".")[0]) for k in sd if k.startswith(t + "encoder.layers.")})
    for n in layers:
        lp = f"{t}encoder.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{lp}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for hf, oc in ren.items():
                out[f"{prefix}transformer.resblocks.{n}.{oc}.{kind}"] = sd[f"{lp}{hf}.{kind}"]
    out[prefix + "token_embedding.weight"] = sd[t + "embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd[t + "embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd[t + "final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd[t + "final_layer_norm.bias"]
    out[prefix + "text_projection"] = sd[f"{enc}.transformer.text_projection.weight"].T.contiguous()
    out[prefix + "logit_scale"] = sd[f"{enc}.logit_scale"]
    return out


def checkpoint_te_sd(clip_sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The text-encoder part of a ``family`` (sd1 / sdxl / sd3) checkpoint holding ``clip_sd``."""
    if family == "sd1":
        return {"cond_stage_model." + k[len("clip_l."):]: v for k, v in clip_sd.items()
                if k.startswith("clip_l.transformer.text_model.")}
    if family == "sdxl":
        out = {"conditioner.embedders.0.transformer." + k[len("clip_l.transformer."):]: v
               for k, v in clip_sd.items() if k.startswith("clip_l.transformer.text_model.")}
        out.update(_openclip(clip_sd, "clip_g", "conditioner.embedders.1.model."))
        return out
    if family == "sd3":
        return {"text_encoders." + k: v for k, v in clip_sd.items()}
    raise ValueError(family)
