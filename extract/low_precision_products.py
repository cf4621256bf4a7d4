"""The power iterations' products with a low-precision (bfloat16) copy of a layer.

Both return float32 (the bases stay float32) and pick the operand order the CPU kernel runs
fastest for the copy's stored layout.
"""

from __future__ import annotations

import torch


def stored_transposed(low: torch.Tensor) -> bool:
    """Whether ``low`` is the transpose view of a row-major matrix (a wide layer iterated as
    its transpose)."""
    return not low.is_contiguous() and low.mT.is_contiguous()


# Products with a bfloat16 matrix read it as stored (row-major, not through a transpose view)
# and, where they need its transpose, as the right operand: ``S^T x = (x^T S)^T``. The CPU
# kernel runs 1.1-1.45x faster that way than through a transposed operand (measured at 48
# columns on 1280x11520, 1280x5120, 640x5760, 3072x12288 stored wide and 10240x1280 stored
# tall: e.g. 3072x12288 ``S q`` 8.7 vs 10.8 ms, ``S^T z`` 12.3 vs 14.1 ms). In float32 the
# plain forms are as fast or faster.


def product(low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``low @ x`` in ``low``'s dtype, returned in ``x``'s (float32: the bases stay float32)."""
    xl = x.to(low.dtype)
    if low.dtype != x.dtype and stored_transposed(low):
        return (xl.mT @ low.mT).mT.to(x.dtype)
    return (low @ xl).to(x.dtype)


def product_t(low: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``low^T @ q`` in ``low``'s dtype, returned in ``q``'s."""
    if low.dtype == q.dtype or stored_transposed(low):
        return (low.mT @ q.to(low.dtype)).to(q.dtype)
    return (q.mT.to(low.dtype) @ low).mT.to(q.dtype)
