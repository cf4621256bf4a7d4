"""Our own name table between the LDM UNet layout (SD1.x, SD2.x, SDXL checkpoints) and diffusers.

kohya's trainer names SD1 UNet LoRA layers after the diffusers modules
(``lora_unet_down_blocks_0_attentions_0_...``) and some SDXL LoRAs do the same, while the
checkpoints store the LDM layout (``input_blocks.1.1....``). Both UNets have two resnets per
down block and three per up block, which fixes the block arithmetic below:

- ``input_blocks.0.0`` is ``conv_in``; ``input_blocks.n`` (n >= 1) is down block (n-1)//3,
  slot (n-1)%3: slots 0 and 1 hold ``resnets.j`` (sub-module 0) and ``attentions.j``
  (sub-module 1), slot 2 the downsampler (``.0.op``).
- ``output_blocks.n`` is up block n//3, slot n%3: ``resnets.j`` (sub-module 0),
  ``attentions.j`` (sub-module 1 unless it is the upsampler's ``.conv``), the upsampler after
  the last slot (``.1.conv`` without attention, ``.2.conv`` with it).
- ``middle_block.0/1/2`` are ``mid_block.resnets.0``, ``attentions.0``, ``resnets.1``.

Inside a resnet the LDM sequential indices have names; inside a transformer both agree.
Only the direction LDM -> diffusers is needed: aliases are generated from the base's real keys,
so nothing is guessed for keys the base does not have.
"""

from __future__ import annotations

import re

# LDM resnet sub-module -> diffusers name
RESNET_NAMES: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# Top-level LDM modules -> diffusers names (SDXL's ``label_emb`` is diffusers' add_embedding)
TOP_LEVEL_NAMES: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.*)$")


def _resnet_tail(rest: str | None) -> str | None:
    if rest is None:
        return None
    for ldm, diffusers in RESNET_NAMES.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return None


def _middle(n: int, rest: str) -> str | None:
    if n == 1:
        return f"mid_block.attentions.0.{rest}"
    if n in (0, 2):
        tail = _resnet_tail(rest)
        return f"mid_block.resnets.{n // 2}.{tail}" if tail else None
    return None


def _input_block(n: int, sub: int, rest: str | None) -> str | None:
    block, slot = (n - 1) // 3, (n - 1) % 3
    if slot == 2:
        if sub == 0 and rest is not None and (rest == "op" or rest.startswith("op.")):
            return f"down_blocks.{block}.downsamplers.0.conv" + rest[len("op"):]
        return None
    if sub == 0:
        tail = _resnet_tail(rest)
        return f"down_blocks.{block}.resnets.{slot}.{tail}" if tail else None
    if sub == 1 and rest is not None:
        return f"down_blocks.{block}.attentions.{slot}.{rest}"
    return None


def _output_block(n: int, sub: int, rest: str | None) -> str | None:
    block, slot = n // 3, n % 3
    if sub == 0:
        tail = _resnet_tail(rest)
        return f"up_blocks.{block}.resnets.{slot}.{tail}" if tail else None
    if rest is not None and (rest == "conv" or rest.startswith("conv.")):
        # An attention module never has a direct ``conv`` child: this is the upsampler.
        return f"up_blocks.{block}.upsamplers.0.conv" + rest[len("conv"):]
    if sub == 1 and rest is not None:
        return f"up_blocks.{block}.attentions.{slot}.{rest}"
    return None


def ldm_to_diffusers(module: str) -> str | None:
    """The diffusers name of an LDM UNet module path (no ``.weight``), or None if it has none."""
    for ldm, diffusers in TOP_LEVEL_NAMES.items():
        if module == ldm or module.startswith(ldm + "."):
            return diffusers + module[len(ldm):]
    m = _MIDDLE.match(module)
    if m is not None:
        return _middle(int(m.group(1)), m.group(2))
    m = _BLOCK.match(module)
    if m is None:
        return None
    n, sub, rest = int(m.group(2)), int(m.group(3)), m.group(4)
    if m.group(1) == "input_blocks":
        return _input_block(n, sub, rest) if n >= 1 else None
    return _output_block(n, sub, rest)
