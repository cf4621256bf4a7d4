"""LoKr, LoHa, DoRA and full-difference layers: the weight change they make, as ComfyUI makes it.

ComfyUI's loader (``comfy/weight_adapter/``) turns each of these into a dense change of the
weight; we compute the same change (float32, strength 1) so the resizer can take its SVD and
write a plain LoRA of the best rank for the target:

- LoKr: ``kron(w1, w2)``, each factor stored whole (``lokr_w1``) or as a product
  (``lokr_w1_a @ lokr_w1_b``; ``lokr_w2`` may be a CP/Tucker product with ``lokr_t2``). The
  ``alpha / dim`` scale applies once to the Kronecker product; ``dim`` is the rank of the last
  factor stored as a product, and without one (or without alpha) the scale is 1.
- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise; CP with ``hada_t1``/``hada_t2``),
  scaled by ``alpha / rank(w1_b)``.
- full difference: ``.diff`` is the change itself.
- DoRA (``dora_scale`` next to any of the above): the new weight is
  ``(W + delta) * dora_scale / norm``, where ``norm`` is per output row of the *original* W when
  ``dora_scale`` has one entry per output, else per input column of ``W + delta``. So its change
  depends on the base weight: without the base model it cannot be computed.

At strength ``s`` ComfyUI applies ``s`` times that change (DoRA included), so a merge weight
multiplies the change exactly as the loader's strength would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError

LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
DORA_SCALE = "dora_scale"
FAMILY_NAMES = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA", "diff": "full difference"}

GetTensor = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class DenseModule:
    """A layer whose change is computed densely: its family, tensors by part name, alpha, DoRA."""

    prefix: str
    family: str                                  # "lokr" | "loha" | "lora" (with DoRA) | "diff"
    keys: dict[str, str] = field(hash=False)     # part name ("lokr_w1", "lora_up", ...) -> file key
    alpha: float | None = None
    dora_key: str | None = None

    @property
    def label(self) -> str:
        name = FAMILY_NAMES[self.family]
        if self.dora_key is None:
            return name
        return "DoRA" if self.family == "lora" else f"{name}+DoRA"

    @property
    def all_keys(self) -> list[str]:
        keys = list(self.keys.values())
        return keys + ([self.dora_key] if self.dora_key else [])


def _cp(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # CP/Tucker rebuild: [r, r, kh, kw] core with b [r, in] and a [r, out] -> [out, in, kh, kw]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def _lokr(m: DenseModule, get: GetTensor) -> tuple[torch.Tensor, float]:
    k = m.keys
    dim = None
    if "lokr_w1" in k:
        w1 = get(k["lokr_w1"])
    else:
        _require(m, ("lokr_w1_a", "lokr_w1_b"))
        w1_b = get(k["lokr_w1_b"])
        dim = w1_b.shape[0]
        w1 = get(k["lokr_w1_a"]) @ w1_b
    if "lokr_w2" in k:
        w2 = get(k["lokr_w2"])
    else:
        _require(m, ("lokr_w2_a", "lokr_w2_b"))
        w2_a, w2_b = get(k["lokr_w2_a"]), get(k["lokr_w2_b"])
        dim = w2_b.shape[0]
        w2 = _cp(get(k["lokr_t2"]), w2_b, w2_a) if "lokr_t2" in k else w2_a @ w2_b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = m.alpha / dim if (m.alpha is not None and dim is not None) else 1.0
    # contiguous: torch.kron fails on the strided result of the CP einsum
    return torch.kron(w1.contiguous(), w2.contiguous()), scale


def _loha(m: DenseModule, get: GetTensor) -> tuple[torch.Tensor, float]:
    _require(m, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    k = m.keys
    w1a, w1b, w2a, w2b = (get(k[n]) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    scale = m.alpha / w1b.shape[0] if m.alpha is not None else 1.0
    if "hada_t1" in k:
        _require(m, ("hada_t2",))
        m1, m2 = _cp(get(k["hada_t1"]), w1b, w1a), _cp(get(k["hada_t2"]), w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return m1 * m2, scale


def _lora(m: DenseModule, get: GetTensor) -> tuple[torch.Tensor, float]:
    up, down = get(m.keys["lora_up"]), get(m.keys["lora_down"])
    scale = m.alpha / down.shape[0] if m.alpha is not None else 1.0
    return up.flatten(1) @ down.flatten(1), scale


def _require(m: DenseModule, parts: tuple[str, ...]) -> None:
    missing = [p for p in parts if p not in m.keys]
    if missing:
        raise ExtractionInputError(
            f"{m.label} layer {m.prefix!r} lacks {', '.join(m.prefix + '.' + p for p in missing)}; "
            "the file is incomplete.")


def raw_change(m: DenseModule, get: GetTensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The change before any DoRA normalisation, reshaped to the target weight's ``shape``."""
    if m.family == "diff":
        diff, scale = get(m.keys["diff"]), 1.0
    else:
        diff, scale = {"lokr": _lokr, "loha": _loha, "lora": _lora}[m.family](m, get)
    if diff.numel() != math.prod(shape):
        raise ExtractionInputError(
            f"{m.label} layer {m.prefix!r} makes a change of shape {list(diff.shape)} "
            f"({diff.numel()} values) but its base weight is {list(shape)}. Pick the base model "
            "this file was trained on.")
    return diff.reshape(shape) * scale


def dense_change(m: DenseModule, get: GetTensor, shape: tuple[int, ...],
                 base_weight: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """``W_new - W`` at strength 1, float32, in the target weight's ``shape``.

    ``base_weight`` gives W in ``shape``; only DoRA needs it.
    """
    delta = raw_change(m, get, shape).float()
    if m.dora_key is None:
        return delta
    if base_weight is None:
        raise ExtractionInputError(
            f"{m.label} layer {m.prefix!r}: DoRA rescales the patched weight by its norm, so "
            "converting it needs the base model; give the base checkpoint.")
    w = base_weight().float().reshape(shape)
    mag = get(m.dora_key).float()
    patched = w + delta
    if mag.shape[0] == shape[0] and mag.numel() == shape[0]:
        # ComfyUI takes this norm of the original weight (not the patched one), per output row.
        norm = w.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
    elif mag.numel() == shape[1]:
        norm = patched.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
        norm = norm.reshape(shape[1], *[1] * (len(shape) - 1)).transpose(0, 1)
    else:
        raise ExtractionInputError(
            f"DoRA layer {m.prefix!r}: dora_scale has shape {list(mag.shape)}, which matches "
            f"neither the outputs ({shape[0]}) nor the inputs ({shape[1]}) of its base weight "
            f"{list(shape)}.")
    norm = norm + torch.finfo(torch.float32).eps
    return patched * (mag.reshape(norm.shape) / norm) - w
