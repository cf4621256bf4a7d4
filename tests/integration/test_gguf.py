"""GGUF against the real thing: ComfyUI-GGUF's loader and a real ComfyUI server.

Runs when ``COMFYUI_ROOT`` (a ComfyUI checkout with the tiny model pairs of the integration
setup in ``models/diffusion_models``), ``COMFY_VENV`` (its Python) and ``COMFYUI_GGUF_DIR``
(a ComfyUI-GGUF checkout, also installed in that ComfyUI's custom nodes) are set; the server
tests also need the server at ``COMFY_URL``. Skipped otherwise.

Checks: (a) every tensor of a GGUF file (F16, BF16, Q8_0, Q4_0, Q6_K) read by our reader equals
ComfyUI-GGUF's loader + ``dequantize_tensor`` (float32 setting) bit for bit; (b) LoraExtract on
two UnetLoaderGGUF MODELs gives, layer by layer, at most 1.001x the optimal rank-8 error of the
dequantized difference, and LoraLoaderModelOnly loads the file onto a GGUF MODEL with no "lora
key not loaded"; (c) the command line on a Q8_0 fine-tune over the bf16 base file.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.paths import repo_module

ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV")
GGUF_DIR = os.environ.get("COMFYUI_GGUF_DIR")
pytestmark = pytest.mark.skipif(not (ROOT and VENV and GGUF_DIR),
                                reason="COMFYUI_ROOT, COMFY_VENV and COMFYUI_GGUF_DIR are not all set")
pytest.importorskip("gguf")

ARCH = "tiny_wan21"
SUBDIR = "lora_extract_gguf_itest"
TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q6_K")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def gguf_pairs() -> dict[str, tuple[str, str]]:
    write_gguf_pair_from_safetensors = repo_module("benchmarks/gguf_files.py").write_gguf_pair_from_safetensors

    models = os.path.join(ROOT, "models", "diffusion_models")
    base, tuned = (os.path.join(models, f"{ARCH}_{s}.safetensors") for s in ("base", "tuned"))
    if not os.path.exists(base):
        pytest.skip(f"{ARCH} models not generated")
    out = os.path.join(models, SUBDIR)
    os.makedirs(out, exist_ok=True)
    return {t: write_gguf_pair_from_safetensors(base, tuned, t, out) for t in TYPES}


@pytest.mark.parametrize("qtype", TYPES)
def test_reader_equals_comfyui_gguf(gguf_pairs, qtype: str, tmp_path) -> None:
    from lora_extract.extract import open_source

    path = gguf_pairs[qtype][1]
    ref_file = str(tmp_path / "ref.safetensors")
    py = os.path.join(VENV, "bin", "python")
    subprocess.run([py, os.path.join(HERE, "comfyui_gguf_dequant.py"), ROOT, GGUF_DIR,
                    path, ref_file], check=True, capture_output=True, timeout=600)
    ref = load_file(ref_file)
    src = open_source(path)
    assert sorted(src.keys()) == sorted(k for k in ref if not k.endswith("@default"))
    for k in src.keys():
        ours = src.get(k)
        assert tuple(ours.shape) == tuple(ref[k].shape), k
        assert torch.equal(ours.view(torch.int32), ref[k].view(torch.int32)), k
        # ComfyUI-GGUF's default setting does the block arithmetic in float16: within its
        # rounding (2^-11 relative per element) of the exact values.
        assert float((ref[k + "@default"] - ours).abs().max()) <= float(ours.abs().max()) * 2**-10, k


@pytest.fixture(scope="module")
def server():
    from tests.integration.comfy_http import ComfyServer

    log = os.environ.get("COMFY_LOG", os.path.expanduser("~/comfyui-run/server.log"))
    s = ComfyServer(os.environ.get("COMFY_URL", "http://127.0.0.1:8188"), log)
    if not s.alive():
        pytest.skip(f"no ComfyUI server answering at {s.url}")
    if not s.object_info("UnetLoaderGGUF") or not s.object_info("LoraExtract"):
        pytest.skip("the server runs without ComfyUI-GGUF or without this pack")
    return s


def _extract_inputs(tuned: list, base: list, prefix: str) -> dict:
    return {"finetuned_model": tuned, "original_model": base, "filename_prefix": prefix,
            "rank": 8, "lora_type": "standard", "algorithm": "svd_linalg", "lowrank_iters": 7,
            "output_dtype": "fp32", "bias_diff": True, "adaptive_param": 0.15,
            "clamp_quantile": False, "conv_rank": 8, "alpha": 0.0, "key_style": "comfy",
            "save_to": "models/loras"}


def _optimal(diff: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1).double())
    return math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum()))


def check_lora_optimal(lora: dict[str, torch.Tensor], base_src, tuned_src, base_prefix: str = "") -> int:
    """Every LoRA layer at most 1.001x the optimal rank-8 error of the dequantized difference."""
    checked = 0
    for key in tuned_src.keys():
        mod = "diffusion_model." + key.removesuffix(".weight")
        if mod + ".lora_up.weight" not in lora:
            continue
        diff = (tuned_src.get(key) - base_src.get(base_prefix + key, dtype=torch.float32)).double()
        up, down = lora[mod + ".lora_up.weight"].double(), lora[mod + ".lora_down.weight"].double()
        alpha = float(lora.get(mod + ".alpha", torch.tensor(float(up.shape[1]))))
        approx = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (alpha / up.shape[1])
        flat = diff.reshape(diff.shape[0], -1)
        err = float((approx - flat).norm() / flat.norm())
        assert err <= 1.001 * _optimal(diff, 8) + 1e-7, (key, err, _optimal(diff, 8))
        checked += 1
    return checked


@pytest.mark.parametrize("qtype", TYPES)
def test_extract_from_gguf_models_on_real_comfyui(server, gguf_pairs, qtype: str) -> None:
    from lora_extract.extract import open_source

    base_name, tuned_name = (f"{SUBDIR}/{os.path.basename(p)}" for p in gguf_pairs[qtype])
    tag = f"itest_gguf_{qtype}_{int(time.time() * 1000)}"
    res = server.run({
        "1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": tuned_name}},
        "2": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": base_name}},
        "3": {"class_type": "LoraExtract", "inputs": _extract_inputs(["1", 0], ["2", 0], f"loras/{tag}")},
    })
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    files = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
    assert len(files) == 1, files
    lora = load_file(files[0])
    base_src, tuned_src = (open_source(p) for p in gguf_pairs[qtype])
    assert check_lora_optimal(lora, base_src, tuned_src) >= 40

    # Apply it to the GGUF base: every key loads; the residual to the fine-tune is what is left.
    res = server.run({
        "1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": base_name}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0],
              "lora_name": os.path.basename(files[0]), "strength_model": 1.0}},
        "3": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": tuned_name}},
        "4": {"class_type": "LoraExtract", "inputs": _extract_inputs(["3", 0], ["2", 0], f"loras/{tag}_residual")},
    })
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    assert "lora key not loaded" not in res.log, res.log
    for f in glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors")):
        os.remove(f)


def test_cli_q8_0_finetune_over_bf16_base(gguf_pairs, tmp_path) -> None:
    from lora_extract.cli import main
    from lora_extract.extract import open_source

    models = os.path.join(ROOT, "models", "diffusion_models")
    base_bf16 = str(tmp_path / "base-bf16.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in
               load_file(os.path.join(models, f"{ARCH}_base.safetensors")).items()}, base_bf16)
    tuned = gguf_pairs["Q8_0"][1]
    out = str(tmp_path / "mixed.safetensors")
    assert main(["extract", base_bf16, tuned, "-o", out, "--rank", "8", "--dtype", "fp32",
                 "--no-clamp", "--algorithm", "svd_linalg"]) == 0
    assert check_lora_optimal(load_file(out), open_source(base_bf16), open_source(tuned)) >= 40
