"""What the resizer reads: one LoRA file, or a weighted merge ``"a:0.7,b:0.3"`` of several.

A merge concatenates the weighted LoRAs along the rank axis, layer by layer: the sum
``sum_j w_j * (alpha_j / r_j) * up_j @ down_j`` is exactly ``[w_j s_j up_j ...] @ [down_j ...]``,
so the resize that follows sees the merged difference without it ever being formed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from ..extract.errors import ExtractionInputError
from .lora_file import LoraFile, read_lora_file

_WEIGHT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class MergeMember:
    path: str
    weight: float


@dataclass(frozen=True)
class LayerFactors:
    """Factors of one layer with the scale that turns ``up @ down`` into the weight change."""

    up: torch.Tensor      # [out, r(, 1, 1)]
    down: torch.Tensor    # [r, in(, kh, kw)]
    scale: float          # multiply up @ down by this (alpha / rank, merge weights folded in)
    output_scale: float   # the alpha / rank to write to the output, so factors keep their size


@dataclass
class LoraInput:
    """One or more LoRA files seen as a single LoRA (module prefixes are the union)."""

    members: list[tuple[LoraFile, float]]
    name: str
    prefixes: list[str]

    @property
    def is_merge(self) -> bool:
        return len(self.members) > 1 or self.members[0][1] != 1.0

    @property
    def metadata(self) -> dict[str, str]:
        # The first member's metadata: a merge has no single truthful set, and the members are
        # recorded separately in our own metadata.
        return dict(self.members[0][0].metadata)

    def shape(self, prefix: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(up shape without rank, down shape without rank) of a module."""
        for f, _w in self.members:
            m = f.modules.get(prefix)
            if m is not None:
                return (m.up_shape[:1] + m.up_shape[2:]), m.down_shape[1:]
        raise KeyError(prefix)

    def factors(self, prefix: str, device: str | torch.device,
                dtype: torch.dtype = torch.float32) -> LayerFactors:
        parts = [(f, f.modules[prefix], w) for f, w in self.members if prefix in f.modules]
        if len(parts) == 1 and parts[0][2] == 1.0:
            f, m, _w = parts[0]
            up, down = f.factors(m, device, dtype)
            return LayerFactors(up, down, m.scale, m.scale)
        ups, downs = [], []
        for f, m, w in parts:
            up, down = f.factors(m, device, dtype)
            if ups and (up.shape[:1] + up.shape[2:] != ups[0].shape[:1] + ups[0].shape[2:]
                        or down.shape[1:] != downs[0].shape[1:]):
                raise ExtractionInputError(
                    f"layer {prefix!r}: {os.path.basename(f.path)} has up {list(up.shape)} / down "
                    f"{list(down.shape)}, which does not match the other merged LoRAs. Merge "
                    "LoRAs made for the same model.")
            ups.append(up * (w * m.scale))  # weight and alpha scale folded into up
            downs.append(down)
        # Output alpha: the rank-weighted geometric mean of the members' scales, so the
        # written factors stay near the members' magnitudes (exact for a single scale).
        ranks = [m.rank for _f, m, _w in parts]
        log_scale = sum(r * math.log(m.scale) for r, (_f, m, _w) in zip(ranks, parts, strict=True)
                        if m.scale > 0)
        output_scale = math.exp(log_scale / sum(ranks)) if all(m.scale > 0 for _f, m, _w in parts) else 1.0
        return LayerFactors(torch.cat(ups, dim=1), torch.cat(downs, dim=0), 1.0, output_scale)

    def passthrough(self) -> list[tuple[str, LoraFile, float]]:
        """(key, file, weight) of full-weight patches, first file wins on duplicates."""
        out: dict[str, tuple[str, LoraFile, float]] = {}
        for f, w in self.members:
            for k in f.passthrough:
                out.setdefault(k, (k, f, w))
        return list(out.values())


def parse_lora_spec(spec: str) -> list[MergeMember]:
    """``"a.safetensors"`` or ``"a:0.7,b:0.3"`` -> members (a weight is optional, default 1)."""
    if not spec.strip():
        raise ExtractionInputError("empty LoRA name; give a file, or 'a:0.7,b:0.3' to merge.")
    members = []
    for part in spec.split(","):
        part = part.strip()
        head, sep, tail = part.rpartition(":")
        if sep and _WEIGHT.match(tail.strip()) and head:
            members.append(MergeMember(head.strip(), float(tail)))
        else:
            members.append(MergeMember(part, 1.0))
        if not members[-1].path:
            raise ExtractionInputError(
                f"merge spec {spec!r}: member {part!r} has no file name; write 'a:0.7,b:0.3'.")
        if not math.isfinite(members[-1].weight):
            raise ExtractionInputError(f"merge spec {spec!r}: weight of {part!r} is not finite.")
    return members


def _format_weight(w: float) -> str:
    return f"{w:.2f}".rstrip("0").rstrip(".")


def merged_name(files: list[tuple[LoraFile, float]]) -> str:
    if len(files) == 1 and files[0][1] == 1.0:
        return files[0][0].name
    return "+".join(f"{f.name}{_format_weight(w)}" for f, w in files)


def resolve_lora_path(path: str) -> str:
    """A member path as given, or with ``.safetensors`` appended when only that exists."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + ".safetensors"):
        return path + ".safetensors"
    raise ExtractionInputError(f"{path}: no such LoRA file.")


def open_lora_input(spec: str, resolve=resolve_lora_path) -> LoraInput:
    """Open a LoRA file or a merge spec; ``resolve`` turns member names into paths."""
    members = parse_lora_spec(spec)
    files = [(read_lora_file(resolve(m.path)), m.weight) for m in members]
    prefixes: list[str] = []
    seen: set[str] = set()
    for f, _w in files:
        for p in f.modules:
            if p not in seen:
                seen.add(p)
                prefixes.append(p)
    return LoraInput(members=files, name=merged_name(files), prefixes=prefixes)
