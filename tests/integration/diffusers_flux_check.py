"""A diffusers-named Flux pair through a real ComfyUI: extract, load with LoraLoaderModelOnly, compare.

Two routes to the LoRA file:
- ``node``: ``UNETLoader`` (which converts the diffusers names to ComfyUI's, fusing q/k/v) feeds
  ``LoraExtract``; the MODELs are in ComfyUI naming, so ``key_style auto`` writes the comfy style.
- ``cli``: ``lora-extract`` on the two diffusers files; ``auto`` writes the diffusers (PEFT) style,
  whose ``transformer.*.to_q`` ... keys ComfyUI maps onto slices of the fused weights.

Either way ``LoraLoaderModelOnly`` must load every key (no "lora key not loaded"), and every
tensor ComfyUI patched (as its ``ModelSave`` writes it) must equal a plain application of the
file's factors and diffs (q/k/v onto their slices of the fused weight, ``norm_out`` through the
scale/shift swap: ``comfy_flux_diffusers``). Against the tuned model (converted by ComfyUI too):
on the cli route every LDM tensor's error is exactly what the report states for its diffusers
parts (their residuals, plus the whole difference of each bias it flags as unloadable); on the
node route every changed tensor is patched. That the stored residuals are the rank's optimum
is checked by the unit tests (tests/extract/keys/test_diffusers_keys.py, tests/extract/keys/test_diffusers_peft.py), which
can afford exact SVDs; 3072-wide ones take minutes each on the shared 2-core test machine.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_extract.cli.main import main as cli_main
from lora_extract.extract.keys.diffusers_keys import UNMAPPED_PREFIX
from tests.support.comfy_flux_diffusers import flux_lora_key_map, flux_map_for, load_and_apply

NAME = "tiny_flux_diffusers"
RANK = 16
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class Tensors:
    """Lazy per-key access to a safetensors file, keys with the diffusion-model prefix stripped."""

    def __init__(self, path: str) -> None:
        self.f = safe_open(path, "pt")
        self.full = {}
        for k in self.f.keys():
            p = next((p for p in PREFIXES if k.startswith(p)), "")
            self.full[k[len(p):]] = k

    def keys(self) -> list[str]:
        return list(self.full)

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.f.get_tensor(self.full[k]).float()


def _model_save(server, root: str, unet: str, tag: str, lora: str | None = None) -> str:
    wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}}
    model = ["1", 0]
    if lora:
        wf["2"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                   "strength_model": 1.0}}
        model = ["2", 0]
    wf["3"] = {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": f"itest/{tag}"}}
    res = server.run(wf)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    assert "lora key not loaded" not in res.log, res.log[-5000:]
    saved = glob.glob(os.path.join(root, "output", "itest", f"{tag}_*.safetensors"))
    assert len(saved) == 1, saved
    return saved[0]


def _extract_node(server, root: str, tag: str) -> tuple[str, set[str]]:
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{NAME}_tuned.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{NAME}_base.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "LoraExtract", "inputs": {
            "finetuned_model": ["1", 0], "original_model": ["2", 0], "filename_prefix": f"loras/{tag}",
            "rank": RANK, "lora_type": "standard", "algorithm": "svd_lowrank", "lowrank_iters": 7,
            "output_dtype": "fp32", "bias_diff": True, "adaptive_param": 0.15, "clamp_quantile": False,
            "conv_rank": RANK, "alpha": 0.0, "key_style": "auto", "save_to": "models/loras"}},
    }
    res = server.run(wf)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    files = glob.glob(os.path.join(root, "models", "loras", f"{tag}_*.safetensors"))
    assert len(files) == 1, files
    return files[0], (set(), {})


def _extract_cli(root: str, models: str, tag: str, tmp_dir: str) -> tuple[str, set[str]]:
    out = os.path.join(root, "models", "loras", f"{tag}.safetensors")
    report = os.path.join(tmp_dir, f"{tag}.json")
    rc = cli_main(["extract", os.path.join(models, f"{NAME}_base.safetensors"),
                   os.path.join(models, f"{NAME}_tuned.safetensors"), "-o", out, "--rank", str(RANK),
                   "--algorithm", "svd_lowrank", "--dtype", "fp32", "--no-clamp", "--report", report])
    assert rc == 0
    with open(report) as f:
        layers = json.load(f)["layers"]
    flagged = {r["key"] for r in layers if r["reason"].startswith(UNMAPPED_PREFIX)}
    residual = {r["key"]: r["rel_error"] for r in layers if r["status"] in ("lora", "diff")}
    return out, (flagged, residual)


def run_check(server, root: str, route: str, tmp_dir: str) -> dict[str, float]:
    models = os.path.join(root, "models", "diffusion_models")
    if not os.path.exists(os.path.join(models, f"{NAME}_base.safetensors")):
        pytest.skip(f"{NAME} not generated (tests/integration/make_diffusers_flux.py)")
    tag = f"itest_{NAME}_{route}_{int(time.time() * 1000)}"
    lora_path, (flagged, residual) = (_extract_node(server, root, tag) if route == "node"
                                      else _extract_cli(root, models, tag, tmp_dir))
    with safe_open(lora_path, "pt") as f:
        style = f.metadata()["lora_extract.key_style"]
        lora_keys = list(f.keys())
    assert style == ("comfy" if route == "node" else "diffusers")
    if route == "cli":
        assert all(k.startswith("transformer.") for k in lora_keys)
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in lora_keys
        assert len(flagged) == 6 + 4 + 1        # fused-slice biases and norm_out's swapped bias
    saved = [_model_save(server, root, f"{NAME}_base.safetensors", tag,
                         lora=os.path.relpath(lora_path, os.path.join(root, "models", "loras")))]
    try:
        for role in ("base", "tuned"):
            saved.append(_model_save(server, root, f"{NAME}_{role}.safetensors", f"{tag}_{role}"))
        return _compare(route, models, lora_path, flagged, residual, *saved)
    finally:
        for p in (*saved, lora_path):
            os.remove(p)


def _ldm_key_map(keys: list[str]) -> dict[str, str]:
    """ComfyUI's generic LoRA key map (``diffusion_model.<module>`` -> its weight; other params)."""
    out = {}
    for k in keys:
        out["diffusion_model." + (k[: -len(".weight")] if k.endswith(".weight") else k)] = "diffusion_model." + k
    return out


def _compare(route: str, models: str, lora_path: str, flagged: set[str], residual: dict[str, float],
             patched_path: str, base_path: str, tuned_path: str) -> dict[str, float]:
    base, tuned, patched = Tensors(base_path), Tensors(tuned_path), Tensors(patched_path)
    lora = load_file(lora_path)
    d_base, d_tuned = (Tensors(os.path.join(models, f"{NAME}_{r}.safetensors")) for r in ("base", "tuned"))
    suffix = "scale" if "double_blocks.0.img_attn.norm.query_norm.scale" in tuned.keys() else "weight"
    names = {k: torch.empty(0) for k in d_base.keys()}
    names["x_embedder.bias"] = d_base["x_embedder.bias"]      # flux_map_for reads the width
    key_map = flux_lora_key_map(names, suffix) if route == "cli" else _ldm_key_map(tuned.keys())
    parts: dict[str, list[str]] = {}
    for dk, t in flux_map_for(names, "", suffix).items():
        if dk in d_base.full:
            parts.setdefault(t if isinstance(t, str) else t[0], []).append(dk)
    worst, checked = 0.0, 0
    for k in tuned.keys():
        full = "diffusion_model." + k
        mine = {x: t for x, t in key_map.items()
                if (t if isinstance(t, str) else t[0]) in (full, full[: -len(".bias")] + ".weight")}
        expected, _ = load_and_apply({full: base[k]}, lora, mine)
        got = patched[k]
        moved = float((expected[full] - base[k]).norm())
        assert float((got - expected[full]).norm()) <= 1e-5 * moved + 1e-6, (route, k)
        t = tuned[k]
        dn = float((t - base[k]).norm())
        if dn == 0:
            continue
        err = float((got - t).norm())
        unloadable = route == "cli" and all(dk in flagged for dk in parts[k])
        assert moved > 0 or unloadable, (route, k, "changed by the fine-tune but not patched")
        if route == "cli":
            stated2 = 0.0
            for dk in parts[k]:
                dd = float((d_tuned[dk] - d_base[dk]).norm())
                stated2 += dd ** 2 if dk in flagged else (residual[dk] * dd) ** 2
            assert abs(err - math.sqrt(stated2)) <= 0.01 * math.sqrt(stated2) + 1e-4 * dn, \
                (k, err, math.sqrt(stated2), dn)
        worst = max(worst, err / dn)
        checked += 1
    assert checked == len(tuned.keys())
    return {"tensors": checked, "worst_rel_error": worst, "flagged": len(flagged), "lora_keys": len(lora)}
