"""Open a model path with the reader that fits it.

``OPENERS`` is tried in order; the first whose predicate accepts the path opens it. A reader
for another format adds one ``(predicate, opener)`` entry. Every safetensors file (single, a
shard set, a diffusers component) is wrapped by the quantized reader when it holds quantized
weights, so quantized + sharded composes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import ExtractionInputError
from ..sources import SafetensorsSource, WeightSource, load_pickle_checkpoint
from .folders import DiffusersFolderSource, is_diffusers_folder, open_component
from .quantized import QuantizedSource, needs_dequantization
from .sharded import open_index

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def dequantizing(raw: object) -> WeightSource:
    """``raw`` itself when its weights are plain floats, else a dequantizing view of it."""
    return QuantizedSource(raw) if needs_dequantization(raw) else raw  # type: ignore[return-value]


def open_safetensors(path: str) -> WeightSource:
    return dequantizing(SafetensorsSource(path))


def _open_component(folder: str) -> WeightSource:
    source = open_component(folder, open_safetensors)
    return source if not hasattr(source, "raw_reads") else dequantizing(source)


def _open_folder(path: str) -> WeightSource:
    if is_diffusers_folder(path):
        return DiffusersFolderSource(path, _open_component)  # type: ignore[return-value]
    return _open_component(path)


def _open_gguf(path: str) -> WeightSource:
    from ..gguf_source import GGUFSource  # needs the optional ``gguf`` package

    return GGUFSource(path)  # type: ignore[return-value]


Opener = tuple[Callable[[str], bool], Callable[[str], WeightSource]]

OPENERS: list[Opener] = [
    (os.path.isdir, _open_folder),
    (lambda p: p.lower().endswith(".index.json"), lambda p: dequantizing(open_index(p))),
    (lambda p: p.lower().endswith(PICKLE_SUFFIXES), load_pickle_checkpoint),
    (lambda p: p.lower().endswith(".gguf"), _open_gguf),
    (lambda p: True, open_safetensors),
]


def open_source(path: str | os.PathLike[str]) -> WeightSource:
    """Open a model by its path: a file by its extension, a sharded model by its index, a
    folder of shards or a diffusers model folder. Quantized safetensors come back dequantizing
    (``quantized.py``); a missing path is a clear input error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExtractionInputError(f"{path}: no such file or folder.")
    for accepts, opener in OPENERS:
        if accepts(path):
            return opener(path)
    raise AssertionError("the last opener accepts every path")
