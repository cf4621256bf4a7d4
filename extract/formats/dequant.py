"""Dequantization of ComfyUI's quantized weight formats, and their rounding-noise estimates.

Each ``dequantize_*`` computes the float weight exactly as ComfyUI does when it loads the file
(``comfy/ops.py`` of 0.3.64 for scaled fp8; the newest ``comfy/ops.py`` with ``comfy_kitchen``'s
eager dequantizers for ``comfy_quant`` layers), but in float32: ComfyUI computes the same
products in its compute dtype, so with a float32 compute dtype the results are bit for bit the
same, and with bf16/fp16 ComfyUI's weights are these rounded to that dtype.

Each ``noise_sq_*`` estimates the squared Frobenius norm of (dequantized - original float
weight): round-to-nearest leaves an error spread evenly over one step, whose variance is
``step**2 / 12``; the step of every element is known from its code and its scales. Sums are
accumulated in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Values of the 16 FP4 (E2M1) codes; the sign is the high bit of the nibble.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Distance to the next code away from zero, per E2M1 magnitude (6.0: as the step below it).
_E2M1_STEPS = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0)
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32

_FP8_BITS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, min exp
_step_tables: dict[torch.dtype, torch.Tensor] = {}
_value_tables: dict[torch.dtype, np.ndarray] = {}


def fp8_to_float32(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of fp8 codes, equal to ``codes.to(torch.float32)`` bit for bit.

    On the CPU torch converts fp8 element by element (about 3 ns each, measured on one core):
    for a 3072x3072 layer that is slower than the rest of reading it. A 256-entry table of
    the code values (exact in float32, NaN codes included) looked up with ``np.take`` runs
    about 2.5 times faster. Other devices convert natively.
    """
    if codes.device.type != "cpu" or codes.dtype not in _FP8_BITS:
        return codes.to(torch.float32)
    table = _value_tables.get(codes.dtype)
    if table is None:
        table = _value_tables[codes.dtype] = (
            torch.arange(256, dtype=torch.uint8).view(codes.dtype).to(torch.float32).numpy())
    # numpy allocates the result (its large arrays get transparent huge pages: fewer page
    # faults than a fresh torch buffer, measured 19 ms against 34 ms for 3072x3072).
    return torch.from_numpy(np.take(table, codes.contiguous().view(torch.uint8).numpy(),
                                    mode="clip"))


def fp8_step_table(dtype: torch.dtype) -> torch.Tensor:
    """float64[256]: the squared rounding step of each fp8 code byte (0 for NaN/Inf codes).

    The step of a code is the spacing of representable values at its magnitude:
    ``2**(exponent - mantissa_bits)``, with the exponent clamped at the smallest normal one
    (subnormals share that spacing).
    """
    table = _step_tables.get(dtype)
    if table is None:
        mbits, emin = _FP8_BITS[dtype]
        values = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float64)
        steps = torch.zeros(256, dtype=torch.float64)
        for i, v in enumerate(values.tolist()):
            if math.isfinite(v):
                e = emin if v == 0.0 else max(math.frexp(abs(v))[1] - 1, emin)
                steps[i] = 2.0 ** (e - mbits)
        table = _step_tables[dtype] = steps * steps
        table.requires_grad_(False)
    return table


def code_histogram(codes: torch.Tensor) -> torch.Tensor:
    """How often each byte value occurs in ``codes`` (any 1-byte dtype), as float64[256]."""
    flat = codes.reshape(-1).view(torch.uint8)
    return torch.bincount(flat, minlength=256).to(device="cpu", dtype=torch.float64)


def dequantize_scaled(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``codes * scale`` in float32 (fp8 ``weight_scale`` / ``scale_weight``, int8 tensorwise).

    ComfyUI: ``x.to(dtype) * scale.to(dtype)`` (fp8) and ``q.float() * scale`` (int8).
    """
    out = fp8_to_float32(codes)
    if scale is not None:
        out.mul_(scale.to(device=out.device, dtype=torch.float32))
    return out


def noise_sq_fp8(codes: torch.Tensor, scale: torch.Tensor | None) -> float:
    """Rounding noise energy of an fp8 tensor with one scale (or none)."""
    hist = code_histogram(codes)
    s = 1.0 if scale is None else float(scale.double().reshape(-1)[0]) if scale.numel() == 1 \
        else None
    if s is None:  # a per-row scale: group the histogram by row
        rows = codes.reshape(codes.shape[0], -1).view(torch.uint8)
        table = fp8_step_table(codes.dtype).to(rows.device)
        per_row = table[rows.long()].sum(dim=1, dtype=torch.float64)
        sc = scale.to(device=rows.device, dtype=torch.float64).reshape(-1)
        return float((per_row * sc * sc).sum()) / 12.0
    return float((hist * fp8_step_table(codes.dtype)).sum()) * s * s / 12.0


def noise_sq_int8(codes: torch.Tensor, scale: torch.Tensor) -> float:
    """Rounding noise energy of an int8 tensor: every element's step is its scale."""
    sc = scale.to(dtype=torch.float64, device="cpu").reshape(-1)
    if sc.numel() == 1:
        return codes.numel() * float(sc[0]) ** 2 / 12.0
    per_scale = codes.numel() / sc.numel()  # a scale per row (broadcast over the rest)
    return float((sc * sc).sum()) * per_scale / 12.0


def unswizzle_block_scales(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS's tiled layout back to a ``(rows, cols)`` matrix.

    The layout pads the scale matrix to ``(128*a, 4*b)`` and stores each 128x4 tile as 512
    consecutive values; scale ``(r, c)`` of a tile sits at ``(r % 32) * 16 + (r // 32) * 4 + c``
    within it, tiles in row-major order.
    """
    col_tiles = -(-cols // 4)
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    tile = (r // 128) * col_tiles + c // 4
    within = (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return blocked.reshape(-1)[(tile * 512 + within).to(blocked.device)]


def _e2m1_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    steps = torch.tensor(_E2M1_STEPS * 2, dtype=torch.float64, device=device)
    return values, steps


def _nvfp4_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The FP4 codes of a packed uint8 tensor, high nibble first (ComfyUI's ``hi_first``)."""
    p = packed.view(torch.uint8)
    return torch.stack([p >> 4, p & 0x0F], dim=-1).reshape(p.shape[0], -1)


def _nvfp4_block_scale(tensor_scale: torch.Tensor, block_scale: torch.Tensor, rows: int,
                       cols: int) -> torch.Tensor:
    """float32 ``(rows, cols // 16)``: ComfyUI's ``per_tensor_scale * block_scale``."""
    bs = unswizzle_block_scales(block_scale.view(torch.float8_e4m3fn), rows, cols // NVFP4_BLOCK)
    return tensor_scale.to(device=bs.device, dtype=torch.float32) * bs.to(torch.float32)


def dequantize_nvfp4(packed: torch.Tensor, tensor_scale: torch.Tensor,
                     block_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4: two E2M1 codes per byte, an fp8 scale per 16 values, one float32 tensor scale."""
    codes = _nvfp4_nibbles(packed)
    rows, cols = codes.shape
    values, _ = _e2m1_tables(codes.device)
    out = values[codes.long()].reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    out.mul_(_nvfp4_block_scale(tensor_scale, block_scale, rows, cols).unsqueeze(-1))
    return out.reshape(rows, cols)


def noise_sq_nvfp4(packed: torch.Tensor, tensor_scale: torch.Tensor,
                   block_scale: torch.Tensor) -> float:
    codes = _nvfp4_nibbles(packed)
    rows, cols = codes.shape
    _, steps = _e2m1_tables(codes.device)
    step_sq = (steps[codes.long()] ** 2).reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK).sum(-1)
    scale = _nvfp4_block_scale(tensor_scale, block_scale, rows, cols).double()
    return float((step_sq * scale * scale).sum()) / 12.0


def e8m0_to_float(raw: torch.Tensor) -> torch.Tensor:
    """E8M0 scale bytes as float32 powers of two (byte 0: 0, as ComfyUI decodes it)."""
    b = raw.view(torch.uint8).to(torch.int32)
    out = (b << 23).view(torch.float32)
    return torch.where(b == 0, torch.zeros_like(out), out)


def _mxfp8_scales(codes: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    raw = unswizzle_block_scales(block_scale.view(torch.uint8), rows, cols // MXFP8_BLOCK)
    return e8m0_to_float(raw.contiguous())


def dequantize_mxfp8(codes: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """MXFP8: fp8 codes with a power-of-two (E8M0) scale per 32 values of a row."""
    rows, cols = codes.shape
    out = fp8_to_float32(codes).reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    out.mul_(_mxfp8_scales(codes, block_scale).unsqueeze(-1))
    return out.reshape(rows, cols)


def noise_sq_mxfp8(codes: torch.Tensor, block_scale: torch.Tensor) -> float:
    rows, cols = codes.shape
    table = fp8_step_table(codes.dtype).to(codes.device)
    step_sq = table[codes.view(torch.uint8).long()].reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    scale = _mxfp8_scales(codes, block_scale).double()
    return float((step_sq.sum(-1) * scale * scale).sum()) / 12.0
