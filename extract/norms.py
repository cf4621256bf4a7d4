"""Frobenius norms and sums of squares accumulated in float64, on any device.

``torch.linalg.vector_norm`` on a large float32 CPU tensor accumulates in float32: on 28M
random entries its squared norm comes out 0.3% low. The rank rules take ``||dW||_F^2`` as the
total energy, so such an error moves ranks (adaptive_energy stopping at 0.8995 of the energy
for p = 0.9) and every relative error of the report. ``vector_norm(x, dtype=torch.float64)``
is exact but materialises a float64 copy of ``x`` (twice its float32 size): too much for the
largest layers on a GPU. So the squares are summed chunk by chunk, each chunk upcast to
float64, into a float64 accumulator that stays on ``x``'s device (one sync at the end); on the
CPU numpy's einsum does the same in small buffers, on one core (``_NUMPY_DTYPES``).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

# Elements per chunk. On the CPU a 512 KiB float64 chunk stays in cache and each step runs
# on one core: 3x faster than 8 MiB chunks and 10x faster than upcasting the whole tensor
# (measured on 28M entries, 2 busy cores). On a GPU fewer, larger chunks mean fewer launches;
# 32 MiB of float64 is small next to the layer itself.
CPU_CHUNK = 1 << 16
DEVICE_CHUNK = 1 << 22


# CPU dtypes numpy reads without a copy. Its einsum upcasts small buffers to float64 and sums
# on one core without holding the GIL: measured as fast as the chunked torch loop below on an
# idle machine, and 5x or more faster on a busy one, where each of the loop's two-thread
# chunk copies and dot products waits for a core (the loop took 1.1 s of an 11 s extraction).
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


# Above this many elements the numpy sum is split over torch's threads: one core sums ~1
# Gelem/s (37 ms for a 12288x3072 layer, taken twice per layer: the difference and the
# residual), two halve it. Below it a thread hand-off costs more than it saves.
PARALLEL_MIN = 1 << 22


def _einsum_sq(a: np.ndarray) -> float:
    return float(np.einsum("i,i->", a, a, dtype=np.float64))


def _numpy_sum_of_squares(a: np.ndarray) -> float:
    """``sum(a_i^2)`` in float64, in as many parts as torch has threads (fixed split: the
    same input always gives the same sum)."""
    parts = max(1, min(torch.get_num_threads(), a.size // (PARALLEL_MIN // 2)))
    if a.size < PARALLEL_MIN or parts < 2:
        return _einsum_sq(a)
    bounds = [a.size * i // parts for i in range(parts + 1)]
    pieces = [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    sums: list[float | BaseException] = [0.0] * parts

    def add(i: int) -> None:
        try:
            sums[i] = _einsum_sq(pieces[i])
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            sums[i] = e

    # Short-lived helpers, joined before returning: no thread outlives the call (a run leaves
    # no thread behind), and starting one costs ~0.1 ms next to the 10-20 ms it saves.
    helpers = [threading.Thread(target=add, args=(i,), name=f"lora-extract-norm-{i}", daemon=True)
               for i in range(1, parts)]
    for t in helpers:
        t.start()
    add(0)                                      # this thread sums the first part
    for t in helpers:
        t.join()
    for part in sums:
        if isinstance(part, BaseException):
            raise part
    return math.fsum(float(p) for p in sums)  # type: ignore[arg-type]


def chunk_sum_of_squares(x: torch.Tensor, wide: torch.Tensor) -> float:
    """``sum(x_i^2)`` in float64 of a cache-sized CPU chunk, through ``wide``: a reused
    contiguous float64 CPU buffer of at least ``x.numel()`` elements (one per thread).

    An upcast into the buffer and a float64 dot product: 0.29 ns per element on one core,
    against 0.73 for numpy's float64 ``einsum`` over float32, which casts as it goes (measured
    on 2^18-element chunks; the reader forms every layer's difference and energy this way).
    Runs on the calling thread's torch threads, which a reader beside CPU compute holds at one
    (``op_threads``).
    """
    flat = x.detach().reshape(-1)
    w = wide[: flat.numel()]
    w.copy_(flat)
    return float(torch.dot(w, w))


def sum_of_squares_tensor(x: torch.Tensor) -> torch.Tensor:
    """``sum(x_i^2)`` as a 0-dim float64 tensor on ``x``'s device (no host sync)."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES and not flat.is_conj():
        return torch.tensor(_numpy_sum_of_squares(flat.numpy()), dtype=torch.float64)
    chunk = CPU_CHUNK if flat.device.type == "cpu" else DEVICE_CHUNK
    # One reused float64 buffer per call (not per module: the prefetch thread and the main
    # thread take norms at the same time).
    buf = torch.empty(min(n, chunk), dtype=torch.float64, device=flat.device)
    acc = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, n, chunk):
        part = buf[: min(chunk, n - start)]
        part.copy_(flat[start:start + chunk])
        acc += torch.dot(part, part)
    return acc


def sum_of_squares(x: torch.Tensor) -> float:
    """``sum(x_i^2)`` accumulated in float64, as a Python float."""
    return float(sum_of_squares_tensor(x))


def frobenius_norm_tensor(x: torch.Tensor) -> torch.Tensor:
    """``||x||_F`` as a 0-dim float64 tensor on ``x``'s device (no host sync)."""
    return sum_of_squares_tensor(x).sqrt()


def frobenius_norm(x: torch.Tensor) -> float:
    """``||x||_F`` accumulated in float64, as a Python float (NaN/Inf propagate)."""
    return math.sqrt(sum_of_squares(x)) if x.numel() else 0.0


# Columns per float64 chunk of a Gram product: at most this many float64 elements (32 MiB).
GRAM_CHUNK_ELEMENTS = 1 << 22


def gram_float64(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` for ``a`` ``[m, n]`` (m the side to keep), accumulated in float64.

    A float32 product sums n products per entry in float32; the singular values taken from it
    (nuclear norm, spectral norm) inherit that error squared-root-amplified at the small end.
    The columns are upcast a chunk at a time, so no float64 copy of ``a`` exists at once.
    """
    m, n = a.shape
    cols = max(1, GRAM_CHUNK_ELEMENTS // max(m, 1))
    g = torch.zeros(m, m, dtype=torch.float64, device=a.device)
    for start in range(0, n, cols):
        c = a[:, start:start + cols].detach().to(torch.float64)
        g.addmm_(c, c.mT)
    return g
