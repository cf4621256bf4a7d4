"""Small SDXL-named base checkpoints and LoRA files for the resize tests (no tests here).

Shapes are tiny, names are real SDXL names: the UNet in LDM layout under
``model.diffusion_model.``, CLIP-L in HF layout, CLIP-G in OpenCLIP layout (fused qkv).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from tests.support.helpers import matrix_with_spectrum

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
TE2 = "conditioner.embedders.1.model.transformer.resblocks.0."
C, CTX, G = 32, 48, 20   # unet channels, cross-attention context, CLIP-G width

BASE_SHAPES: dict[str, tuple[int, ...]] = {
    UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (C, C),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (C, CTX),
    UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (4 * C, C),
    UNET + "input_blocks.1.0.in_layers.2.weight": (16, 16, 3, 3),
    UNET + "input_blocks.1.0.in_layers.2.bias": (16,),
    UNET + "output_blocks.2.2.conv.weight": (C, C, 3, 3),
    TE1 + "self_attn.q_proj.weight": (24, 24),
    TE2 + "attn.in_proj_weight": (3 * G, G),
    TE2 + "attn.in_proj_bias": (3 * G,),
    TE2 + "mlp.c_fc.weight": (4 * G, G),
}


def make_base(folder: str, gen: torch.Generator, name: str = "base.safetensors") -> tuple[str, dict[str, torch.Tensor]]:
    sd = {}
    for k, shape in BASE_SHAPES.items():
        sd[k] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    path = os.path.join(folder, name)
    save_file(sd, path)
    return path, sd


def lora_pair(out: int, inn: tuple[int, ...], sigma: torch.Tensor, gen: torch.Generator,
              alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) whose scaled product ``alpha/r * up @ down`` has singular values ``sigma``."""
    r = sigma.numel()
    scale = 1.0 if alpha is None else alpha / r
    m = matrix_with_spectrum(out, int(torch.tensor(inn).prod()), sigma.double() / scale, gen)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    up = (u[:, :r] * s[:r].sqrt()).float()
    down = (s[:r].sqrt()[:, None] * vh[:r]).float()
    # mix the factors by a random invertible matrix: a LoRA is never balanced SVD factors
    mix = torch.randn(r, r, generator=gen) + 3 * torch.eye(r)
    up, down = up @ mix, torch.linalg.solve(mix, down)
    up = up.reshape(out, r, *([1] * (len(inn) - 1)))
    down = down.reshape(r, *inn)
    return up.contiguous(), down.contiguous()


def kohya_layer(sd: dict[str, torch.Tensor], prefix: str, up: torch.Tensor, down: torch.Tensor,
                alpha: float | None) -> None:
    sd[prefix + ".lora_up.weight"] = up
    sd[prefix + ".lora_down.weight"] = down
    if alpha is not None:
        sd[prefix + ".alpha"] = torch.tensor(float(alpha))


def spectrum(r: int, top: float = 1.0, decay: float = 0.7) -> torch.Tensor:
    return top * decay ** torch.arange(r, dtype=torch.float64)
