"""Against a real ComfyUI server: MODELs loaded by ComfyUI's own UNETLoader from quantized files
(scaled fp8; ``comfy_quant`` float8_e4m3fn where the ComfyUI has per-layer quantization), then
LoraExtract, then LoraLoaderModelOnly.

Runs when ``COMFYUI_ROOT`` points at the ComfyUI checkout whose server (``COMFY_URL``, default
http://127.0.0.1:8188; log ``COMFY_LOG``) runs with this pack, and the tiny Wan 2.1 pair of
``make_tiny_models.py`` is in ``models/diffusion_models``; skipped otherwise. The test writes
the quantized copies of that pair beside it and removes them afterwards.

Checks: the node's summary shows the quantization noise floor and each input's format; every
LoRA layer at rank 8 (exact SVD, fp32, no clamp) is within 1.001x the optimal
rank-8 error of the dequantized difference (the files' codes times their scales, computed here
in float32), and LoraLoaderModelOnly applies the file with no "lora key not loaded".
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.support.quant_files import write_comfy_quant, write_scaled_fp8

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="COMFYUI_ROOT is not set (no real ComfyUI here)")
ARCH = "tiny_wan21"
RANK = 8


@pytest.fixture(scope="module")
def server():
    from tests.integration.comfy_http import ComfyServer

    log = os.environ.get("COMFY_LOG", os.path.expanduser("~/comfyui-run/server.log"))
    s = ComfyServer(os.environ.get("COMFY_URL", "http://127.0.0.1:8188"), log)
    if not s.alive():
        pytest.skip(f"no ComfyUI server answering at {s.url}")
    if not s.object_info("LoraExtract"):
        pytest.fail("the server runs without the LoraExtract node: is the pack installed?")
    return s


def _write(fmt: str, src: str, dst: str) -> dict[str, torch.Tensor]:
    """A quantized copy of ``src`` (every 2-D weight quantized); returns the float32 weights
    the file stands for."""
    sd = load_file(src)
    weights = {k: v for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}
    others = {k: v for k, v in sd.items() if k not in weights}
    if fmt == "scaled_fp8":
        return write_scaled_fp8(dst, weights, others)
    return write_comfy_quant(dst, weights, others, "float8_e4m3fn")


def _lora_matrices(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{model key: up @ down * alpha / rank}`` of the LoRA's linear layers (comfy keys)."""
    out = {}
    for k, up in lora.items():
        if not k.endswith(".lora_up.weight") or up.dim() != 2:
            continue
        prefix = k[: -len(".lora_up.weight")]
        down = lora[f"{prefix}.lora_down.weight"]
        alpha = float(lora.get(f"{prefix}.alpha", torch.tensor(float(down.shape[0]))))
        key = prefix.removeprefix("diffusion_model.") + ".weight"
        out[key] = (up.double() @ down.double()) * (alpha / down.shape[0])
    return out


@pytest.mark.parametrize("fmt", ["scaled_fp8", "comfy_quant_fp8"])
def test_quantized_models_extract_and_load_on_real_comfyui(server, fmt: str) -> None:
    models = os.path.join(ROOT, "models", "diffusion_models")
    if not os.path.exists(os.path.join(models, f"{ARCH}_base.safetensors")):
        pytest.skip(f"{ARCH} models not generated")
    if fmt == "comfy_quant_fp8" and not os.path.exists(os.path.join(ROOT, "comfy", "quant_ops.py")):
        pytest.skip("this ComfyUI has no per-layer quantization (comfy/quant_ops.py)")
    tag = f"itest_q_{fmt}_{int(time.time() * 1000)}"
    names = {role: f"{tag}_{role}.safetensors" for role in ("base", "tuned")}
    truth = {role: _write(fmt, os.path.join(models, f"{ARCH}_{role}.safetensors"),
                          os.path.join(models, names[role])) for role in names}
    made = [os.path.join(models, n) for n in names.values()]
    try:
        extract = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["tuned"], "weight_dtype": "default"}},
            "2": {"class_type": "UNETLoader", "inputs": {"unet_name": names["base"], "weight_dtype": "default"}},
            "3": {"class_type": "LoraExtract", "inputs": {
                "finetuned_model": ["1", 0], "original_model": ["2", 0],
                "filename_prefix": f"loras/{tag}", "rank": RANK, "lora_type": "standard",
                "algorithm": "svd_linalg", "lowrank_iters": 7, "output_dtype": "fp32",
                "bias_diff": True, "adaptive_param": 0.15, "clamp_quantile": False,
                "conv_rank": RANK, "alpha": 0.0, "key_style": "comfy", "save_to": "models/loras"}},
        }
        res = server.run(extract)
        assert res.status == "success", json.dumps(res.messages)[-3000:]
        (lora_file,) = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
        # The node's summary shows the floor and what each side was.
        summary = res.outputs["3"]["text"][0]
        assert "quantization noise floor: median" in summary, summary[:2000]
        assert "base: " in summary and "float8_e4m3fn scaled" in summary, summary[:2000]
        made.append(lora_file)
        layers = _lora_matrices(load_file(lora_file))
        quantized = [k for k in truth["base"] if k.endswith(".weight") and truth["base"][k].dim() == 2]
        assert sorted(layers) == sorted(quantized)
        ratios, optima = [], []
        for k in quantized:
            d = truth["tuned"][k].double() - truth["base"][k].double()
            s = torch.linalg.svdvals(d)
            fro = float(d.norm())
            optimum = float(s[RANK:].square().sum().sqrt()) / fro
            error = float((d - layers[k]).norm()) / fro
            ratios.append(error / optimum)
            optima.append(optimum)
        print(f"{fmt}: {len(ratios)} layers, error / optimum: median {statistics.median(ratios):.6f}, "
              f"worst {max(ratios):.6f}; optimal rank-{RANK} error median "
              f"{statistics.median(optima):.4f}")
        assert max(ratios) <= 1.001

        apply = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["base"], "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["1", 0], "lora_name": os.path.basename(lora_file), "strength_model": 1.0}},
            "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": f"itest/{tag}"}},
        }
        res = server.run(apply)
        assert res.status == "success", json.dumps(res.messages)[-3000:]
        made.extend(glob.glob(os.path.join(ROOT, "output", "itest", f"{tag}_*.safetensors")))
        assert "lora key not loaded" not in res.log, res.log
    finally:
        for p in made:
            if os.path.exists(p):
                os.remove(p)
