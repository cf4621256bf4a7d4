"""How a weight ComfyUI holds in a loaded MODEL is stored, and its rounding noise.

ComfyUI hands over quantized weights in two ways (read from its source, 0.3.64 and 2026-08):

- 0.3.64 ``scaled_fp8_ops`` (and the ``fp8_e4m3fn`` weight dtypes of the loaders): the module's
  ``weight`` is an fp8 tensor; a scaled file adds a ``scale_weight`` attribute on the module
  (a float32 scalar, or absent/None when unscaled). ComfyUI computes ``weight * scale_weight``.
- the newest ComfyUI (``comfy/ops.py`` mixed precision ops, ``comfy_kitchen``): the module's
  ``weight`` is a ``QuantizedTensor`` holding the stored codes (``_qdata``), the name of its
  layout class (``_layout_cls``) and the layout's parameters (``_params``: ``scale``, for NVFP4
  also ``block_scale``). Old scaled-fp8 files are converted to this form when loaded.

Only attributes are read here (no ComfyUI import), so the functions are testable with plain
tensors and modules. The noise estimates are the file reader's (``extract/formats/dequant``),
applied to the codes and scales ComfyUI holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..extract.formats import dequant

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64", torch.float8_e4m3fn: "float8_e4m3fn",
                torch.float8_e5m2: "float8_e5m2"}

# comfy_kitchen layout class names (as ComfyUI registers them) -> the per-layer format name
# of the file (the ``format`` of a ``comfy_quant`` entry).
LAYOUT_FORMATS = {
    "TensorCoreFP8Layout": "float8",
    "TensorCoreFP8E4M3Layout": "float8_e4m3fn",
    "TensorCoreFP8E5M2Layout": "float8_e5m2",
    "TensorWiseINT8Layout": "int8_tensorwise",
    "TensorCoreNVFP4Layout": "nvfp4",
    "TensorCoreMXFP8Layout": "mxfp8",
    "TensorCoreConvRotW4A4Layout": "convrot_w4a4",
    "AsymW4A8Int8Layout": "asym_w4a8_int8",
}


@dataclass(frozen=True)
class WeightStorage:
    """The format name (as the file reader names it) and the estimated rounding-noise norm
    (None: not quantized, or a format whose noise is not estimated)."""

    format: str
    noise: float | None


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _layout_name(weight: torch.Tensor) -> str | None:
    layout = getattr(weight, "_layout_cls", None)
    if layout is None:
        return None
    return layout if isinstance(layout, str) else getattr(layout, "__name__", str(layout))


def _quantized_tensor_storage(weight: torch.Tensor, layout: str) -> WeightStorage:
    qdata = weight._qdata  # type: ignore[attr-defined]
    params = getattr(weight, "_params", None)
    scale = getattr(params, "scale", None)
    fmt = LAYOUT_FORMATS.get(layout, layout)
    if fmt == "float8":
        fmt = dtype_name(qdata.dtype)
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        if qdata.dtype not in FP8_DTYPES:
            return WeightStorage(fmt, None)
        return WeightStorage(f"{fmt} scaled" if scale is not None else fmt,
                             dequant.noise_sq_fp8(qdata, scale) ** 0.5)
    if fmt == "int8_tensorwise" and scale is not None:
        # A convrot layer stores rotated weights; the rotation is orthogonal, so the rounding
        # noise has the same Frobenius norm as in the stored (rotated) codes.
        return WeightStorage(fmt, dequant.noise_sq_int8(qdata, scale) ** 0.5)
    block_scale = getattr(params, "block_scale", None)
    if fmt == "nvfp4" and scale is not None and block_scale is not None:
        return WeightStorage(fmt, dequant.noise_sq_nvfp4(qdata, scale, block_scale) ** 0.5)
    if fmt == "mxfp8" and scale is not None:
        return WeightStorage(fmt, dequant.noise_sq_mxfp8(qdata, scale) ** 0.5)
    return WeightStorage(fmt, None)  # a layout whose noise this pack does not estimate


def weight_storage(weight: torch.Tensor, module: object | None) -> WeightStorage:
    """How ``weight`` (the stored, unpatched weight of ``module``) is held by ComfyUI."""
    with torch.no_grad():
        layout = _layout_name(weight)
        if layout is not None and hasattr(weight, "_qdata"):
            return _quantized_tensor_storage(weight, layout)
        if weight.dtype in FP8_DTYPES:
            scale = getattr(module, "scale_weight", None)
            if not isinstance(scale, torch.Tensor):
                scale = None
            name = dtype_name(weight.dtype) + (" scaled" if scale is not None else "")
            return WeightStorage(name, dequant.noise_sq_fp8(weight.detach(), scale) ** 0.5)
        return WeightStorage(dtype_name(weight.dtype), None)


def describe_model(name: str, keys: list[str], format_of) -> str:
    """One report line for a MODEL: how many weights in each storage format. Keys ComfyUI's
    state dict adds beside quantized weights (their scales and configs: not parameters, not
    attributes of the module) are not counted."""
    from collections import Counter

    from ..extract.pairing import SYNTHETIC_SUFFIXES

    counts = Counter(format_of(k) for k in keys if not k.endswith(SYNTHETIC_SUFFIXES))
    return f"{name}: " + (", ".join(f"{n} {f}" for f, n in counts.most_common())
                          + " tensors" if counts else "no tensors")
