"""GGUF block dequantization in torch, and the rounding step of each stored element.

The ``gguf`` package's numpy dequantizers are the reference (they follow ggml's C code); the
torch versions here repeat their arithmetic operation for operation in float32, so the results
are bit for bit the same (tested), and run several times faster on many cores. Types without a
torch version here fall back to ``gguf.quants.dequantize``.

Every block format stores ``value = step * code + offset`` per block or sub-block. The step
(the distance between two neighbouring representable values) bounds the rounding error of the
stored weight: rounding to nearest leaves an error uniform in ``[-step/2, step/2]`` on
ordinary weights, of variance ``step**2 / 12``. :func:`rounding_steps` gives that step per
element; the noise floor of a whole tensor is ``sqrt(sum(step**2) / 12)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

QK_K = 256  # super-block size of the K-quants


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Two bytes per row, read as a little-endian float16, as float32 (one column)."""
    return col.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, n_blocks: int, half: int) -> torch.Tensor:
    """Low nibbles of ``half`` bytes first, then their high nibbles (ggml's legacy order)."""
    q = qs.reshape(n_blocks, -1, 1, half)
    q = torch.cat((q & 0x0F, q >> 4), dim=2)
    return q.reshape(n_blocks, -1)


def _high_bits_32(qh: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """A 32-bit little-endian mask per block, as 32 bits (0/1) in element order."""
    b = qh.to(torch.int64)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    return ((word.reshape(n_blocks, 1) >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.uint8)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    q = (_nibbles(blocks[:, 2:], n, 16).to(torch.int8) - 8).to(torch.float32)
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], n, 16).to(torch.float32)
    return (d * q) + m  # two roundings, as numpy does: no fused multiply-add


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 6:], n, 16) | (_high_bits_32(blocks[:, 2:6], n) << 4)
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:], n, 16) | (_high_bits_32(blocks[:, 4:8], n) << 4)
    return (d * q.to(torch.float32)) + m


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (12 packed bytes)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    qs = blocks[:, 16:].reshape(n, -1, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, -1, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    qh = blocks[:, 16:48].reshape(n, 1, 32)
    qh = torch.stack([(qh >> i) & 1 for i in range(8)], dim=1).reshape(n, 8, 32)
    qs = blocks[:, 48:].reshape(n, -1, 1, 32)
    ql = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(blocks[:, 208:210])
    dl = (d * scales).reshape(n, QK_K // 16, 1)
    ql = ql.reshape(n, -1, 1, 64)
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32)
    qh = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


# ggml type name -> torch dequantizer of (n_blocks, bytes_per_block) uint8 blocks.
TORCH_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize_bytes(raw: np.ndarray | torch.Tensor, type_name: str, block_size: int,
                     type_size: int) -> torch.Tensor:
    """Stored bytes of one GGUF tensor as a flat float32 tensor (element order of the file)."""
    if type_name in ("F32", "F16", "F64"):
        arr = torch.as_tensor(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
        return arr.reshape(-1).to(torch.float32)
    if type_name in TORCH_DEQUANTIZERS:
        data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)) \
            if isinstance(raw, np.ndarray) else raw.contiguous().view(torch.uint8)
        blocks = data.reshape(-1, type_size)
        return TORCH_DEQUANTIZERS[type_name](blocks).reshape(-1)
    import gguf  # the reference, for the rarer types

    arr = np.ascontiguousarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw).view(np.uint8)
    out = gguf.quants.dequantize(arr.reshape(-1, type_size), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1)


# Legacy types: the step is the block's float16 scale ``d`` (its first two bytes).
_LEGACY_STEP = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}

# K-quants: byte ranges holding the codes, and two fillings that give codes c and c + 1 in every
# element. Dequantizing both and subtracting gives each element's step (scale and min decoding
# included, without repeating the packing here).
_K_CODE_FILLS: dict[str, tuple[tuple[tuple[int, int, int, int], ...], ...]] = {
    # (begin, end, byte for code c, byte for code c + 1), per code region
    "Q2_K": ((16, 80, 0x00, 0x55),),
    "Q3_K": ((0, 32, 0xFF, 0xFF), (32, 96, 0x00, 0x55)),  # hmask set: offset 0
    "Q4_K": ((16, 144, 0x00, 0x11),),
    "Q5_K": ((16, 48, 0x00, 0x00), (48, 176, 0x00, 0x11)),
    "Q6_K": ((0, 128, 0x00, 0x11), (128, 192, 0xAA, 0xAA)),  # codes 32 and 33: q = 0 and 1
}

NOISE_TYPES = frozenset(_LEGACY_STEP | set(_K_CODE_FILLS))


def rounding_steps(raw: np.ndarray, type_name: str, block_size: int,
                   type_size: int) -> torch.Tensor | None:
    """Per element of a block-quantized tensor, the distance between neighbouring codes.

    ``None`` for float types (F32/F16/BF16) and for block types whose layout is not tabled here.
    """
    if type_name not in NOISE_TYPES:
        return None
    blocks = torch.from_numpy(np.array(raw, copy=True).view(np.uint8)).reshape(-1, type_size)
    if type_name in _LEGACY_STEP:
        d = _f16(blocks[:, :2]).abs()
        return d.expand(-1, block_size).reshape(-1)
    low, high = blocks.clone(), blocks.clone()
    for begin, end, fill_low, fill_high in _K_CODE_FILLS[type_name]:
        low[:, begin:end] = fill_low
        high[:, begin:end] = fill_high
    fn = TORCH_DEQUANTIZERS.get(type_name)
    if fn is None:
        import gguf

        qtype = gguf.GGMLQuantizationType[type_name]

        def fn(b: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(gguf.quants.dequantize(b.numpy(), qtype).astype(np.float32))
    # float64 subtraction: the step of a sub-block whose offset dwarfs it is not lost.
    return (fn(high).to(torch.float64) - fn(low).to(torch.float64)).abs().reshape(-1)


def noise_norm(steps: torch.Tensor) -> float:
    """Frobenius norm of uniform rounding error with the given steps: sqrt(sum step^2 / 12)."""
    s = steps.to(torch.float64)
    return float(torch.sqrt((s * s).sum() / 12.0))
