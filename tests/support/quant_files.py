"""Writers of ComfyUI's quantized safetensors formats, for tests and benchmarks.

They quantize float weights as ComfyUI's own tools lay the files out (scaled fp8 with its
``scaled_fp8`` marker and ``scale_weight``; ``comfy_quant`` layers with ``weight_scale``), and
return what the dequantized weights must be, computed independently of the pack.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fp8_quantize(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: codes and the float32 scale (amax / fp8 max)."""
    scale = (w.abs().max().float() / FP8_MAX[dtype]).reshape(())
    return (w.float() / scale).to(dtype), scale


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max().float() / 127.0).reshape(())
    return torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8), scale


def oracle_scaled(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight: code value times scale, each product rounded once to float32."""
    out = codes.to(torch.float64) * (1.0 if scale is None else scale.to(torch.float64))
    return out.to(torch.float32)


def write_scaled_fp8(path: str, weights: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
                     dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """A ``*_fp8_scaled`` file (the format of ComfyUI's fp8_scaled releases); returns the
    float32 weights ComfyUI computes from it."""
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=dtype)}
    expect: dict[str, torch.Tensor] = {}
    for k, w in weights.items():
        layer = k.removesuffix(".weight")
        codes, scale = fp8_quantize(w, dtype)
        sd[k], sd[f"{layer}.scale_weight"] = codes, scale
        sd[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        expect[k] = oracle_scaled(codes, scale)
    for k, t in others.items():
        sd[k] = t
        expect[k] = t.float()
    save_file(sd, path)
    return expect


def write_comfy_quant(path: str, weights: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
                      fmt: str = "float8_e4m3fn", in_header: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI per-layer quantization: ``<layer>.comfy_quant`` JSON tensors (or the header's
    ``_quantization_metadata``) and ``<layer>.weight_scale``."""
    sd: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, str]] = {}
    expect: dict[str, torch.Tensor] = {}
    for k, w in weights.items():
        layer = k.removesuffix(".weight")
        if fmt == "int8_tensorwise":
            codes, scale = int8_quantize(w)
        else:
            codes, scale = fp8_quantize(w, getattr(torch, fmt))
        sd[k], sd[f"{layer}.weight_scale"] = codes, scale
        conf = {"format": fmt}
        layers[layer] = conf
        if not in_header:
            sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()),
                                                      dtype=torch.uint8)
        expect[k] = oracle_scaled(codes, scale)
    for k, t in others.items():
        sd[k] = t
        expect[k] = t.float()
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if in_header else None
    save_file(sd, path, metadata=meta)
    return expect


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """cuBLAS's block-scale layout (a (rows, cols) matrix padded to 128x4 tiles, each tile stored
    as 32 rows of 16: element (r, c) of a tile at [r % 32][(r // 32) * 4 + c])."""
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros(pr, pc, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    out = torch.zeros(pr * pc, dtype=scales.dtype)
    tiles_c = pc // 4
    for r in range(pr):
        for c in range(pc):
            tile = (r // 128) * tiles_c + c // 4
            rr = r % 128
            out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + c % 4] = padded[r, c]
    return out.reshape(pr, pc)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def nvfp4_example(rows: int, cols: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random NVFP4 storage (packed codes, blocked fp8 scales, tensor scale) and its float32
    value, computed element by element."""
    g = torch.Generator().manual_seed(seed)
    nibbles = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    block = (torch.rand(rows, cols // 16, generator=g) * 2 + 0.1).to(torch.float8_e4m3fn)
    tensor_scale = torch.tensor(0.0123, dtype=torch.float32)
    value = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            n = int(nibbles[r, c])
            v = (-1 if n & 8 else 1) * E2M1[n & 7]
            total = (tensor_scale * block[r, c // 16].float())  # float32 product, as ComfyUI
            value[r, c] = torch.tensor(v, dtype=torch.float32) * total
    return packed, to_blocked(block.view(torch.uint8)).view(torch.float8_e4m3fn), tensor_scale, value


def mxfp8_example(rows: int, cols: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, cols, generator=g) * 50).to(torch.float8_e4m3fn)
    exps = torch.randint(110, 135, (rows, cols // 32), generator=g, dtype=torch.uint8)
    value = codes.float().reshape(rows, -1, 32) * torch.pow(
        2.0, exps.to(torch.float64) - 127).to(torch.float32).unsqueeze(-1)
    return codes, to_blocked(exps), value.reshape(rows, cols)
