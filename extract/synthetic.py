"""Generated base/fine-tuned model pairs with realistic shapes and spectra.

Used by ``lora-extract demo``, the tests and the benchmarks. A fine-tune's weight delta is
modelled as a low-rank part with a decaying spectrum plus small dense noise, which is what real
fine-tune deltas look like (a fast-decaying head and a long, slowly decaying tail).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .writer import save_safetensors_atomic


def decaying_delta(shape: tuple[int, ...], rank: int, decay: float = 0.8, scale: float = 0.02,
                   noise: float = 0.02, generator: torch.Generator | None = None) -> torch.Tensor:
    """A delta of ``shape`` whose flattened matrix has a geometric spectrum plus noise.

    ``sigma_i = scale * sqrt(min(out, in)) * decay**i`` for i < rank, plus dense Gaussian noise
    whose spectrum is about ``noise * sigma_0`` at the top (a slowly decaying tail).
    """
    out_dim = shape[0]
    in_dim = math.prod(shape[1:])
    r = min(rank, out_dim, in_dim)
    u, _ = torch.linalg.qr(torch.randn(out_dim, r, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_dim, r, generator=generator))
    sigma = scale * math.sqrt(min(out_dim, in_dim)) * decay ** torch.arange(r, dtype=torch.float32)
    delta = (u * sigma) @ v.T
    if noise > 0:
        delta += torch.randn(out_dim, in_dim, generator=generator) * (
            noise * float(sigma[0]) / math.sqrt(max(out_dim, in_dim)))
    return delta.reshape(shape)


@dataclass(frozen=True)
class LayerSpec:
    key: str
    shape: tuple[int, ...]
    rank: int = 16          # rank of the structured part of the delta (0: unchanged)


def demo_layers(width: int = 320) -> list[LayerSpec]:
    """A small SD-like UNet block and a DiT-like block: linear, conv 3x3/1x1, Conv3d, norms."""
    w = width
    return [
        LayerSpec("diffusion_model.input_blocks.0.0.weight", (w, 4, 3, 3), 8),
        LayerSpec("diffusion_model.input_blocks.0.0.bias", (w,), 1),
        LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.weight", (w, w, 3, 3), 24),
        LayerSpec("diffusion_model.input_blocks.1.0.in_layers.2.bias", (w,), 1),
        LayerSpec("diffusion_model.input_blocks.1.1.proj_in.weight", (w, w, 1, 1), 16),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (w, w), 16),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", (w, w), 16),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (w, 768), 12),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (8 * w, w), 32),
        LayerSpec("diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", (w, 4 * w), 32),
        LayerSpec("diffusion_model.input_blocks.1.1.norm.weight", (w,), 1),
        LayerSpec("diffusion_model.middle_block.1.proj_out.weight", (w, w), 0),
        LayerSpec("diffusion_model.blocks.0.self_attn.qkv.weight", (3 * w, w), 24),
        LayerSpec("diffusion_model.blocks.0.modulation", (1, 6, w), 1),
        LayerSpec("diffusion_model.patch_embedding.weight", (w, 16, 1, 2, 2), 8),
        LayerSpec("diffusion_model.patch_embedding.bias", (w,), 1),
    ]


def make_pair(layers: list[LayerSpec], seed: int = 0, dtype: torch.dtype = torch.float32,
              noise: float = 0.02) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and fine-tuned state dicts for ``layers``."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    for spec in layers:
        w = torch.randn(spec.shape, generator=g) * (1.0 / math.sqrt(max(1, math.prod(spec.shape[1:]))))
        if spec.rank == 0:
            d = torch.zeros(spec.shape)
        elif len(spec.shape) >= 2 and spec.key.endswith(".weight"):
            d = decaying_delta(spec.shape, spec.rank, noise=noise, generator=g)
        else:
            d = torch.randn(spec.shape, generator=g) * 0.01
        base[spec.key] = w.to(dtype)
        tuned[spec.key] = (w + d).to(dtype)
    return base, tuned


def write_pair(folder: str, layers: list[LayerSpec], seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Write a generated pair as ``base.safetensors`` / ``tuned.safetensors`` in ``folder``."""
    base, tuned = make_pair(layers, seed, dtype)
    os.makedirs(folder, exist_ok=True)
    bp = os.path.join(folder, "base.safetensors")
    tp = os.path.join(folder, "tuned.safetensors")
    save_safetensors_atomic(base, bp, overwrite=True)
    save_safetensors_atomic(tuned, tp, overwrite=True)
    return bp, tp
