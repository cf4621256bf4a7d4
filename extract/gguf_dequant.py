"""GGUF block dequantization in torch, and the rounding step of each stored element.

The ``gguf`` package's numpy dequantizers are the reference (they follow ggml's C code); the
torch versions here repeat their arithmetic in float32 (same products, same order, no fused
multiply-add), so the results are bit for bit the same (tested). Types without a torch
version here fall back to ``gguf.quants.dequantize``.

Each kernel writes a run of blocks straight into a slice of the float32 output: the codes are
read where they lie (a view of the mapped file on the CPU: no copy of the stored bytes), the
only temporaries are per-chunk. On the CPU, :func:`dequantize_into` feeds the kernels
``GRAIN`` elements at a time. That is torch's parallel grain size, so every op runs on the
calling thread: the reader thread then never starts an OpenMP team of its own beside the SVD
running in the main thread. On a loaded 2-core machine that was the whole cost: one
1024 x 1024 Q8_0 weight took 24-100 ms as whole-tensor ops on 2 threads and 0.45 ms in chunks
(0.22 ms whole on one idle thread), and each chunk's temporaries stay in the cache. The price
is per-op overhead: on one idle thread the chunked kernels of the nibble-packed types take 2-5
ms per million elements against 1-3.5 ms as whole-tensor ops (docs/gguf.md, "Cost"). The
factors (scales, offsets) are decoded for spans of ``GRAIN // 16`` blocks, the codes per chunk.

Every block format stores ``value = step * code + offset`` per block or sub-block. The step
(the distance between two neighbouring representable values) bounds the rounding error of the
stored weight: rounding to nearest leaves an error uniform in ``[-step/2, step/2]`` on
ordinary weights, of variance ``step**2 / 12``. :func:`rounding_steps` gives that step per
element; the noise floor of a whole tensor is ``sqrt(sum(step**2) / 12)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

QK_K = 256      # super-block size of the K-quants
GRAIN = 32768   # torch's internal grain size (at::internal::GRAIN_SIZE): smaller ops run serially


class Kernel(NamedTuple):
    """How one type is dequantized, in two steps so that each op stays below ``GRAIN``:

    ``factors(blocks)``: the per-block (or per-sub-block) scales and offsets, small tensors
    whose first dimension is the block; at most 16 values per block, so it runs on up to
    ``GRAIN // 16`` blocks at a time. ``values(blocks, factors, out)``: the codes of those
    blocks times their factors, written into ``out`` (blocks, elements_per_block) float32.
    ``blocks`` is (n, bytes_per_block) uint8 with any row stride, never written.
    """

    factors: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    values: Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor], None]


@lru_cache(maxsize=64)
def _shifts(values: tuple[int, ...], shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A small uint8 tensor of shift counts, shaped for broadcasting (made once per device)."""
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _split_bits(b: torch.Tensor, values: tuple[int, ...], shape: tuple[int, ...],
                mask: int) -> torch.Tensor:
    """``(b >> s) & mask`` for every shift ``s`` in ``values``, broadcast along ``shape``
    (one broadcast op: measured 3-5x faster than one op per shift)."""
    return (b >> _shifts(values, shape, str(b.device))) & mask


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Two bytes per row, read as a little-endian float16, as float32 (one column)."""
    if col.stride(-1) != 1 or col.stride(0) % 2 or col.storage_offset() % 2:
        col = col.contiguous()
    return col.view(torch.float16).to(torch.float32)


def _legacy_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: low nibbles of the bytes first, then their high nibbles."""
    n = qs.shape[0]
    return _split_bits(qs.reshape(n, 1, 16), (0, 4), (1, 2, 1), 0x0F).reshape(n, 32)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """A 32-bit little-endian mask per block (4 bytes) as 32 bits (0/1) in element order."""
    n = qh.shape[0]
    return _split_bits(qh.reshape(n, 4, 1), tuple(range(8)), (1, 1, 8), 1).reshape(n, 32)


def _d(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (_f16(blocks[:, :2]),)


def _d_m(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _q8_0(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(f[0])


def _q4_0(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(_legacy_nibbles(blocks[:, 2:]))
    out.sub_(8.0)                      # exact: small integers
    out.mul_(f[0])


def _q4_1(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(_legacy_nibbles(blocks[:, 4:]))
    out.mul_(f[0])
    out.add_(f[1])                     # two roundings, as numpy does: no fused multiply-add


def _q5_0(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(_legacy_nibbles(blocks[:, 6:]) | (_high_bits_32(blocks[:, 2:6]) << 4))
    out.sub_(16.0)
    out.mul_(f[0])


def _q5_1(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(_legacy_nibbles(blocks[:, 8:]) | (_high_bits_32(blocks[:, 4:8]) << 4))
    out.mul_(f[0])
    out.add_(f[1])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (12 packed bytes)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q45_k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K: per 32-element sub-block ``d * scale`` and ``dmin * min``, shaped (n, 8, 1)."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (_f16(blocks[:, :2]) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_f16(blocks[:, 2:4]) * mn.to(torch.float32)).reshape(n, 8, 1)
    return dl, ml


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 128 bytes -> (n, 8, 32) codes; sub-blocks 2k and 2k+1 are the low and high
    nibbles of bytes 32k..32k+31."""
    n = qs.shape[0]
    return _split_bits(qs.reshape(n, 4, 1, 32), (0, 4), (1, 1, 2, 1), 0x0F).reshape(n, 8, 32)


def _q4_k(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    o = out.view(blocks.shape[0], 8, 32)
    o.copy_(_k_nibbles(blocks[:, 16:]))
    o.mul_(f[0])
    o.sub_(f[1])


def _q5_k(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    n = blocks.shape[0]
    # Bit i of high byte l is the fifth bit of element l of sub-block i.
    qh = _split_bits(blocks[:, 16:48].reshape(n, 1, 32), tuple(range(8)), (1, 8, 1), 1)
    o = out.view(n, 8, 32)
    o.copy_(_k_nibbles(blocks[:, 48:]) | (qh << 4))
    o.mul_(f[0])
    o.sub_(f[1])


def _q6_k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    return ((_f16(blocks[:, 208:210]) * scales).reshape(-1, 16, 1),)


def _q6_k(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    n = blocks.shape[0]
    ql = _split_bits(blocks[:, :128].reshape(n, 2, 1, 64), (0, 4), (1, 1, 2, 1), 0x0F)
    qh = _split_bits(blocks[:, 128:192].reshape(n, 2, 1, 32), (0, 2, 4, 6), (1, 1, 4, 1), 0x03)
    o = out.view(n, 16, 16)
    o.copy_((ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).reshape(n, 16, 16))
    o.sub_(32.0)
    o.mul_(f[0])


def _q2_k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scales = blocks[:, :16]
    dl = (_f16(blocks[:, 80:82]) * (scales & 0x0F).to(torch.float32)).reshape(-1, 16, 1)
    ml = (_f16(blocks[:, 82:84]) * (scales >> 4).to(torch.float32)).reshape(-1, 16, 1)
    return dl, ml


def _q2_k(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    n = blocks.shape[0]
    q = _split_bits(blocks[:, 16:80].reshape(n, 2, 1, 32), (0, 2, 4, 6), (1, 1, 4, 1), 0x03)
    o = out.view(n, 16, 16)
    o.copy_(q.reshape(n, 16, 16))
    o.mul_(f[0])
    o.sub_(f[1])


def _q3_k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = _split_bits(packed[:, :8].reshape(n, 1, 8), (0, 4), (1, 2, 1), 0x0F).reshape(n, 16)
    high = _split_bits(packed[:, 8:].reshape(n, 1, 4), (0, 2, 4, 6), (1, 4, 1), 0x03).reshape(n, 16)
    sc = (low | (high << 4)).view(torch.int8) - 32
    return ((_f16(blocks[:, 108:110]) * sc.to(torch.float32)).reshape(n, 16, 1),)


def _q3_k(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    n = blocks.shape[0]
    ql = _split_bits(blocks[:, 32:96].reshape(n, 2, 1, 32), (0, 2, 4, 6), (1, 1, 4, 1), 0x03)
    # A set hmask bit means offset 0, a clear one offset -4.
    qh = _split_bits(blocks[:, :32].reshape(n, 1, 1, 32), tuple(range(8)), (1, 1, 8, 1), 1) ^ 1
    o = out.view(n, 16, 16)
    o.copy_(ql.reshape(n, 16, 16).view(torch.int8) - (qh.reshape(n, 16, 16) << 2).view(torch.int8))
    o.mul_(f[0])


def _no_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ()


def _as(dtype: torch.dtype) -> Kernel:
    def copy(blocks: torch.Tensor, f: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.copy_(blocks.view(dtype))
    return Kernel(_no_factors, copy)


# ggml type name -> kernel; the float types are plain conversions (one element per "block").
FLOAT_KERNELS: dict[str, Kernel] = {
    "F32": _as(torch.float32), "F16": _as(torch.float16), "BF16": _as(torch.bfloat16),
    "F64": _as(torch.float64),
}
BLOCK_KERNELS: dict[str, Kernel] = {
    "Q8_0": Kernel(_d, _q8_0), "Q4_0": Kernel(_d, _q4_0), "Q4_1": Kernel(_d_m, _q4_1),
    "Q5_0": Kernel(_d, _q5_0), "Q5_1": Kernel(_d_m, _q5_1),
    "Q2_K": Kernel(_q2_k_factors, _q2_k), "Q3_K": Kernel(_q3_k_factors, _q3_k),
    "Q4_K": Kernel(_q45_k_factors, _q4_k), "Q5_K": Kernel(_q45_k_factors, _q5_k),
    "Q6_K": Kernel(_q6_k_factors, _q6_k),
}
KERNELS: dict[str, Kernel] = {**FLOAT_KERNELS, **BLOCK_KERNELS}


# Elements per block of each type (the float types: one element per "block").
BLOCK_ELEMENTS: dict[str, int] = {
    **dict.fromkeys(FLOAT_KERNELS, 1),
    **dict.fromkeys(("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"), 32),
    **dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"), QK_K),
}


def _whole(type_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(blocks: torch.Tensor) -> torch.Tensor:
        out = torch.empty(blocks.shape[0], BLOCK_ELEMENTS[type_name], dtype=torch.float32,
                          device=blocks.device)
        return dequantize_into(blocks, type_name, out.view(-1)).view(blocks.shape[0], -1)
    return run


# ggml type name -> torch dequantizer of (n_blocks, bytes_per_block) uint8 blocks, returning
# (n_blocks, elements_per_block) float32: the block types and BF16.
TORCH_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: _whole(name) for name in (*BLOCK_KERNELS, "BF16")
}


def dequantize_into(blocks: torch.Tensor, type_name: str, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``blocks`` (n, bytes_per_block) uint8 into ``out`` (n * elements_per_block
    float32, contiguous), ``GRAIN`` elements at a time on the CPU, whole on an accelerator.

    ``blocks`` may be a read-only view of a mapped file: it is never written. Returns ``out``.
    """
    kernel = KERNELS[type_name]
    n = blocks.shape[0]
    rows = out.view(n, -1)
    if blocks.device.type != "cpu":
        kernel.values(blocks, kernel.factors(blocks), rows)
        return out
    inner = max(1, GRAIN // rows.shape[1])
    outer = max(inner, GRAIN // 16)  # factors: at most 16 values per block
    for lo in range(0, n, outer):
        hi = min(n, lo + outer)
        factors = kernel.factors(blocks[lo:hi])
        for a in range(lo, hi, inner):
            b = min(hi, a + inner)
            kernel.values(blocks[a:b], tuple(f[a - lo:b - lo] for f in factors), rows[a:b])
    return out


def dequantize_bytes(raw: np.ndarray | torch.Tensor, type_name: str, block_size: int,
                     type_size: int) -> torch.Tensor:
    """Stored bytes of one GGUF tensor as a flat float32 tensor (element order of the file),
    on the device of ``raw`` (a numpy array: the CPU)."""
    if isinstance(raw, np.ndarray):
        # A copy when the array is read-only (a file mapping): torch tensors must be writable.
        arr = np.ascontiguousarray(raw) if raw.flags.writeable else np.array(raw, copy=True)
        data = torch.from_numpy(arr.view(np.uint8))
    else:
        data = raw.contiguous().view(torch.uint8)
    blocks = data.reshape(-1, type_size)
    if type_name in KERNELS:
        out = torch.empty(blocks.shape[0] * block_size, dtype=torch.float32, device=data.device)
        return dequantize_into(blocks, type_name, out)
    import gguf  # the reference, for the rarer types

    arr = np.ascontiguousarray(blocks.cpu().numpy())
    out = gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1).to(data.device)


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
    fn = TORCH_DEQUANTIZERS[type_name]
    # float64 subtraction: the step of a sub-block whose offset dwarfs it is not lost.
    return (fn(high).to(torch.float64) - fn(low).to(torch.float64)).abs().reshape(-1)


def noise_norm(steps: torch.Tensor) -> float:
    """Frobenius norm of uniform rounding error with the given steps: sqrt(sum step^2 / 12)."""
    s = steps.to(torch.float64)
    return float(torch.sqrt((s * s).sum() / 12.0))
