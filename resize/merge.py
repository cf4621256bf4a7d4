"""What the resizer reads: one LoRA file, or a weighted merge ``"a:0.7,b:0.3"`` of several.

A merge concatenates the weighted LoRAs along the rank axis, layer by layer: the sum
``sum_j w_j * (alpha_j / r_j) * up_j @ down_j`` is exactly ``[w_j s_j up_j ...] @ [down_j ...]``,
so the resize that follows sees the merged difference without it ever being formed.

LoKr, LoHa, DoRA and ``.diff`` layers (:mod:`.adapters`) have no such factors: their change is
formed densely (DoRA's needs the base weight) and enters the concatenation as its SVD
``(U S) @ Vh``. Layers of different members that change the same base weight under different key
styles are merged too: the pipeline groups prefixes by base weight and asks for all of them.
Per-block weights (:mod:`.block_weights`) multiply a member's weight layer by layer.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError
from .adapters import DenseModule, dense_change
from .block_weights import BlockWeight, block_factor, parse_block_weights
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


@dataclass(frozen=True)
class LayerContext:
    """What a dense layer needs from the base: the weight's key, full shape, and the weight."""

    base_key: str
    shape: tuple[int, ...]
    weight: Callable[[], torch.Tensor] | None = None


@dataclass
class LoraInput:
    """One or more LoRA files seen as a single LoRA (module prefixes are the union)."""

    members: list[tuple[LoraFile, float]]
    name: str
    prefixes: list[str]
    block_weights: list[BlockWeight] = field(default_factory=list)

    def member_weight(self, index: int, prefix: str, base_key: str = "") -> float:
        """Member ``index``'s weight for one layer (its own weight times the block weight)."""
        return self.members[index][1] * block_factor(self.block_weights, index, prefix, base_key)

    def dense(self, prefix: str) -> list[DenseModule]:
        return [f.dense[prefix] for f, _w in self.members if prefix in f.dense]

    def converted(self) -> dict[str, str]:
        """Dense layers by prefix, with what they are (``LoKr``, ``DoRA``, ...)."""
        out: dict[str, str] = {}
        for f, _w in self.members:
            for p, m in f.dense.items():
                out.setdefault(p, m.label)
        return out

    def low_rank_shape(self, prefix: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Like :meth:`shape`, or None when no member has ``prefix`` as a low-rank layer."""
        try:
            return self.shape(prefix)
        except KeyError:
            return None

    def group_factors(self, prefixes: list[str], device: str | torch.device, ctx: LayerContext,
                      dtype: torch.dtype = torch.float32) -> LayerFactors:
        """Factors of every member's layers in ``prefixes`` (one base weight), weighted and summed."""
        dense_parts = [(i, m) for p in prefixes for i, (f, _w) in enumerate(self.members)
                       if (m := f.dense.get(p)) is not None]
        low_rank = [p for p in prefixes if self.low_rank_shape(p) is not None]
        if not dense_parts and len(low_rank) == 1 and not self.block_weights:
            return self.factors(low_rank[0], device, dtype)
        ups: list[torch.Tensor] = []
        downs: list[torch.Tensor] = []
        scales: list[tuple[int, float]] = []
        for p in low_rank:
            for i, (f, _w) in enumerate(self.members):
                m = f.modules.get(p)
                if m is None:
                    continue
                up, down = f.factors(m, device, dtype)
                ups.append((up * (self.member_weight(i, p, ctx.base_key) * m.scale)).flatten(1))
                downs.append(down.flatten(1))
                scales.append((m.rank, m.scale))
        for i, m in dense_parts:
            f = self.members[i][0]
            change = dense_change(m, lambda k, f=f: f.tensor(k, device, dtype), ctx.shape, ctx.weight)
            u, s, vh = _svd_factors(change.reshape(change.shape[0], -1).to(device, dtype))
            ups.append(u * (s * self.member_weight(i, m.prefix, ctx.base_key)))
            downs.append(vh)
            scales.append((s.numel(), 1.0))
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        up = up.reshape(up.shape[0], up.shape[1], *[1] * (len(ctx.shape) - 2))
        down = down.reshape(down.shape[0], *ctx.shape[1:])
        return LayerFactors(up, down, 1.0, _output_scale(scales))

    @property
    def is_merge(self) -> bool:
        return len(self.members) > 1 or self.members[0][1] != 1.0 or bool(self.block_weights)

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
        parts = [(f, f.modules[prefix], self.member_weight(i, prefix))
                 for i, (f, _w) in enumerate(self.members) if prefix in f.modules]
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
        for i, (f, _w) in enumerate(self.members):
            for k in f.passthrough:
                out.setdefault(k, (k, f, self.member_weight(i, k.rpartition(".")[0])))
        return list(out.values())


def _svd_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a dense change, cut to its numerical rank (the tolerance of ``matrix_rank``)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :1] * 0, s[:1] * 0, vh[:1]
    tol = float(s[0]) * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    k = max(1, int((s > tol).sum()))
    return u[:, :k], s[:k], vh[:k]


def _output_scale(scales: list[tuple[int, float]]) -> float:
    # The rank-weighted geometric mean of the parts' scales, so the written factors stay near
    # the members' magnitudes (exact for a single scale); dense parts count with scale 1.
    if not all(sc > 0 for _r, sc in scales):
        return 1.0
    total = sum(r for r, _sc in scales)
    return math.exp(sum(r * math.log(sc) for r, sc in scales) / total)


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


def open_lora_input(spec: str, resolve=resolve_lora_path, block_weights: str = "") -> LoraInput:
    """Open a LoRA file or a merge spec; ``resolve`` turns member names into paths.

    ``block_weights``: per-block weights, see :mod:`.block_weights`.
    """
    members = parse_lora_spec(spec)
    weights = parse_block_weights(block_weights, len(members))  # bad text fails before reading
    files = [(read_lora_file(resolve(m.path)), m.weight) for m in members]
    prefixes: list[str] = []
    seen: set[str] = set()
    for f, _w in files:
        for p in [*f.modules, *f.dense]:
            if p not in seen:
                seen.add(p)
                prefixes.append(p)
    return LoraInput(members=files, name=merged_name(files), prefixes=prefixes, block_weights=weights)
