"""Map LoRA layer prefixes to the base checkpoint's weights.

We generate every name a LoRA may use for each base weight (its aliases) from the base's real
keys, then look LoRA prefixes up in that table; nothing is guessed for a prefix that no base
weight produces (those are listed as unmapped). Aliases per base weight:

- any model: the module path itself (key minus ``.weight``), with ``.`` and with ``_``;
- diffusion model: ``diffusion_model.<path>`` and ``lora_unet_<path with _>``; for an LDM UNet
  (SD1/SD2/SDXL) also the diffusers names kohya uses (``lora_unet_down_blocks_0_...``,
  ``unet.down_blocks.0...``) from our table in :mod:`.unet_names`;
- text encoders in HF CLIP layout: ``lora_te1_``/``lora_te_``/``lora_te2_`` + path with ``_``
  and ``text_encoder.``/``text_encoder_2.`` + path. An OpenCLIP encoder (SDXL's second, SD2's)
  stores q, k and v fused in ``attn.in_proj_weight`` in that order (PyTorch's
  MultiheadAttention layout): ``q_proj``/``k_proj``/``v_proj`` map to rows 0/1/2 of 3 of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..extract.keys.key_slice import KeySlice
from ..extract.keys.lora_keys import diffusion_path
from ..extract.sources import WeightSource
from .unet_names import ldm_to_diffusers


@dataclass(frozen=True)
class BaseTarget(KeySlice):
    """A base weight, or a row block of one (fused qkv), possibly transposed."""

    @property
    def ident(self) -> str:
        """Stable id for caches and reports."""
        s = self.key
        if self.chunks > 1:
            s += f"[{self.chunk}/{self.chunks}]"
        return s + (".T" if self.transpose else "")

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(out, in) of the weight as a LoRA sees it (trailing dims flattened into ``in``)."""
        rows, cols = shape[0] // self.chunks, math.prod(shape[1:])
        return (cols, rows) if self.transpose else (rows, cols)


# (key prefix in the base file, text-encoder slot, layout)
TEXT_ENCODER_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("conditioner.embedders.0.transformer.", "te1", "hf"),        # SDXL CLIP-L
    ("conditioner.embedders.1.model.", "te2", "openclip"),        # SDXL CLIP-G
    ("cond_stage_model.transformer.", "te1", "hf"),               # SD1 CLIP-L
    ("cond_stage_model.model.", "te1", "openclip"),               # SD2 OpenCLIP-H
    ("text_encoders.clip_l.transformer.", "te1", "hf"),           # ComfyUI layout
    ("text_encoders.clip_g.transformer.", "te2", "hf"),
    ("clip_l.transformer.", "te1", "hf"),
    ("clip_g.transformer.", "te2", "hf"),
)
TE_LORA_PREFIXES: dict[str, tuple[str, ...]] = {
    "te1": ("lora_te1_", "lora_te_"),
    "te2": ("lora_te2_",),
}
TE_DOTTED_PREFIXES: dict[str, tuple[str, ...]] = {
    "te1": ("text_encoder.", "text_encoders.clip_l.transformer."),
    "te2": ("text_encoder_2.", "text_encoders.clip_g.transformer."),
}

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")
_OPENCLIP_NAMES = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}

_OPENCLIP_EMBEDDINGS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding",
}


def _openclip_to_hf(path: str) -> list[tuple[str, BaseTarget | None]]:
    """HF CLIP module names for an OpenCLIP parameter path, with the row block they read."""
    if path == "text_projection":
        # OpenCLIP applies x @ P; HF's text_projection Linear stores P transposed.
        return [("text_projection", BaseTarget("", transpose=True))]
    if path in _OPENCLIP_EMBEDDINGS:  # same layout in both (ComfyUI's transformers_convert)
        return [(_OPENCLIP_EMBEDDINGS[path], None)]
    m = _RESBLOCK.match(path)
    if m is None:
        return []
    layer, rest = m.group(1), m.group(2)
    base = f"text_model.encoder.layers.{layer}."
    if rest == "attn.in_proj_weight":
        return [(base + f"self_attn.{n}_proj", BaseTarget("", chunk=i, chunks=3))
                for i, n in enumerate(("q", "k", "v"))]
    name = _OPENCLIP_NAMES.get(rest)
    return [(base + name, None)] if name else []


@dataclass
class KeyMap:
    """Alias -> base target table of one base model, and the targets' full shapes."""

    aliases: dict[str, BaseTarget]
    ambiguous: set[str]
    shapes: dict[str, tuple[int, ...]]

    def lookup(self, prefix: str) -> BaseTarget | None:
        if prefix in self.ambiguous:
            return None
        return self.aliases.get(prefix)


def _add(table: dict[str, BaseTarget], ambiguous: set[str], alias: str, target: BaseTarget) -> None:
    old = table.get(alias)
    if old is not None and old != target:
        ambiguous.add(alias)  # two base weights claim the name: never guess between them
    table[alias] = target


def build_key_map(base: WeightSource) -> KeyMap:
    """Every alias of every base weight with at least two dimensions."""
    table: dict[str, BaseTarget] = {}
    ambiguous: set[str] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    keys = base.keys()
    is_ldm_unet = any((diffusion_path(k) or "").startswith("input_blocks.") for k in keys)
    for key in keys:
        shape = tuple(base.shape(key))
        if len(shape) < 2:
            continue
        shapes[key] = shape
        for alias, target in _aliases(key, is_ldm_unet):
            _add(table, ambiguous, alias, target)
    return KeyMap(table, ambiguous, shapes)


def _aliases(key: str, is_ldm_unet: bool) -> Iterable[tuple[str, BaseTarget]]:
    plain = BaseTarget(key)
    module = key[: -len(".weight")] if key.endswith(".weight") else key
    yield module, plain
    yield module.replace(".", "_"), plain
    for prefix, slot, layout in TEXT_ENCODER_PREFIXES:
        if key.startswith(prefix):
            yield from _text_encoder_aliases(key, key[len(prefix):], slot, layout)
            return
    path = diffusion_path(key)
    if path is None or not path.endswith(".weight"):
        return
    unet_module = path[: -len(".weight")]
    yield "diffusion_model." + unet_module, plain
    yield "lora_unet_" + unet_module.replace(".", "_"), plain
    if is_ldm_unet:
        d = ldm_to_diffusers(unet_module)
        if d is not None:
            yield "lora_unet_" + d.replace(".", "_"), plain
            yield "unet." + d, plain


def _text_encoder_aliases(key: str, path: str, slot: str, layout: str) -> Iterable[tuple[str, BaseTarget]]:
    if layout == "hf":
        if not path.endswith(".weight"):
            return
        names = [(path[: -len(".weight")], BaseTarget(key))]
    else:
        names = [(n, BaseTarget(key, t.chunk, t.chunks, t.transpose) if t else BaseTarget(key))
                 for n, t in _openclip_to_hf(path)]
    for hf, target in names:
        for p in TE_LORA_PREFIXES[slot]:
            yield p + hf.replace(".", "_"), target
        for p in TE_DOTTED_PREFIXES[slot]:
            yield p + hf, target


@dataclass(frozen=True)
class MappedLayer:
    prefix: str
    target: BaseTarget


def map_prefixes(prefixes: Iterable[str], key_map: KeyMap) -> tuple[list[MappedLayer], list[str]]:
    """(mapped layers in LoRA order, prefixes with no base weight)."""
    mapped, unmapped = [], []
    for p in prefixes:
        t = key_map.lookup(p)
        if t is None:
            unmapped.append(p)
        else:
            mapped.append(MappedLayer(p, t))
    return mapped, unmapped
