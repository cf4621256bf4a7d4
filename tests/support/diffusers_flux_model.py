"""A diffusers-named Flux transformer state dict (FluxTransformer2DModel's names and shapes),
built with plain torch, and a fine-tune of it with known low-rank deltas.

Used by the unit tests (tiny sizes) and by ``tests/integration/make_diffusers_flux.py`` (sizes
ComfyUI 0.3.64's Flux detection accepts: hidden 3072, context 4096). Each tuned matrix is
base + a seeded rank-``true_rank`` delta + small dense noise; each bias and norm a small shift.
"""

from __future__ import annotations

import torch


def flux_shapes(hidden: int = 32, depth: int = 1, depth_single: int = 1, in_channels: int = 16,
                context: int = 24, vec: int = 12, head_dim: int = 16, guidance: bool = False,
                out_channels: int = 16) -> dict[str, tuple[int, ...]]:
    h, mlp = hidden, 4 * hidden
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out: int, inp: int) -> None:
        s[f"{name}.weight"] = (out, inp)
        s[f"{name}.bias"] = (out,)

    lin("x_embedder", h, in_channels * 4)
    lin("context_embedder", h, context)
    lin("time_text_embed.timestep_embedder.linear_1", h, 256)
    lin("time_text_embed.timestep_embedder.linear_2", h, h)
    lin("time_text_embed.text_embedder.linear_1", h, vec)
    lin("time_text_embed.text_embedder.linear_2", h, h)
    if guidance:
        lin("time_text_embed.guidance_embedder.linear_1", h, 256)
        lin("time_text_embed.guidance_embedder.linear_2", h, h)
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        lin(f"{b}.norm1.linear", 6 * h, h)
        lin(f"{b}.norm1_context.linear", 6 * h, h)
        for q in "qkv":
            lin(f"{b}.attn.to_{q}", h, h)
            lin(f"{b}.attn.add_{q}_proj", h, h)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{b}.attn.{n}.weight"] = (head_dim,)
        lin(f"{b}.attn.to_out.0", h, h)
        lin(f"{b}.attn.to_add_out", h, h)
        lin(f"{b}.ff.net.0.proj", mlp, h)
        lin(f"{b}.ff.net.2", h, mlp)
        lin(f"{b}.ff_context.net.0.proj", mlp, h)
        lin(f"{b}.ff_context.net.2", h, mlp)
    for i in range(depth_single):
        b = f"single_transformer_blocks.{i}"
        lin(f"{b}.norm.linear", 3 * h, h)
        lin(f"{b}.proj_mlp", mlp, h)
        lin(f"{b}.proj_out", h, h + mlp)
        for q in "qkv":
            lin(f"{b}.attn.to_{q}", h, h)
        s[f"{b}.attn.norm_q.weight"] = (head_dim,)
        s[f"{b}.attn.norm_k.weight"] = (head_dim,)
    lin("norm_out.linear", 2 * h, h)
    lin("proj_out", out_channels * 4, h)
    return s


def flux_pair(shapes: dict[str, tuple[int, ...]], seed: int = 0, true_rank: int = 4,
              noise: float = 1e-3, dtype: torch.dtype = torch.float32
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, tuned): tuned = base + rank-``true_rank`` delta (+ ``noise`` dense) per matrix."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if len(shape) == 2:
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
            r = min(true_rank, *shape)
            decay = torch.linspace(1.0, 0.3, r)
            d = (torch.randn(shape[0], r, generator=g) * decay) @ torch.randn(r, shape[1], generator=g)
            d = d * (0.05 / shape[1] ** 0.5) + noise * torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:
            w = (torch.ones(shape) if k.endswith("norm_q.weight") or "norm_" in k.rsplit(".", 2)[-2]
                 else 0.02 * torch.randn(shape, generator=g))
            d = 0.01 * torch.randn(shape, generator=g)
        base[k] = w.to(dtype)
        tuned[k] = (w + d).to(dtype)
    return base, tuned
