"""Stub of ``comfy.float``."""

from __future__ import annotations

import torch


def stochastic_rounding(value: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Cast ``value`` to ``dtype``.

    The real function is a plain ``.to(dtype)`` for fp32/fp16/bf16 and every other dtype except
    the two fp8 types, which it rounds stochastically with ``seed``. The stub casts in every case
    (round-to-nearest for fp8), which is exact for the dtypes tests use.
    """
    del seed  # only the real fp8 path uses it
    return value.to(dtype=dtype)
