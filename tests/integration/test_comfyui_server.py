"""Against a real ComfyUI server: LoraExtract or LoraExtractV2, then LoraLoaderModelOnly.

Runs when ``COMFYUI_ROOT`` points at a ComfyUI checkout whose server (``COMFY_URL``, default
http://127.0.0.1:8188) runs with this pack and the tiny model pairs of
``scripts/comfyui/make_tiny_models.py`` in ``models/diffusion_models`` (``scripts/comfyui/setup_comfyui.sh
all`` sets this up); skipped otherwise.
Checks: no "lora key not loaded" in the server log, and every tensor the fine-tune changed is
patched by the LoRA to the error our report states (bar parameters ComfyUI's loader never
patches, which our report must flag).
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="COMFYUI_ROOT is not set (no real ComfyUI here)")

ARCHS = ("tiny_sd15", "tiny_sd3", "tiny_flux_like", "tiny_wan21")


@pytest.fixture(scope="module")
def server():
    from tests.integration.comfy_http import ComfyServer

    log = os.environ.get("COMFY_LOG", os.path.expanduser("~/comfyui-run/server.log"))
    s = ComfyServer(os.environ.get("COMFY_URL", "http://127.0.0.1:8188"), log)
    if not s.alive():
        pytest.skip(f"no ComfyUI server answering at {s.url}")
    if not s.object_info("LoraExtract"):
        pytest.fail("the server runs without the LoraExtract node: is the pack installed and importable?")
    return s


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # ModelSave writes HunyuanVideo-detected models (tiny_flux_like) under "model.model.".
    for p in ("model.diffusion_model.", "diffusion_model.", "model.model."):
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return sd


# LoraExtractV2's own inputs; the rest are LoraExtract's.
V2_INPUTS = {"vram_usage_mode": "balanced", "blocks_in_gpu": 10, "batch_size": 4,
             "prefetch_ahead": 2, "memory_threshold": 0.85, "debug_mode": True}


@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_extract_then_load_on_real_comfyui(server, arch: str, node: str) -> None:
    models = os.path.join(ROOT, "models", "diffusion_models")
    if not os.path.exists(os.path.join(models, f"{arch}_base.safetensors")):
        pytest.skip(f"{arch} models not generated")
    tag = f"itest_{arch}_{int(time.time() * 1000)}"
    extract = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_tuned.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_base.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": node, "inputs": {
            "finetuned_model": ["1", 0], "original_model": ["2", 0], "filename_prefix": f"loras/{tag}",
            "rank": 16, "lora_type": "standard", "algorithm": "svd_linalg", "lowrank_iters": 7,
            "output_dtype": "fp32", "bias_diff": True, "adaptive_param": 0.15, "clamp_quantile": False,
            "conv_rank": 16, "alpha": 0.0, "key_style": "comfy", "save_to": "models/loras"}},
    }
    if node == "LoraExtractV2":
        extract["3"]["inputs"].update(V2_INPUTS)
    res = server.run(extract)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    lora_path, report_text = res.outputs["3"]["text"][0], None
    lora_files = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
    assert len(lora_files) == 1, lora_files
    lora_name = os.path.basename(lora_files[0])
    del lora_path, report_text

    apply = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_base.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": f"itest/{tag}"}},
    }
    res = server.run(apply)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    assert "lora key not loaded" not in res.log, res.log
    saved = glob.glob(os.path.join(ROOT, "output", "itest", f"{tag}_*.safetensors"))
    assert len(saved) == 1, saved

    base = _strip(load_file(os.path.join(models, f"{arch}_base.safetensors")))
    tuned = _strip(load_file(os.path.join(models, f"{arch}_tuned.safetensors")))
    patched = _strip(load_file(saved[0]))
    lora = load_file(lora_files[0])
    unpatched = []
    for k, t in tuned.items():
        d = float((t.float() - base[k].float()).norm())
        if d == 0 or k not in patched:
            continue
        if torch.equal(patched[k], base[k].to(patched[k].dtype)):
            unpatched.append(k)
            continue
        rel = float((patched[k].float() - t.float()).norm()) / d
        # rank 16 covers the constructed low-rank part (rank 4-16); the rest is small noise.
        assert rel < 0.35, (k, rel)
    print(f"{arch}: {len(tuned)} tensors, unpatched by ComfyUI: {unpatched}")
    # ComfyUI never patches parameters of non-leaf modules; everything else must be patched.
    for k in unpatched:
        assert f"diffusion_model.{k}.diff" in lora, f"{k} changed but is not in the LoRA"
        parent = k.rsplit(".", 1)[0] if "." in k else ""
        assert parent == "" or any(o.startswith(parent + ".") and o.count(".") > k.count(".")
                                   for o in tuned), f"{k} was not patched by ComfyUI"
    os.remove(saved[0])
    os.remove(lora_files[0])


@pytest.mark.parametrize("route", ["node", "cli"])
def test_diffusers_named_flux_on_real_comfyui(server, route: str, tmp_path) -> None:
    """A diffusers-named Flux pair (tests/integration/make_diffusers_flux.py) through UNETLoader:
    LoraExtract on the MODELs (comfy keys) or the command line on the files (diffusers keys),
    then LoraLoaderModelOnly; see integration/diffusers_flux_check.py for the checks."""
    from tests.integration.diffusers_flux_check import run_check

    print(route, run_check(server, ROOT, route, str(tmp_path)))


def _node_inputs(server, node: str, given: dict) -> dict:
    """``given`` plus every other widget input of ``node`` at its default (from /object_info)."""
    info = server.object_info(node)[node]["input"]
    out = {}
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
    out.update(given)
    return out


def _changed_and_unpatched(base: dict, tuned: dict, patched: dict) -> tuple[int, list[str]]:
    changed, unpatched = 0, []
    for k, t in tuned.items():
        if k not in patched or torch.equal(t, base[k]):
            continue
        changed += 1
        if torch.equal(patched[k], base[k].to(patched[k].dtype)):
            unpatched.append(k)
    return changed, unpatched


@pytest.mark.parametrize("arch", ARCHS)
def test_load_lora_complete_leaves_nothing_uncovered(server, arch: str) -> None:
    """LoraExtract, then "Load LoRA (complete)": every changed tensor is patched (LoraLoader
    leaves WAN's blocks.N.modulation and SD3's pos_embed as in the base); then the plain base
    model, loaded again in the same server, is exactly the base (the patches were undone)."""
    models = os.path.join(ROOT, "models", "diffusion_models")
    if not os.path.exists(os.path.join(models, f"{arch}_base.safetensors")):
        pytest.skip(f"{arch} models not generated")
    if not server.object_info("LoraLoadComplete"):
        pytest.fail("the server runs without the LoraLoadComplete node")
    tag = f"itest_complete_{arch}_{int(time.time() * 1000)}"
    extract = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_tuned.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_base.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "LoraExtract", "inputs": _node_inputs(server, "LoraExtract", {
            "finetuned_model": ["1", 0], "original_model": ["2", 0], "filename_prefix": f"loras/{tag}",
            "rank": 16, "conv_rank": 16, "algorithm": "svd_linalg", "output_dtype": "fp32",
            "bias_diff": True, "clamp_quantile": False, "key_style": "comfy", "save_to": "models/loras"})},
    }
    res = server.run(extract)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    (lora_file,) = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
    lora_name = os.path.basename(lora_file)
    base = _strip(load_file(os.path.join(models, f"{arch}_base.safetensors")))
    tuned = _strip(load_file(os.path.join(models, f"{arch}_tuned.safetensors")))
    saved_files = []

    def save(loader: dict | None, prefix: str) -> dict[str, torch.Tensor]:
        wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}_base.safetensors", "weight_dtype": "default"}}}
        model = ["1", 0]
        if loader is not None:
            wf["2"] = loader
            model = ["2", 0]
        wf["3"] = {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": f"itest/{prefix}"}}
        r = server.run(wf)
        assert r.status == "success", json.dumps(r.messages)[-3000:]
        assert "lora key not loaded" not in r.log, r.log
        (out,) = glob.glob(os.path.join(ROOT, "output", "itest", f"{prefix}_*.safetensors"))
        saved_files.append(out)
        return _strip(load_file(out))

    try:
        complete = save({"class_type": "LoraLoadComplete", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}, tag + "_complete")
        changed, unpatched = _changed_and_unpatched(base, tuned, complete)
        print(f"{arch}: {changed} changed tensors, left as in the base by Load LoRA (complete): {unpatched}")
        assert changed > 0 and unpatched == []
        # Strength applies to the skipped parameters too: half the diff at 0.5.
        half = save({"class_type": "LoraLoadComplete", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 0.5}}, tag + "_half")
        lora = load_file(lora_file)
        for k in (k for k in tuned if f"diffusion_model.{k}.diff" in lora):
            expected = base[k].float() + 0.5 * lora[f"diffusion_model.{k}.diff"].float()
            torch.testing.assert_close(half[k].float(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
        # Unloaded: the base model, loaded again, is the base bit for bit.
        plain = save(None, tag + "_plain")
        for k, v in base.items():
            assert torch.equal(plain[k], v.to(plain[k].dtype)), k
    finally:
        for p in saved_files:
            os.remove(p)
        os.remove(lora_file)


# --- text encoders: SD1.5 UNet + CLIP-L (scripts/make_tiny_sd15_clip.py) ---------------------

TE_RANK = 8


@pytest.fixture(scope="module")
def te_reference():
    from tests.integration.te_checks import files_present, load_reference

    if not files_present(ROOT):
        pytest.skip("tiny SD1.5 + CLIP-L models not generated (scripts/make_tiny_sd15_clip.py)")
    return load_reference(ROOT)


def _extract_inputs(tag: str, style: str) -> dict:
    return {"filename_prefix": f"loras/{tag}", "rank": TE_RANK, "text_encoder_rank": TE_RANK,
            "lora_type": "standard", "algorithm": "svd_linalg", "lowrank_iters": 7,
            "output_dtype": "fp32", "bias_diff": True, "adaptive_param": 0.15,
            "clamp_quantile": False, "conv_rank": TE_RANK, "alpha": 0.0, "key_style": style,
            "save_to": "models/loras"}


@pytest.mark.parametrize("node,style", [("LoraExtract", "comfy"), ("LoraExtractV2", "kohya")])
def test_model_and_clip_pairs_from_checkpoints_on_real_comfyui(server, te_reference, node, style) -> None:
    from tests.integration.te_checks import CKPT, check_applied

    tag = f"itest_te_{node}_{style}_{int(time.time() * 1000)}"
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT.format("tuned")}},
          "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT.format("base")}},
          "3": {"class_type": node, "inputs": {**_extract_inputs(tag, style),
                                               "finetuned_model": ["1", 0], "original_model": ["2", 0],
                                               "finetuned_clip": ["1", 1], "original_clip": ["2", 1]}}}
    if node == "LoraExtractV2":
        wf["3"]["inputs"].update(V2_INPUTS)
    res = server.run(wf)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    [lora_path] = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
    try:
        keys = load_file(lora_path).keys()
        te_prefix = "text_encoders.clip_l." if style == "comfy" else "lora_te_text_model_encoder_layers_"
        assert any(k.startswith(te_prefix) for k in keys)
        counts = check_applied(server, ROOT, lora_path, tag, TE_RANK, te_reference)
        print(f"{node} {style}: checked {counts}")
        assert counts["clip"] > 190 and counts["unet"] > 100
    finally:
        os.remove(lora_path)


@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_command_line_checkpoint_extraction_loads_in_real_comfyui(server, te_reference, style, tmp_path) -> None:
    import subprocess
    import sys

    from tests.integration.te_checks import CKPT, check_applied

    tag = f"itest_te_cli_{style}_{int(time.time() * 1000)}"
    ckpts = [os.path.join(ROOT, "models", "checkpoints", CKPT.format(v)) for v in ("base", "tuned")]
    lora_path = os.path.join(ROOT, "models", "loras", f"{tag}.safetensors")
    cmd = [sys.executable, "-m", "lora_extract.cli", "extract", *ckpts, "-o", lora_path,
           "--rank", str(TE_RANK), "--conv-rank", str(TE_RANK), "--dtype", "fp32", "--no-clamp",
           "--key-style", style]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "text encoders:" in run.stdout
    try:
        counts = check_applied(server, ROOT, lora_path, tag, TE_RANK, te_reference)
        assert counts["clip"] > 190 and counts["unet"] > 100
    finally:
        os.remove(lora_path)


def test_clip_pair_alone_from_cliploader_on_real_comfyui(server, te_reference) -> None:
    from tests.integration.te_checks import CLIP, check_applied

    tag = f"itest_te_clip_{int(time.time() * 1000)}"
    wf = {str(i): {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP.format(v), "type": "stable_diffusion"}}
          for i, v in ((1, "tuned"), (2, "base"))}
    wf["3"] = {"class_type": "LoraExtract", "inputs": {**_extract_inputs(tag, "kohya"),
                                                       "finetuned_clip": ["1", 0], "original_clip": ["2", 0]}}
    res = server.run(wf)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    [lora_path] = glob.glob(os.path.join(ROOT, "models", "loras", f"{tag}_*.safetensors"))
    try:
        assert not any(k.startswith(("lora_unet_", "diffusion_model.")) for k in load_file(lora_path))
        counts = check_applied(server, ROOT, lora_path, tag, TE_RANK, te_reference, unet=False,
                               clip_from="cliploader")
        assert counts["clip"] > 190
    finally:
        os.remove(lora_path)
