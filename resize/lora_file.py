"""Reading LoRA files as users have them: kohya, ComfyUI-native, PEFT, LoCon convolutions.

A LoRA file is grouped into modules by key prefix. Every key must belong to a family we
understand: low-rank pairs (``.lora_down/.lora_up``, PEFT ``.lora_A/.lora_B`` and the other
spellings ComfyUI's loader accepts) with an optional ``.alpha``, or full-weight patches
(``.diff``, ``.diff_b``, ``.w_norm``, ``.b_norm``: nothing to resize, copied unchanged).
Other adapter types (LoHa, LoKr, DoRA, LoCon's CP ``lora_mid``) and unknown keys are an error
that lists a few examples, never silently dropped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError
from ..extract.keys import UP_DOWN_FORMATS
from ..extract.sources import WeightSource, open_source

log = logging.getLogger(__name__)

# (up suffix, down suffix): every low-rank spelling ComfyUI's loader accepts.
LOW_RANK_SUFFIXES: tuple[tuple[str, str], ...] = tuple((up, down) for up, down, _mid in UP_DOWN_FORMATS)
ALPHA_SUFFIX = ".alpha"
# Full-weight patches: no rank to reduce, so they are copied to the output unchanged.
PASSTHROUGH_SUFFIXES = (".diff", ".diff_b", ".w_norm", ".b_norm")
# Adapter families we recognise but cannot resize with a plain SVD of up @ down.
UNSUPPORTED_MARKERS: dict[str, str] = {
    ".lora_mid.weight": "LoCon CP/Tucker (lora_mid)",
    ".dora_scale": "DoRA",
    ".hada_": "LoHa",
    ".lokr_": "LoKr",
    ".oft_": "OFT",
    ".a1.weight": "GLoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """One low-rank layer of a LoRA file: where its tensors are, and its alpha (None: absent)."""

    prefix: str
    up_key: str
    down_key: str
    alpha: float | None
    rank: int
    up_shape: tuple[int, ...]
    down_shape: tuple[int, ...]

    @property
    def scale(self) -> float:
        # A module without alpha applies up @ down as is: alpha = rank (the reference tool
        # dropped such modules; ComfyUI's loader uses scale 1 for them).
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return self.up_shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.down_shape[1:])


@dataclass
class LoraFile:
    """A LoRA file, grouped into low-rank modules and passthrough tensors."""

    path: str
    source: WeightSource
    modules: dict[str, LoraModule]
    passthrough: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def factors(self, module: LoraModule, device: str | torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.source.get(module.up_key, device, dtype),
                self.source.get(module.down_key, device, dtype))


def _examples(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _check_unsupported(path: str, keys: list[str]) -> None:
    for marker, family in UNSUPPORTED_MARKERS.items():
        hits = [k for k in keys if marker in k]
        if hits:
            raise ExtractionInputError(
                f"{path}: holds {family} layers (e.g. {_examples(hits, 3)}), which resizing by "
                "SVD of up @ down does not support. Use a plain LoRA/LoCon file.")


def _read_alpha(source: WeightSource, key: str, path: str) -> float:
    t = source.get(key, "cpu", torch.float32)
    if t.numel() != 1 or not bool(torch.isfinite(t).all()):
        raise ExtractionInputError(
            f"{path}: {key!r} should be one finite number, got shape {tuple(t.shape)}. "
            "The file is corrupt.")
    return float(t.reshape(()))


def group_modules(source: WeightSource, path: str) -> tuple[dict[str, LoraModule], list[str]]:
    """Group the keys of a LoRA source into modules; error on anything not understood."""
    keys = source.keys()
    key_set = set(keys)
    _check_unsupported(path, keys)
    used: set[str] = set()
    modules: dict[str, LoraModule] = {}
    for up_sfx, down_sfx in LOW_RANK_SUFFIXES:
        for k in keys:
            if not k.endswith(up_sfx) or k in used:
                continue
            prefix = k[: -len(up_sfx)]
            down_key = prefix + down_sfx
            if down_key not in key_set:
                raise ExtractionInputError(
                    f"{path}: {k!r} has no matching {down_key!r}. The file is incomplete.")
            up_shape, down_shape = source.shape(k), source.shape(down_key)
            _check_factor_shapes(path, prefix, up_shape, down_shape)
            alpha_key = prefix + ALPHA_SUFFIX
            alpha = _read_alpha(source, alpha_key, path) if alpha_key in key_set else None
            used.update({k, down_key, alpha_key})
            modules[prefix] = LoraModule(prefix, k, down_key, alpha, down_shape[0],
                                         tuple(up_shape), tuple(down_shape))
    passthrough = [k for k in keys if k not in used and k.endswith(PASSTHROUGH_SUFFIXES)]
    used.update(passthrough)
    orphans = [k for k in keys if k not in used and k.endswith(ALPHA_SUFFIX)]
    if orphans:
        log.warning("%s: %d alpha keys without factors ignored (e.g. %s)", path, len(orphans),
                    _examples(orphans, 3))
        used.update(orphans)
    unknown = [k for k in keys if k not in used]
    if unknown:
        raise ExtractionInputError(
            f"{path}: {len(unknown)} keys of an unknown family: {_examples(unknown)}. Expected "
            "kohya/ComfyUI '.lora_down.weight'/'.lora_up.weight'/'.alpha' or PEFT "
            "'.lora_A.weight'/'.lora_B.weight' keys.")
    if not modules:
        raise ExtractionInputError(f"{path}: no LoRA layers found (no up/down weight pairs).")
    return modules, passthrough


def _check_factor_shapes(path: str, prefix: str, up: tuple[int, ...], down: tuple[int, ...]) -> None:
    ok = (len(up) >= 2 and len(down) >= 2 and up[1] == down[0] and down[0] > 0
          and all(d == 1 for d in up[2:]))
    if not ok:
        raise ExtractionInputError(
            f"{path}: layer {prefix!r} has up {list(up)} and down {list(down)}; expected up "
            "[out, r(, 1, 1)] and down [r, in(, kh, kw)] with the same r. The file is corrupt "
            "or not a LoRA.")


def read_lora_file(path: str) -> LoraFile:
    """Open a LoRA file (safetensors, or a pickle loaded with weights_only) and group its keys."""
    source = open_source(path)
    modules, passthrough = group_modules(source, path)
    metadata = dict(getattr(source, "metadata", {}) or {})
    return LoraFile(path=os.fspath(path), source=source, modules=modules, passthrough=passthrough,
                    metadata=metadata)
