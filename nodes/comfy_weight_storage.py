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

import torch

from ..extract.formats import dequant
from .comfy_gguf_weights import gguf_type_name, gguf_weight_noise, is_gguf_weight

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


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _layout_name(weight: torch.Tensor) -> str | None:
    layout = getattr(weight, "_layout_cls", None)
    if layout is None:
        return None
    return layout if isinstance(layout, str) else getattr(layout, "__name__", str(layout))


def _scale_of(weight: torch.Tensor, module: object | None) -> torch.Tensor | None:
    params = getattr(weight, "_params", None)
    if params is not None:
        return getattr(params, "scale", None)
    scale = getattr(module, "scale_weight", None)  # 0.3.64 scaled fp8
    return scale if isinstance(scale, torch.Tensor) else None


def _format(weight: torch.Tensor, module: object | None) -> tuple[str, torch.Tensor | None]:
    """The format name and the stored codes (None: not quantized)."""
    layout = _layout_name(weight)
    if layout is not None and hasattr(weight, "_qdata"):
        qdata = weight._qdata  # type: ignore[attr-defined]
        fmt = LAYOUT_FORMATS.get(layout, layout)
        if fmt == "float8":
            fmt = dtype_name(qdata.dtype)
        if fmt in ("float8_e4m3fn", "float8_e5m2") and _scale_of(weight, module) is not None:
            fmt += " scaled"
        return fmt, qdata
    if weight.dtype in FP8_DTYPES:
        scaled = _scale_of(weight, module) is not None
        return dtype_name(weight.dtype) + (" scaled" if scaled else ""), weight.detach()
    return dtype_name(weight.dtype), None


def weight_format(weight: torch.Tensor, module: object | None) -> str:
    """How ``weight`` (the stored, unpatched weight of ``module``) is held, named as the file
    readers name formats: ``float8_e4m3fn scaled``, ``int8_tensorwise``, ``nvfp4``, ``GGUF Q8_0``,
    ``bf16``..."""
    if is_gguf_weight(weight):
        return f"GGUF {gguf_type_name(weight)}"
    return _format(weight, module)[0]


def weight_noise(weight: torch.Tensor, module: object | None) -> float | None:
    """The estimated Frobenius norm of ``weight``'s rounding error (None: not quantized, or a
    layout whose noise this pack does not estimate). One pass over the codes."""
    if is_gguf_weight(weight):
        return gguf_weight_noise(weight)
    fmt, codes = _format(weight, module)
    if codes is None:
        return None
    fmt = fmt.removesuffix(" scaled")
    scale = _scale_of(weight, module)
    with torch.no_grad():
        if fmt in ("float8_e4m3fn", "float8_e5m2") and codes.dtype in FP8_DTYPES:
            return dequant.noise_sq_fp8(codes, scale) ** 0.5
        if fmt == "int8_tensorwise" and scale is not None:
            # A convrot layer stores rotated weights; the rotation is orthogonal, so the
            # rounding noise has the same Frobenius norm as in the stored (rotated) codes.
            return dequant.noise_sq_int8(codes, scale) ** 0.5
        block_scale = getattr(getattr(weight, "_params", None), "block_scale", None)
        if fmt == "nvfp4" and scale is not None and block_scale is not None:
            return dequant.noise_sq_nvfp4(codes, scale, block_scale) ** 0.5
        if fmt == "mxfp8" and scale is not None:
            return dequant.noise_sq_mxfp8(codes, scale) ** 0.5
    return None

def describe_model(name: str, keys: list[str], format_of) -> str:
    """One report line for a MODEL: how many weights in each storage format. Keys ComfyUI's
    state dict adds beside quantized weights (their scales and configs: not parameters, not
    attributes of the module) are not counted."""
    from collections import Counter

    from ..extract.pairing import SYNTHETIC_SUFFIXES

    counts = Counter(format_of(k) for k in keys if not k.endswith(SYNTHETIC_SUFFIXES))
    return f"{name}: " + (", ".join(f"{n} {f}" for f, n in counts.most_common())
                          + " tensors" if counts else "no tensors")
