"""Text encoders of whole checkpoints and encoder-only files, named as ComfyUI's CLIP names them.

A checkpoint stores its text encoders under its own prefixes and layouts (SD1
``cond_stage_model.transformer.*``, SDXL ``conditioner.embedders.0/1.*`` with the second in
OpenCLIP layout, fused q/k/v included; SD3 ``text_encoders.clip_l/clip_g/t5xxl.*``; encoder-only
files as ``CLIPLoader`` reads them). :class:`TextEncoderView` shows them as
``text_encoders.<ComfyUI CLIP state-dict key>``, converting exactly as ComfyUI's
``process_clip_state_dict`` / ``clip_text_transformers_convert`` do when it loads the file, so
the extracted keys are the keys the loaded CLIP has. Every other key passes through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .errors import ExtractionInputError
from .keys.key_slice import KeySlice
from .keys.te_keys import TE_PREFIX, encoders_in
from .sources import WeightSource

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                     "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_TOP = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
# Model width -> the CLIP ComfyUI loads an OpenCLIP / HF encoder of that width as.
_CLIP_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}


def _openclip(rest: str, raw: str, enc: str) -> list[tuple[str, KeySlice]]:
    """ComfyUI names of one OpenCLIP parameter (``comfy.utils.transformers_convert``)."""
    t = f"{enc}.transformer."
    if rest in _OPENCLIP_TOP:
        return [(t + _OPENCLIP_TOP[rest], KeySlice(raw))]
    if rest == "text_projection":
        # OpenCLIP multiplies x @ P; ComfyUI's Linear stores P transposed.
        return [(t + "text_projection.weight", KeySlice(raw, transpose=True))]
    if rest == "text_projection.weight":
        return [(t + "text_projection.weight", KeySlice(raw))]
    m = _RESBLOCK.match(rest)
    if m is None:
        return [(f"{enc}.{rest}", KeySlice(raw))]  # e.g. logit_scale: kept, and reported
    layer, sub = m.group(1), m.group(2)
    base = f"{t}text_model.encoder.layers.{layer}."
    for kind in ("weight", "bias"):
        if sub == f"attn.in_proj_{kind}":
            return [(f"{base}self_attn.{n}_proj.{kind}", KeySlice(raw, i, 3))
                    for i, n in enumerate(("q", "k", "v"))]
    mod, _, kind = sub.rpartition(".")
    if mod in _OPENCLIP_RENAMES:
        return [(f"{base}{_OPENCLIP_RENAMES[mod]}.{kind}", KeySlice(raw))]
    return [(f"{enc}.{rest}", KeySlice(raw))]


def _width(source: WeightSource, keys: Sequence[str], embedding_key: str) -> int | None:
    return source.shape(embedding_key)[-1] if embedding_key in keys else None


def _clip_name(source: WeightSource, keys: Sequence[str], embedding_key: str, default: str) -> str:
    w = _width(source, keys, embedding_key)
    return _CLIP_BY_WIDTH.get(w, default) if w is not None else default


def _convert(source: WeightSource) -> dict[str, KeySlice]:
    """ComfyUI CLIP key -> slot, for every text-encoder key of the source (may be empty)."""
    keys = source.keys()
    keyset = set(keys)
    out: dict[str, KeySlice] = {}

    def hf(prefix: str, enc: str, insert_text_model: bool = False) -> None:
        for k in keys:
            if k.startswith(prefix):
                rest = k[len(prefix):]
                if insert_text_model and not rest.startswith("text_model."):
                    rest = "text_model." + rest  # SD1 files saved without the text_model level
                out.setdefault(f"{enc}.transformer.{rest}", KeySlice(k))

    def oc(prefix: str, enc: str) -> None:
        for k in keys:
            if k.startswith(prefix):
                for name, slot in _openclip(k[len(prefix):], k, enc):
                    out.setdefault(name, slot)

    if any(k.startswith("cond_stage_model.transformer.") for k in keys):          # SD1.x
        hf("cond_stage_model.transformer.", "clip_l", insert_text_model=True)
    if any(k.startswith("cond_stage_model.model.") for k in keys):                # SD2.x
        oc("cond_stage_model.model.", "clip_h")
    if any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys):
        hf("conditioner.embedders.0.transformer.", "clip_l")                       # SDXL CLIP-L
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        oc("conditioner.embedders.1.model.", "clip_g")                             # SDXL CLIP-G
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):          # refiner / SD2 sgm
        oc("conditioner.embedders.0.model.",
           _clip_name(source, keys, "conditioner.embedders.0.model.token_embedding.weight", "clip_g"))
    for k in keys:                                                                 # SD3 and newer
        if k.startswith(TE_PREFIX):
            rest = k[len(TE_PREFIX):]
            enc = rest.split(".", 1)[0]
            if rest == f"{enc}.text_projection":   # OpenCLIP-style projection (SD3 CLIP-G)
                out[f"{enc}.transformer.text_projection.weight"] = KeySlice(k, transpose=True)
            else:
                out.setdefault(rest, KeySlice(k))
    if not out and any(k.startswith("text_model.encoder.layers.") for k in keys):  # CLIPLoader file
        enc = _clip_name(source, keys, "text_model.embeddings.token_embedding.weight", "clip_l")
        for k in keys:
            if k.startswith("text_model.") or k == "text_projection.weight":
                out[f"{enc}.transformer.{k}"] = KeySlice(k)
            elif k == "logit_scale":
                out[f"{enc}.logit_scale"] = KeySlice(k)
    if not out and "shared.weight" in keyset and any(k.startswith("encoder.block.") for k in keys):
        for k in keys:                                                             # T5-XXL file
            out[f"t5xxl.transformer.{k}"] = KeySlice(k)
    return out


class TextEncoderView:
    """A source whose text-encoder keys are ``text_encoders.<ComfyUI CLIP key>``.

    Diffusion-model and VAE keys pass through unchanged; the raw text-encoder keys are hidden.
    """

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self.name = source.name
        slots = _convert(source)
        used = {s.key for s in slots.values()}
        self._slots = {TE_PREFIX + k: s for k, s in slots.items()}
        self._keys = [k for k in source.keys() if k not in used] + list(self._slots)

    @property
    def encoders(self) -> tuple[str, ...]:
        return encoders_in(self._slots)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        slot = self._slots.get(key)
        if slot is None:
            return tuple(self.source.shape(key))
        shape = list(self.source.shape(slot.key))
        if slot.chunks > 1:
            if shape[0] % slot.chunks:
                raise ExtractionInputError(
                    f"{self.name}: {slot.key!r} has {shape[0]} rows, not a multiple of "
                    f"{slot.chunks} (fused q/k/v); the checkpoint is not a standard OpenCLIP encoder.")
            shape[0] //= slot.chunks
        if slot.transpose:
            shape = shape[::-1]
        return tuple(shape)

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        slot = self._slots.get(key)
        if slot is None:
            return self.source.get(key, device, dtype)
        t = slot.take(self.source.get(slot.key, device, dtype))
        return t.contiguous() if slot.chunks > 1 or slot.transpose else t

    def identity_parts(self) -> list[WeightSource]:
        return [self.source]

    def raw_key(self, key: str) -> str:
        """The key in the underlying file that ``key`` reads (for messages and norm caches)."""
        slot = self._slots.get(key)
        return key if slot is None else slot.key


def with_text_encoders(source: WeightSource) -> WeightSource:
    """The source with its text encoders under ComfyUI CLIP names; itself when it has none."""
    view = TextEncoderView(source)
    return view if view.encoders else source


class CombinedSource:
    """Several sources with disjoint keys as one (a MODEL and a CLIP read together)."""

    def __init__(self, sources: Sequence[WeightSource], name: str) -> None:
        self.sources = list(sources)
        self.name = name
        self._owner: dict[str, WeightSource] = {}
        for s in self.sources:
            for k in s.keys():
                self._owner.setdefault(k, s)

    def keys(self) -> list[str]:
        return list(self._owner)

    def owner_of(self, key: str) -> WeightSource:
        """The part that holds ``key`` (what ``source_info`` asks how it is stored)."""
        return self._owner[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._owner[key].shape(key))

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._owner[key].get(key, device, dtype)

    def left_out_keys(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.sources:
            fn = getattr(s, "left_out_keys", None)
            if callable(fn):
                out.update(fn())
        return out

    def identity_parts(self) -> list[WeightSource]:
        """The parts, for caches that key on where weights come from (memory/cache.py)."""
        return list(self.sources)
