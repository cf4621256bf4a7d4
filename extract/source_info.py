"""What a weight source says about how its weights are stored, with fallbacks for any source.

Readers of quantized files (fp8, ComfyUI per-layer quantization, GGUF) implement the optional
methods ``format_of(key)``, ``quantization_noise(key)`` and ``describe()``; plain files, state
dicts and ComfyUI models may not. These functions answer for every source.
"""

from __future__ import annotations

import math
from collections import Counter

from .sources import WeightSource

# A layer whose difference norm is at most this many times its noise floor is flagged: then at
# least 1/1.5**2 = 44% of the difference's energy is the two files' rounding noise.
NOISE_FLAG_FACTOR = 1.5

_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _inner(source: WeightSource, key: str) -> tuple[WeightSource, str]:
    """The source and key a view reads ``key`` from: a text-encoder view (``raw_key``) or a
    combination of sources or shards (``owner_of``); the source itself otherwise."""
    raw_key = getattr(source, "raw_key", None)
    inner = getattr(source, "source", None)
    if callable(raw_key) and inner is not None:
        return _inner(inner, raw_key(key))
    owner_of = getattr(source, "owner_of", None)
    if callable(owner_of) and not hasattr(source, "format_of"):
        return _inner(owner_of(key), key)
    return source, key


def format_of(source: WeightSource, key: str) -> str:
    """How ``key`` is stored, e.g. ``bf16``, ``float8_e4m3fn scaled``, ``GGUF Q8_0``."""
    source, key = _inner(source, key)
    fn = getattr(source, "format_of", None)
    if callable(fn):
        return str(fn(key))
    dtype_fn = getattr(source, "dtype", None)
    if callable(dtype_fn):
        name = str(dtype_fn(key)).removeprefix("torch.")
        return _DTYPE_NAMES.get(name, name)
    return "float"


def quantization_noise(source: WeightSource, key: str) -> float | None:
    """Estimated Frobenius norm of the storage's rounding error for ``key``; None if unquantized."""
    source, key = _inner(source, key)
    fn = getattr(source, "quantization_noise", None)
    if not callable(fn):
        return None
    value = fn(key)
    return None if value is None else float(value)


def noise_floor(base: WeightSource, base_key: str, tuned: WeightSource, tuned_key: str
                ) -> float | None:
    """``sqrt(noise_base**2 + noise_tuned**2)``: the difference's rounding noise; None when
    neither side is quantized."""
    parts = [quantization_noise(base, base_key), quantization_noise(tuned, tuned_key)]
    known = [p for p in parts if p is not None]
    if not known:
        return None
    return math.sqrt(math.fsum(p * p for p in known))


def describe(source: WeightSource, role: str = "") -> str:
    """One line for the report: the source, and how its weights are stored."""
    inner = getattr(source, "source", None)
    if inner is not None and callable(getattr(source, "raw_key", None)):
        source = inner  # a text-encoder view: the file it renames
    fn = getattr(source, "describe", None)
    if callable(fn):
        text = str(fn())
    else:
        keys = source.keys()
        counts = Counter(format_of(source, k) for k in keys)
        text = f"{source.name}: " + ", ".join(f"{n} {f}" for f, n in counts.most_common(3)) + \
            (" tensors" if counts else "no tensors")
    return f"{role}: {text}" if role else text
