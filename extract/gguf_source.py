"""A ``.gguf`` model file as a weight source, read as ComfyUI-GGUF reads it.

Files come from ComfyUI-GGUF's convert tool (F16/BF16/F32) and from llama.cpp's quantizer
(Q8_0, Q4_0 ... Q6_K). The ``gguf`` package parses the file and memory-maps the tensor data;
each ``get`` dequantizes one tensor, so memory holds one layer at a time.

Reading: the tensor bytes are viewed where they lie in a private, read-only-in-practice map of
the file (no copy), dequantized chunk by chunk into the float32 result (see ``gguf_dequant``),
and the map's pages of that tensor are then dropped from this process (``MADV_DONTNEED``; the
page cache keeps them): resident memory holds about one layer, not the whole mapped file.

Names and shapes follow ComfyUI-GGUF's loader: a tensor's shape is its ``comfy.gguf.orig_shape.
<name>`` metadata when present (the convert tool flattens some SD1/SDXL tensors to rows of 256
and records the original shape there), else the GGUF dimensions reversed (GGUF lists the
fastest-varying dimension first). Names are kept as stored; the key pairing accepts them with or
without ``model.diffusion_model.``.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ExtractionInputError
from .gguf_dequant import (
    KERNELS,
    dequantize_bytes,
    dequantize_into,
    noise_norm,
    rounding_steps,
)

logger = logging.getLogger(__name__)

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
FLOAT_TYPES = ("F32", "F16", "F64", "BF16")  # stored as numbers, no rounding step to report


def import_gguf():
    """The ``gguf`` package, or a clear error saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ExtractionInputError(
            "reading .gguf files needs the 'gguf' package (the one ComfyUI-GGUF uses): "
            "pip install gguf") from e
    return gguf


def _dequantizable(gguf, type_name: str) -> bool:
    """Types we can turn into floats: our torch kernels, or a dequantizer in gguf.quants."""
    if type_name in KERNELS:
        return True
    cls = getattr(gguf.quants, type_name, None)
    return isinstance(cls, type) and "dequantize_blocks" in vars(cls)


@dataclass(frozen=True)
class _Entry:
    tensor: object               # gguf.ReaderTensor (its ``data`` is a view of the mapped file)
    shape: tuple[int, ...]
    type_name: str
    block_size: int
    type_size: int


class GGUFSource:
    """A lazily read GGUF file; implements the weight-source protocol plus format reporting."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        gguf = import_gguf()
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
            raise ExtractionInputError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}). The file is "
                "truncated, corrupt or not GGUF.") from e
        if getattr(self._reader, "byte_order", "I") != "I":
            # The tensor bytes are read as they lie: little-endian scales and floats only.
            raise ExtractionInputError(
                f"{self.path}: a big-endian GGUF file; only little-endian GGUF files (what "
                "ComfyUI-GGUF and llama.cpp write by default) can be read. Convert it on a "
                "little-endian machine or use the original safetensors.")
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        for t in self._reader.tensors:
            self._entries[t.name] = self._entry(gguf, t)
        self.architecture = self._string_field("general.architecture")

    def _entry(self, gguf, t) -> _Entry:
        type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
        if not _dequantizable(gguf, type_name):
            raise ExtractionInputError(
                f"{self.path}: tensor {t.name!r} is stored as GGUF type {type_name}, which this "
                "pack cannot turn into float weights (it would be read as raw codes). Use a file "
                "quantized as F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q2_K..Q6_K, or the "
                "original safetensors.")
        shape = self._orig_shape(t.name)
        if shape is None:
            shape = tuple(int(v) for v in reversed(t.shape))
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel != int(t.n_elements):
            raise ExtractionInputError(
                f"{self.path}: tensor {t.name!r} has {int(t.n_elements)} elements but its "
                f"recorded shape {list(shape)} has {numel}. The file is corrupt.")
        block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        return _Entry(t, shape, type_name, int(block_size), int(type_size))

    def _orig_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._reader.get_field(ORIG_SHAPE_PREFIX + name)
        if field is None:
            return None
        try:
            return tuple(int(field.parts[i][0]) for i in field.data)
        except (IndexError, TypeError, ValueError) as e:
            raise ExtractionInputError(
                f"{self.path}: metadata {ORIG_SHAPE_PREFIX + name!r} is not a list of integers."
            ) from e

    def _string_field(self, name: str) -> str | None:
        field = self._reader.get_field(name)
        if field is None or not field.data:
            return None
        try:
            return bytes(field.parts[field.data[-1]]).decode("utf-8")
        except (UnicodeDecodeError, TypeError, IndexError):
            return None

    # --- the weight-source protocol ----------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """One weight, dequantized to float32 (then ``dtype``), on ``device``.

        Block types with a torch kernel are dequantized on the target device: only the
        compact codes cross the bus to a GPU.
        """
        e = self._entries[key]
        dev = torch.device(device)
        numel = int(e.tensor.n_elements)
        if numel == 0:
            w = torch.empty(0, dtype=torch.float32, device=dev)
        else:
            stored = self._stored_bytes(e)
            try:
                blocks = stored.view(-1, e.type_size)
                if e.type_name not in KERNELS:  # the rare types: gguf.quants (numpy)
                    w = dequantize_bytes(blocks, e.type_name, e.block_size, e.type_size).to(dev)
                elif dev.type == "cpu":
                    w = dequantize_into(blocks, e.type_name, torch.empty(numel, dtype=torch.float32))
                else:
                    w = dequantize_into(blocks.to(dev), e.type_name,
                                        torch.empty(numel, dtype=torch.float32, device=dev))
            finally:
                self._drop_pages(e)
        w = w.reshape(e.shape)
        return w if dtype is None or dtype == torch.float32 else w.to(dtype)

    def _mapped(self) -> mmap.mmap:
        """The file mapped copy-on-write: writable as far as Python is concerned (torch needs
        that), never written, so no page is ever copied and the file never changes."""
        with self._map_lock:
            if self._map is None:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._map

    def _stored_bytes(self, e: _Entry) -> torch.Tensor:
        """The tensor's bytes in the file, as a uint8 tensor viewing the mapping (no copy)."""
        return torch.frombuffer(self._mapped(), dtype=torch.uint8, count=int(e.tensor.n_bytes),
                                offset=int(e.tensor.data_offset))

    def _drop_pages(self, e: _Entry) -> None:
        """Unmap the tensor's pages from this process (they stay in the page cache), so that
        reading a whole model does not leave it all counted in the resident set. Best effort:
        without ``madvise`` (Windows) the kernel reclaims the clean pages under pressure."""
        advise = getattr(self._map, "madvise", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None or dontneed is None:
            return
        begin = int(e.tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        end = int(e.tensor.data_offset) + int(e.tensor.n_bytes)
        try:
            advise(dontneed, begin, end - begin)
        except (OSError, ValueError):
            pass

    # --- format reporting (optional interface read by the reports) ---------------------------

    def type_name(self, key: str) -> str:
        return self._entries[key].type_name

    def format_of(self, key: str) -> str:
        return f"GGUF {self._entries[key].type_name}"

    def quantization_noise(self, key: str) -> float | None:
        """Estimated Frobenius norm of the stored weight's rounding error (``None``: a float type).

        From the block scales: each element was rounded to a grid of step ``s``, an error
        uniform in ``[-s/2, s/2]``: ``sqrt(sum s^2 / 12)`` (float64).
        """
        e = self._entries[key]
        if e.type_name in FLOAT_TYPES:
            return None
        try:
            steps = rounding_steps(self._stored_bytes(e).numpy(), e.type_name, e.block_size,
                                   e.type_size)
        finally:
            self._drop_pages(e)
        return None if steps is None else noise_norm(steps)

    def describe(self) -> str:
        counts = Counter(e.type_name for e in self._entries.values())
        parts = ", ".join(f"{t} x {n}" for t, n in counts.most_common())
        arch = f", architecture {self.architecture}" if self.architecture else ""
        return f"{self.name}: GGUF ({parts}){arch}"

    def close(self) -> None:
        """Drop the file mapping (the reader holds it)."""
        self._entries = {}
        self._reader = None
        m, self._map = self._map, None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # a tensor still views it; the mapping goes with the last view

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
