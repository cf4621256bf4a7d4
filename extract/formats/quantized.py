"""Safetensors files in ComfyUI's quantized formats, read as the float weights ComfyUI computes.

Formats (how ComfyUI marks them, and how it turns them into float weights):

- plain fp8 (``float8_e4m3fn`` / ``float8_e5m2`` weights, nothing else): the codes are the
  values (``weight.to(compute_dtype)``).
- scaled fp8 (a ``scaled_fp8`` marker tensor, ``<layer>.scale_weight`` and optionally
  ``<layer>.scale_input``): ``weight * scale_weight`` (0.3.64 ``scaled_fp8_ops``; the newest
  ComfyUI converts the file to ``comfy_quant`` float8_e4m3fn layers with the same scale).
- per-layer quantization (``_quantization_metadata`` in the header, and/or ``<layer>.comfy_quant``
  JSON tensors; scales ``weight_scale``, ``weight_scale_2``): float8_e4m3fn, float8_e5m2,
  int8_tensorwise, nvfp4, mxfp8 as the newest ``comfy/ops.py`` loads them.

Scale, marker and config tensors are hidden (they are not weights). A weight stored as integer
codes with no known format, or a layer whose format this reader cannot decode, is refused when
the file is opened, with the key and the format named, never read as numbers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import ExtractionInputError
from . import dequant

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Storage dtypes that hold codes rather than values unless a format says how to decode them.
CODE_DTYPES = (torch.int8, torch.uint8)
SCALED_FP8_MARKER = "scaled_fp8"
# Companion tensors of a quantized layer (suffixes after ``<layer>.``); never weights.
COMPANION_NAMES = ("comfy_quant", "weight_scale", "weight_scale_2", "input_scale",
                   "pre_quant_scale", "scale_weight", "scale_input", "weight_s_rel",
                   "weight_s_channel", "weight_codebook")
SUPPORTED = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64", torch.float8_e4m3fn: "float8_e4m3fn",
                torch.float8_e5m2: "float8_e5m2"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class LayerFormat:
    """How one weight is stored: the algorithm and the keys of its scales."""

    algo: str                          # one of SUPPORTED, or "scaled_fp8" (legacy)
    scale_key: str | None = None       # weight_scale / scale_weight
    scale2_key: str | None = None      # nvfp4 per-tensor scale (weight_scale_2)


def _is_marker(key: str) -> bool:
    return key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER)


def _layer_of(key: str) -> tuple[str, str]:
    layer, _, name = key.rpartition(".")
    return layer, name


def _unsupported(path: str, weight_key: str, fmt: object, why: str = "") -> ExtractionInputError:
    return ExtractionInputError(
        f"{path}: weight {weight_key!r} is stored in the quantized format {fmt!r}, which this "
        f"pack cannot dequantize{why} (supported: scaled fp8, {', '.join(SUPPORTED)}). Extract "
        "from the full-precision (bf16/fp16) file, or from a copy of this model in a supported "
        "format.")


class QuantizedSource:
    """A raw source (safetensors file, or shards of one) whose quantized weights it dequantizes.

    Not a ``SafetensorsSource``: the raw fast paths (``read_elements``) would hand out codes.
    ``get`` returns float32 (or the asked dtype) and remembers each weight's rounding-noise
    estimate, so ``quantization_noise`` after ``get`` costs nothing.
    """

    host_weights = True  # file data: the streamer stages it like a plain file's

    def __init__(self, raw: object, path: str | None = None) -> None:
        self.raw = raw
        self.name = raw.name  # type: ignore[attr-defined]
        self.path = path or getattr(raw, "path", self.name)
        self.metadata: dict[str, str] = dict(getattr(raw, "metadata", {}) or {})
        self._formats: dict[str, LayerFormat] = {}
        self._hidden: set[str] = set()
        self._noise_sq: dict[str, float] = {}
        self._scales: dict[str, torch.Tensor] = {}
        self._scan()
        self._keys = [k for k in raw.keys() if k not in self._hidden]  # type: ignore[attr-defined]

    # -- detection ---------------------------------------------------------------------------
    def _scan(self) -> None:
        raw_keys: list[str] = self.raw.keys()  # type: ignore[attr-defined]
        keyset = set(raw_keys)
        configs = self._layer_configs(raw_keys)
        legacy = any(_is_marker(k) for k in raw_keys)
        for k in raw_keys:
            layer, name = _layer_of(k)
            if _is_marker(k) or (name in COMPANION_NAMES and f"{layer}.weight" in keyset) \
                    or (name == "comfy_quant"):
                self._hidden.add(k)
        for layer, conf in configs.items():
            wkey = f"{layer}.weight"
            if wkey not in keyset:
                continue  # a config without its weight: nothing to read (the config is hidden)
            fmt = conf.get("format") if isinstance(conf, dict) else None
            self._formats[wkey] = self._checked_format(wkey, fmt, conf, keyset)
        for k in raw_keys:
            if k in self._hidden or k in self._formats:
                continue
            layer, name = _layer_of(k)
            dt = self.raw.dtype(k)  # type: ignore[attr-defined]
            if f"{layer}.scale_weight" in keyset and name == "weight":
                # Legacy scaled fp8 (0.3.64 applies the scale when the marker is present; a scale
                # beside a weight means the same thing without it).
                if dt not in FP8_DTYPES:
                    raise _unsupported(self.path, k, f"scale_weight on {dtype_name(dt)}")
                self._formats[k] = LayerFormat("scaled_fp8", scale_key=f"{layer}.scale_weight")
            elif name == "weight" and (f"{layer}.weight_scale" in keyset
                                       or f"{layer}.weight_scale_2" in keyset):
                raise ExtractionInputError(
                    f"{self.path}: weight {k!r} ({dtype_name(dt)}) has a {layer}.weight_scale "
                    "tensor but no quantization format (no comfy_quant tensor and no "
                    "_quantization_metadata entry): its values cannot be trusted as numbers. "
                    "Re-save the file with ComfyUI, or extract from the full-precision file.")
            elif dt in FP8_DTYPES:
                self._formats[k] = LayerFormat(dtype_name(dt))  # unscaled: codes are values
            elif dt in CODE_DTYPES and (name == "weight" or len(self.raw.shape(k)) >= 2):  # type: ignore[attr-defined]
                raise ExtractionInputError(
                    f"{self.path}: tensor {k!r} is stored as {dtype_name(dt)} codes with no "
                    "quantization format this pack knows (no comfy_quant / "
                    "_quantization_metadata / scaled_fp8 entry for it). Reading the codes as "
                    "numbers would give a wrong LoRA. Extract from the full-precision file, or "
                    "from a GGUF/ComfyUI-quantized copy.")
        if legacy and not any(f.algo == "scaled_fp8" for f in self._formats.values()):
            log.info("%s: scaled_fp8 marker without scale_weight tensors", self.path)

    def _layer_configs(self, raw_keys: list[str]) -> dict[str, object]:
        configs: dict[str, object] = {}
        meta = self.metadata.get("_quantization_metadata")
        if meta is not None:
            try:
                layers = json.loads(meta)["layers"]
                if not isinstance(layers, dict):
                    raise TypeError("layers is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ExtractionInputError(
                    f"{self.path}: the header's _quantization_metadata is not valid ({e}); the "
                    "file is corrupt. Re-download or re-save it.") from e
            configs.update(layers)
        for k in raw_keys:
            layer, name = _layer_of(k)
            if name != "comfy_quant":
                continue
            t = self.raw.get(k, "cpu")  # type: ignore[attr-defined]
            try:
                configs[layer] = json.loads(t.view(torch.uint8).numpy().tobytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ExtractionInputError(
                    f"{self.path}: {k!r} is not a JSON layer config ({e}); the file is corrupt.") from e
        return configs

    def _checked_format(self, wkey: str, fmt: object, conf: object, keyset: set[str]) -> LayerFormat:
        layer = wkey[: -len(".weight")]
        if fmt not in SUPPORTED:
            raise _unsupported(self.path, wkey, fmt)
        params = conf.get("params", {}) if isinstance(conf, dict) else {}
        if fmt == "int8_tensorwise" and isinstance(conf, dict) and (
                conf.get("convrot") or (isinstance(params, dict) and params.get("convrot"))):
            raise _unsupported(self.path, wkey, "int8_tensorwise with convrot",
                               " (its weights are stored rotated)")
        scale = f"{layer}.weight_scale"
        needs = [scale] + ([f"{layer}.weight_scale_2"] if fmt == "nvfp4" else [])
        if fmt in ("int8_tensorwise", "nvfp4", "mxfp8"):
            missing = [k for k in needs if k not in keyset]
            if missing:
                raise ExtractionInputError(
                    f"{self.path}: {fmt} weight {wkey!r} has no {missing[0]!r} tensor; the file "
                    "is incomplete. Re-download or re-save it.")
        shape = tuple(self.raw.shape(wkey))  # type: ignore[attr-defined]
        if fmt in ("nvfp4", "mxfp8"):
            block = dequant.NVFP4_BLOCK // 2 if fmt == "nvfp4" else dequant.MXFP8_BLOCK
            if len(shape) != 2 or shape[1] % block:
                raise _unsupported(self.path, wkey, fmt, f" with stored shape {list(shape)}")
        return LayerFormat(str(fmt), scale_key=scale if scale in keyset else None,
                           scale2_key=f"{layer}.weight_scale_2" if fmt == "nvfp4" else None)

    # -- the source protocol -----------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self.raw.shape(key))  # type: ignore[attr-defined]
        fmt = self._formats.get(key)
        if fmt is not None and fmt.algo == "nvfp4":
            return (shape[0], shape[1] * 2)
        return shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype ``get`` returns by default (float32 for quantized weights)."""
        return torch.float32 if key in self._formats else self.raw.dtype(key)  # type: ignore[attr-defined]

    def _scale(self, key: str | None, device: torch.device) -> torch.Tensor | None:
        if key is None:
            return None
        t = self._scales.get(key)
        if t is None:
            t = self._scales[key] = self.raw.get(key, "cpu")  # type: ignore[attr-defined]
        return t.to(device)

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        fmt = self._formats.get(key)
        if fmt is None:
            return self.raw.get(key, device, dtype)  # type: ignore[attr-defined]
        dev = torch.device(device)
        codes = self.raw.get(key, dev)  # type: ignore[attr-defined]
        scale = self._scale(fmt.scale_key, dev)
        if fmt.algo == "nvfp4":
            ts = self._scale(fmt.scale2_key, dev)
            assert ts is not None and scale is not None
            out = dequant.dequantize_nvfp4(codes, ts, scale)
            noise = dequant.noise_sq_nvfp4(codes, ts, scale)
        elif fmt.algo == "mxfp8":
            assert scale is not None
            out = dequant.dequantize_mxfp8(codes, scale)
            noise = dequant.noise_sq_mxfp8(codes, scale)
        elif fmt.algo == "int8_tensorwise":
            assert scale is not None
            out = dequant.dequantize_scaled(codes, _broadcastable(scale, codes))
            noise = dequant.noise_sq_int8(codes, scale)
        else:  # plain, scaled or comfy_quant fp8
            s = None if scale is None else _broadcastable(scale, codes)
            out = dequant.dequantize_scaled(codes, s)
            noise = dequant.noise_sq_fp8(codes, scale)
        self._noise_sq[key] = noise
        return out if dtype is None or dtype == torch.float32 else out.to(dtype)

    # -- the optional format interface ---------------------------------------------------------
    def format_of(self, key: str) -> str:
        fmt = self._formats.get(key)
        if fmt is None:
            return dtype_name(self.raw.dtype(key))  # type: ignore[attr-defined]
        if fmt.algo == "scaled_fp8":
            return f"{dtype_name(self.raw.dtype(key))} scaled"  # type: ignore[attr-defined]
        if fmt.algo in ("float8_e4m3fn", "float8_e5m2") and fmt.scale_key is not None:
            return f"{fmt.algo} scaled"
        return fmt.algo

    def quantization_noise(self, key: str) -> float | None:
        if key not in self._formats:
            return None
        if key not in self._noise_sq:
            self.get(key, "cpu")
        return self._noise_sq[key] ** 0.5

    def describe(self) -> str:
        counts = Counter(self.format_of(k) for k in self._formats)
        others = len(self._keys) - len(self._formats)
        parts = [f"{n} {fmt}" for fmt, n in counts.most_common()]
        kind = ("scaled fp8" if any(f.algo == "scaled_fp8" for f in self._formats.values())
                else "ComfyUI per-layer quantization" if any(
                    f.algo in SUPPORTED and f.scale_key for f in self._formats.values())
                else "fp8")
        return (f"{os.path.basename(self.path)}: {kind} ({', '.join(parts)} weights"
                f"{f'; {others} other tensors unquantized' if others else ''})")

    def identity_parts(self) -> list[object]:
        return [self.raw]

    def close(self) -> None:
        close = getattr(self.raw, "close", None)
        if callable(close):
            close()


def _broadcastable(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A scalar stays a scalar; a per-row scale ``[rows]`` or ``[rows, 1]`` broadcasts by row."""
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == codes.shape[0]:
        return scale.reshape(codes.shape[0], *([1] * (codes.dim() - 1)))
    return scale


def needs_dequantization(raw: object) -> bool:
    """Whether a raw safetensors source holds anything but plain float weights."""
    meta = getattr(raw, "metadata", {}) or {}
    if "_quantization_metadata" in meta:
        return True
    for k in raw.keys():  # type: ignore[attr-defined]
        if _is_marker(k) or _layer_of(k)[1] in COMPANION_NAMES:
            return True
        if raw.dtype(k) in FP8_DTYPES + CODE_DTYPES:  # type: ignore[attr-defined]
            return True
    return False
