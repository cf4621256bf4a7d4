"""Run inside a ComfyUI venv (cwd: the ComfyUI root): the float32 weights ComfyUI's own code
computes from a quantized safetensors file, written to another safetensors file.

usage: python comfy_dequant.py IN.safetensors OUT.safetensors

Scaled fp8 (``scaled_fp8`` marker): ComfyUI 0.3.64's ``scaled_fp8_ops`` Linear loads the
weight and its ``scale_weight`` and ``convert_weight`` multiplies them (compute dtype float32);
the newest ComfyUI converts such a file with ``comfy.utils.convert_old_quants`` into
``comfy_quant`` float8_e4m3fn layers, dequantized as below.
``comfy_quant`` layers (newest ComfyUI): the layout class ``comfy.quant_ops`` registers for the
layer's format dequantizes the stored tensors with ``orig_dtype=float32``; without ComfyUI's
quant_ops, ``comfy_kitchen``'s layout classes (the code ComfyUI calls) are used directly.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def _layouts():
    try:
        import comfy.quant_ops as qo
        return lambda fmt: qo.get_layout_class(qo.QUANT_ALGOS[fmt]["comfy_tensor_layout"])
    except ImportError:
        import comfy_kitchen.tensor as ckt
        table = {"float8_e4m3fn": ckt.TensorCoreFP8Layout, "float8_e5m2": ckt.TensorCoreFP8Layout,
                 "int8_tensorwise": ckt.TensorWiseINT8Layout, "nvfp4": ckt.TensorCoreNVFP4Layout,
                 "mxfp8": ckt.TensorCoreMXFP8Layout}
        return table.__getitem__


def scaled_fp8(sd):
    import comfy.ops
    out = {}
    dtype = sd["scaled_fp8"].dtype
    ops = comfy.ops.scaled_fp8_ops(override_dtype=dtype)
    for k, w in sd.items():
        layer = k[: -len(".weight")]
        if not k.endswith(".weight") or f"{layer}.scale_weight" not in sd:
            continue
        lin = ops.Linear(w.shape[1], w.shape[0], bias=False, device="cpu")
        lin.load_state_dict({"weight": w, "scale_weight": sd[f"{layer}.scale_weight"]},
                            strict=False)
        out[k] = lin.convert_weight(lin.weight.to(torch.float32))
    return out


def comfy_quant(sd, meta):
    layers = json.loads(meta["_quantization_metadata"])["layers"] if "_quantization_metadata" in meta else {}
    for k in sd:
        if k.endswith(".comfy_quant"):
            layers[k[: -len(".comfy_quant")]] = json.loads(sd[k].numpy().tobytes())
    layout_of = _layouts()
    out = {}
    for layer, conf in layers.items():
        fmt, w = conf["format"], sd[f"{layer}.weight"]
        cls = layout_of(fmt)
        extra = {}
        if fmt == "nvfp4":
            shape = (w.shape[0], w.shape[1] * 2)
            scale = sd[f"{layer}.weight_scale_2"]
            extra["block_scale"] = sd[f"{layer}.weight_scale"].view(torch.float8_e4m3fn)
        elif fmt == "mxfp8":
            shape, scale = tuple(w.shape), sd[f"{layer}.weight_scale"].view(torch.float8_e8m0fnu)
        else:
            shape, scale = tuple(w.shape), sd[f"{layer}.weight_scale"]
        params = cls.Params(scale=scale, orig_dtype=torch.float32, orig_shape=shape, **extra)
        out[f"{layer}.weight"] = cls.dequantize(w, params).float()
    return out


def main(src, dst):
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(src)
    if "scaled_fp8" in sd:
        import comfy.ops
        if hasattr(comfy.ops, "scaled_fp8_ops"):
            out = scaled_fp8(sd)
        else:  # the newest ComfyUI converts the file to comfy_quant layers when it loads it
            import comfy.utils
            converted, _ = comfy.utils.convert_old_quants(dict(sd), "", meta)
            out = comfy_quant(converted, {})
    else:
        out = comfy_quant(sd, meta)
    save_file({k: v.contiguous() for k, v in out.items()}, dst)


if __name__ == "__main__":
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # no GPU needed to read weights
    main(sys.argv[1], sys.argv[2])
