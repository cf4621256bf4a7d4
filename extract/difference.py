"""Float32 differences of two weights on the CPU, formed in cache-sized chunks.

``diff = tuned.float(); diff.sub_(base)`` with a bf16/fp16 ``base`` runs torch's mixed-dtype
in-place kernel at ~0.27 Gelem/s on one core: for a 12B model that is as slow as reading both
files. Upcasting a chunk of each operand into float32 and subtracting float32 from float32
while the chunk is still in the cache runs at ~1.1 Gelem/s (measured on 3072x12288 bf16, one
thread), with bit-identical results: both compute ``fp32(tuned) - fp32(base)`` in float32.
"""

from __future__ import annotations

import torch

# Elements per chunk: a float32 chunk of each operand (2 x 1 MiB) stays in L2.
CHUNK = 1 << 18


def difference_into(out: torch.Tensor, tuned: torch.Tensor | None, base: torch.Tensor,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``out = fp32(tuned) - fp32(base)`` element-wise; ``tuned`` None: ``out -= fp32(base)``.

    ``out`` is a float32 tensor with as many elements as ``base`` (its shape is kept); ``tuned`` and ``base`` may have any dtype that converts to float32 (fp8, fp16,
    bf16, fp32, fp64, ints) and any shape with that many elements. ``scratch``: a float32
    tensor of at least ``min(numel, CHUNK)`` elements to reuse (one is made otherwise).
    Returns ``out``.
    """
    if out.dtype != torch.float32:
        raise ValueError(f"difference_into: out must be float32, not {out.dtype}")
    n = out.numel()
    one_pass = (out.device.type != "cpu" or not out.is_contiguous()
                or (base.dtype == torch.float32
                    and (tuned is None or tuned.dtype == torch.float32)))
    if one_pass:
        # As fast (float32 operands: no mixed-dtype kernel; a GPU), or the only way (a
        # strided ``out``: chunks of its flat view would not exist).
        if tuned is not None:
            out.copy_(tuned.reshape(out.shape))
        b = base.reshape(out.shape)
        out.sub_(b if b.dtype in (torch.float32, torch.float16, torch.bfloat16) else b.float())
        return out
    flat = out.view(-1)
    t = None if tuned is None else tuned.reshape(-1)
    b = base.reshape(-1)
    if scratch is None or scratch.numel() < min(n, CHUNK) or scratch.dtype != torch.float32:
        scratch = torch.empty(min(n, CHUNK), dtype=torch.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        part = flat[lo:hi]
        if t is not None:
            part.copy_(t[lo:hi])
        s = scratch[: hi - lo]
        s.copy_(b[lo:hi])
        part.sub_(s)
    return out
