"""Reading LoRA files as users have them: kohya, ComfyUI-native, PEFT, LoCon convolutions.

A LoRA file is grouped into modules by key prefix. Every key must belong to a family we
understand: low-rank pairs (``.lora_down/.lora_up``, PEFT ``.lora_A/.lora_B`` and the other
spellings ComfyUI's loader accepts) with an optional ``.alpha``; LoKr, LoHa, DoRA and matrix
``.diff`` layers (dense modules, converted to LoRA by :mod:`.adapters`); or other full-weight
patches (``.diff_b``, ``.w_norm``, ``.b_norm``, 1-D/3-D ``.diff``: copied unchanged).
Other adapter types (OFT, GLoRA, LoCon's CP ``lora_mid``) and unknown keys are an error that
lists a few examples, never silently dropped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError
from ..extract.formats.dispatch import open_source
from ..extract.keys.lora_keys import UP_DOWN_FORMATS
from ..extract.sources import WeightSource
from .adapters import DORA_SCALE, FAMILY_NAMES, LOHA_PARTS, LOKR_PARTS, DenseModule

log = logging.getLogger(__name__)

# (up suffix, down suffix): every low-rank spelling ComfyUI's loader accepts.
LOW_RANK_SUFFIXES: tuple[tuple[str, str], ...] = tuple((up, down) for up, down, _mid in UP_DOWN_FORMATS)
ALPHA_SUFFIX = ".alpha"
# Full-weight patches: no rank to reduce, so they are copied to the output unchanged.
# ".set_weight": a ComfyUI "set" patch (extract/new_tensors.py), copied as it is: ComfyUI applies
# it whatever the strength, so no weight or rescale applies to it either.
SET_WEIGHT_SUFFIX = ".set_weight"
PASSTHROUGH_SUFFIXES = (".diff", ".diff_b", ".w_norm", ".b_norm", SET_WEIGHT_SUFFIX)
# Adapter families we recognise but cannot resize with a plain SVD of up @ down.
UNSUPPORTED_MARKERS: dict[str, str] = {
    ".lora_mid.weight": "LoCon CP/Tucker (lora_mid)",
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
    dense: dict[str, DenseModule] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def tensor(self, key: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.get(key, device, dtype)

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


def _dense_modules(source: WeightSource, path: str, keys: list[str],
                   used: set[str]) -> dict[str, DenseModule]:
    """LoKr and LoHa layers, and matrix (2-D or 4-D) ``.diff`` layers, by prefix."""
    parts: dict[str, dict[str, str]] = {}
    families: dict[str, str] = {}
    for k in keys:
        for family, names in (("lokr", LOKR_PARTS), ("loha", LOHA_PARTS)):
            for n in names:
                if k.endswith("." + n):
                    prefix = k[: -len(n) - 1]
                    parts.setdefault(prefix, {})[n] = k
                    families[prefix] = family
        if k.endswith(".diff") and len(source.shape(k)) in (2, 4):
            prefix = k[: -len(".diff")]
            parts.setdefault(prefix, {})["diff"] = k
            families.setdefault(prefix, "diff")
    out: dict[str, DenseModule] = {}
    key_set = set(keys)
    for prefix, named in parts.items():
        if families[prefix] != "diff" and "diff" in named:
            raise ExtractionInputError(
                f"{path}: layer {prefix!r} has both a .diff and {families[prefix]} tensors; "
                "the file is corrupt.")
        missing = _missing_parts(families[prefix], named)
        if missing:
            raise ExtractionInputError(
                f"{path}: {FAMILY_NAMES[families[prefix]]} layer {prefix!r} lacks "
                f"{' / '.join(missing)}; the file is incomplete.")
        alpha_key = prefix + ALPHA_SUFFIX
        alpha = _read_alpha(source, alpha_key, path) if alpha_key in key_set else None
        dora = prefix + "." + DORA_SCALE
        out[prefix] = DenseModule(prefix, families[prefix], named, alpha,
                                  dora if dora in key_set else None)
        used.update(named.values())
        used.update(k for k in (alpha_key, dora) if k in key_set)
    return out


def _missing_parts(family: str, named: dict[str, str]) -> list[str]:
    """Parts a LoKr / LoHa layer needs to be computed (as ComfyUI reads them), absent here."""
    need: list[tuple[str, ...]] = []
    if family == "lokr":
        need = [("lokr_w1",) if "lokr_w1" in named else ("lokr_w1_a", "lokr_w1_b"),
                ("lokr_w2",) if "lokr_w2" in named else ("lokr_w2_a", "lokr_w2_b")]
    elif family == "loha":
        need = [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        if "hada_t1" in named or "hada_t2" in named:
            need.append(("hada_t1", "hada_t2"))
    return [p for group in need for p in group if p not in named]


def _check_dora_orphans(path: str, keys: list[str], used: set[str]) -> None:
    orphans = [k for k in keys if k.endswith("." + DORA_SCALE) and k not in used]
    if orphans:
        raise ExtractionInputError(
            f"{path}: DoRA scales without a LoRA, LoKr or LoHa layer to go with them "
            f"({_examples(orphans, 3)}); the file is incomplete.")


def group_modules(source: WeightSource, path: str
                  ) -> tuple[dict[str, LoraModule], list[str], dict[str, DenseModule]]:
    """Group the keys of a LoRA source into modules; error on anything not understood."""
    keys = source.keys()
    key_set = set(keys)
    _check_unsupported(path, keys)
    used: set[str] = set()
    dense = _dense_modules(source, path, keys, used)
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
            dora_key = prefix + "." + DORA_SCALE
            if dora_key in key_set:  # DoRA: the change depends on the base weight, so dense
                used.add(dora_key)
                dense[prefix] = DenseModule(prefix, "lora", {"lora_up": k, "lora_down": down_key},
                                            alpha, dora_key)
                continue
            modules[prefix] = LoraModule(prefix, k, down_key, alpha, down_shape[0],
                                         tuple(up_shape), tuple(down_shape))
    _check_dora_orphans(path, keys, used)
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
    if not modules and not dense:
        raise ExtractionInputError(f"{path}: no LoRA layers found (no up/down weight pairs).")
    return modules, passthrough, dense


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
    modules, passthrough, dense = group_modules(source, path)
    metadata = dict(getattr(source, "metadata", {}) or {})
    return LoraFile(path=os.fspath(path), source=source, modules=modules, passthrough=passthrough,
                    metadata=metadata, dense=dense)
