"""Model blocks from key names: the unit the V2 manager keeps on, or moves off, the device.

The one place that decides which block a weight belongs to. Indexed containers of the usual
diffusion architectures (``input_blocks.N``, ``output_blocks.N``, ``double_blocks.N``,
``single_blocks.N``, ``joint_blocks.N``, ``blocks.N``, ``transformer_blocks.N``, ...) and
``middle_block`` are blocks; everything else (embeddings, final layers, norms) is one group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..extract.keys.lora_keys import diffusion_path
from ..extract.keys.te_keys import is_te_key, te_block

OTHER_BLOCK = "other"

# Containers whose numbered children are blocks.
_INDEXED = ("input_blocks", "output_blocks", "double_blocks", "single_blocks", "joint_blocks",
            "blocks", "transformer_blocks", "layers", "down_blocks", "up_blocks",
            "noise_refiner", "context_refiner")
_MIDDLE = ("middle_block", "mid_block")
_BLOCK = re.compile(r"^(?P<head>[A-Za-z_]+)\.(?P<index>\d+)\.")

# Keep-resident priority (lower first), the order the seed gives: middle, output, input, other.
_PRIORITY = {"middle": 0, "output": 1, "input": 2}


def block_of(key: str) -> str:
    """``input_blocks.4.1.proj_in.weight`` -> ``input_blocks.4``; ``middle_block.1.x`` ->
    ``middle_block``; ``final_layer.linear.weight`` -> ``other``. Model prefixes are ignored.
    Text-encoder keys: ``text_encoders.clip_l...layers.3.*`` -> ``clip_l.3``, else ``clip_l``."""
    if is_te_key(key):
        return te_block(key)
    path = diffusion_path(key) or key
    head = path.split(".", 1)[0]
    if head in _MIDDLE:
        return head
    m = _BLOCK.match(path)
    if m and m.group("head") in _INDEXED:
        return f"{m.group('head')}.{m.group('index')}"
    return OTHER_BLOCK


def block_label(key: str) -> str:
    """The group a layer is shown under in reports and charts: its block, or, for layers
    outside any block, the first part of its path (``time_embed``, ``patch_embedding``)."""
    block = block_of(key)
    if block != OTHER_BLOCK:
        return block
    return (diffusion_path(key) or key).split(".", 1)[0]


def block_priority(block: str) -> int:
    """0 middle, 1 output (decoder side), 2 input (encoder side), 3 everything else."""
    head = block.split(".", 1)[0]
    if head in _MIDDLE:
        return _PRIORITY["middle"]
    if head in ("output_blocks", "up_blocks"):
        return _PRIORITY["output"]
    if head in ("input_blocks", "down_blocks"):
        return _PRIORITY["input"]
    return 3


def group_by_block(keys: Iterable[str]) -> dict[str, list[str]]:
    """Keys by block, blocks and keys in first-seen (model) order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(block_of(k), []).append(k)
    return groups
