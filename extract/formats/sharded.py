"""A model saved as several safetensors files (shards), read as one lazy source.

Hugging Face saves big models as ``model-00001-of-00003.safetensors``... with an index,
``model.safetensors.index.json``, whose ``weight_map`` says which shard holds each key. Each
shard's header is parsed up front (a few KB each); its data is read on demand through one open
descriptor per shard, so memory stays at one tensor, as for a single file.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import ExtractionInputError
from ..source_info import format_of
from ..sources import SafetensorsSource


class ShardedSafetensorsSource:
    """Several safetensors files with disjoint keys as one source.

    Supports the raw fast paths of a single file (``nbytes``, ``read_into``, ``read_elements``)
    by handing them to the shard that holds the key (``raw_reads``).
    """

    raw_reads = True

    def __init__(self, shard_paths: list[str], name: str, weight_map: dict[str, str] | None = None
                 ) -> None:
        if not shard_paths:
            raise ExtractionInputError(f"{name}: no .safetensors shards found.")
        self.name = name
        self.path = os.path.dirname(shard_paths[0]) or "."
        self.shards = [SafetensorsSource(p) for p in shard_paths]
        self._owner: dict[str, SafetensorsSource] = {}
        for shard in self.shards:
            for k in shard.keys():
                other = self._owner.setdefault(k, shard)
                if other is not shard:
                    raise ExtractionInputError(
                        f"{name}: key {k!r} is in two shards ({other.name} and {shard.name}); "
                        "the shards are from different saves. Re-download the model.")
        if weight_map is not None:
            by_name = {os.path.basename(s.path): s for s in self.shards}
            for k, shard_name in weight_map.items():
                owner = self._owner.get(k)
                if owner is None or by_name.get(shard_name) is not owner:
                    raise ExtractionInputError(
                        f"{name}: the index puts {k!r} in {shard_name}, but "
                        f"{'no shard has it' if owner is None else f'it is in {owner.name}'}. "
                        "The shards and the index do not match; re-download the model.")
        self.metadata: dict[str, str] = {}
        for shard in self.shards:  # shards of one save carry the same metadata; merge layers
            for k, v in shard.metadata.items():
                if k == "_quantization_metadata" and k in self.metadata:
                    v = _merge_quant_metadata(self.metadata[k], v)
                self.metadata[k] = v

    def keys(self) -> list[str]:
        return list(self._owner)

    def owner_of(self, key: str) -> SafetensorsSource:
        """The shard that holds ``key`` (what ``source_info`` asks how it is stored)."""
        return self._owner[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].dtype(key)

    def nbytes(self, key: str) -> int:
        return self._owner[key].nbytes(key)

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._owner[key].get(key, device, dtype)

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        return self._owner[key].read_into(key, buffer)

    def read_elements(self, key: str, lo: int, hi: int, buffer: torch.Tensor) -> torch.Tensor:
        return self._owner[key].read_elements(key, lo, hi, buffer)

    def describe(self) -> str:
        kinds = sorted({format_of(self, k) for k in self._owner})
        return f"{self.name}: {len(self.shards)} shards ({', '.join(kinds)})"

    def identity_parts(self) -> list[SafetensorsSource]:
        return list(self.shards)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _merge_quant_metadata(a: str, b: str) -> str:
    try:
        ja, jb = json.loads(a), json.loads(b)
        ja.setdefault("layers", {}).update(jb.get("layers", {}))
        return json.dumps(ja)
    except (json.JSONDecodeError, AttributeError, TypeError):
        return a  # the quantized reader reports the bad entry with the file named


def open_index(index_path: str) -> ShardedSafetensorsSource:
    """The shards an ``*.safetensors.index.json`` names (its ``weight_map``)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExtractionInputError(
            f"{index_path}: not a safetensors index ({type(e).__name__}: {e}). It must be "
            "JSON with a 'weight_map' of key -> shard file name.") from e
    folder = os.path.dirname(index_path)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ExtractionInputError(
            f"{index_path}: shard {missing[0]} ({len(missing)} of {len(names)} missing) is not in "
            f"{folder or '.'}. Download every shard next to the index.")
    name = os.path.basename(index_path).removesuffix(".index.json")
    return ShardedSafetensorsSource([os.path.join(folder, n) for n in names],
                                    name=f"{name} (sharded)", weight_map=weight_map)
