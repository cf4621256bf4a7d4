"""Generated base/fine-tuned checkpoint pairs with realistic shapes, written layer by layer.

Shapes follow SDXL (attention/FF linears, 3x3 convs) and DiT models (Flux/SD3-like fused qkv
9216x3072, MLP 12288x3072 / 3072x12288, 10240x1280 FF). Deltas have a slowly decaying
structured spectrum plus dense noise: no clean low-rank cut, like real fine-tunes.
Files are cached under benchmarks/out/ by spec, so repeated runs skip generation.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from lora_extract.extract.synthetic import LayerSpec, decaying_delta
from lora_extract.extract.writer import save_safetensors_atomic

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# (shape, count, family)
SDXL_DIT_MIX: list[tuple[tuple[int, ...], int, str]] = [
    ((10240, 1280), 4, "ff"),            # SDXL FF up-projection (geglu)
    ((1280, 5120), 2, "ff_out"),
    ((1280, 1280), 10, "attn"),
    ((1280, 1280, 3, 3), 3, "conv"),
    ((640, 640, 3, 3), 2, "conv"),
    ((1280, 2048), 2, "attn2"),          # cross-attention k/v from the text encoder
    ((9216, 3072), 4, "qkv"),            # DiT fused qkv
    ((3072, 3072), 3, "proj"),
    ((12288, 3072), 1, "mlp"),
    ((3072, 12288), 1, "mlp_out"),
]

# A pair dominated by large DiT layers (Flux / SD3 / Wan): fused qkv, attention projections,
# 4x MLPs both ways, and 1280-channel 3x3 convs (1280x11520 flattened) and Wan-like FFNs.
# 439M parameters, 0.88 GB per model in bf16; the full-SVD baseline runs one layer per shape.
DIT_MIX: list[tuple[tuple[int, ...], int, str]] = [
    ((9216, 3072), 4, "qkv"),
    ((3072, 3072), 6, "proj"),
    ((12288, 3072), 3, "mlp"),
    ((3072, 12288), 3, "mlp_out"),
    ((1280, 1280, 3, 3), 2, "conv"),
    ((5120, 1280), 2, "ffn"),
]
MIXES = {"mix": SDXL_DIT_MIX, "dit": DIT_MIX}


def specs(mix: list[tuple[tuple[int, ...], int, str]], scale: float = 1.0) -> list[LayerSpec]:
    """Layer specs for ``mix``; ``scale`` multiplies the counts (rounded, at least 1)."""
    out: list[LayerSpec] = []
    for shape, count, family in mix:
        for i in range(max(1, round(count * scale))):
            out.append(LayerSpec(f"diffusion_model.{family}.{i}.{'x'.join(map(str, shape))}.weight", shape, 128))
            out.append(LayerSpec(f"diffusion_model.{family}.{i}.{'x'.join(map(str, shape))}.bias", (shape[0],), 1))
    return out


def params(layers: list[LayerSpec]) -> int:
    n = 0
    for s in layers:
        k = 1
        for d in s.shape:
            k *= d
        n += k
    return n


def varied_spectrum(key: str) -> tuple[float, float]:
    """(decay, noise) of one layer of a "varied" pair: fine-tunes change some layers much more
    and with more structure than others. Spread deterministically by key: decay 0.90..0.995,
    noise 0.05..0.6."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return 0.90 + 0.095 * ((h & 0xFFFF) / 0xFFFF), 0.05 + 0.55 * ((h >> 16) / 0xFFFF)


def write_pair(layers: list[LayerSpec], dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               decay: float = 0.985, noise: float = 0.3, varied: bool = False) -> tuple[str, str]:
    """Write (or reuse) base/tuned files for ``layers``; returns their paths.

    ``varied``: each layer's decay and noise from ``varied_spectrum`` instead of the same for all.
    """
    extra = ["varied"] if varied else []
    tag = hashlib.sha1(json.dumps([[s.key, s.shape, s.rank] for s in layers] + [str(dtype), seed, decay, noise]
                                  + extra).encode()).hexdigest()[:12]
    folder = os.path.join(OUT, f"pair-{tag}")
    bp, tp = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    if os.path.exists(bp) and os.path.exists(tp):
        return bp, tp
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    for s in layers:
        fan_in = 1
        for d in s.shape[1:]:
            fan_in *= d
        w = torch.randn(s.shape, generator=g) / max(1.0, fan_in) ** 0.5
        if len(s.shape) >= 2:
            dk, nk = varied_spectrum(s.key) if varied else (decay, noise)
            d = decaying_delta(s.shape, s.rank, decay=dk, scale=0.01, noise=nk, generator=g)
        else:
            d = torch.randn(s.shape, generator=g) * 1e-3
        base[s.key] = w.to(dtype)
        tuned[s.key] = (w + d).to(dtype)
    save_safetensors_atomic(base, bp, overwrite=True)
    save_safetensors_atomic(tuned, tp, overwrite=True)
    return bp, tp
