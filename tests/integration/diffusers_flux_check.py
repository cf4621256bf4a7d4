"""A diffusers-named Flux pair through a real ComfyUI: extract, load with LoraLoaderModelOnly, compare.

Two routes to the LoRA file:
- ``node``: ``UNETLoader`` (which converts the diffusers names to ComfyUI's, fusing q/k/v) feeds
  ``LoraExtract``; the MODELs are in ComfyUI naming, so ``key_style auto`` writes the comfy style.
- ``cli``: ``lora-extract`` on the two diffusers files; ``auto`` writes the diffusers (PEFT) style,
  whose ``transformer.*.to_q`` ... keys ComfyUI maps onto slices of the fused weights.

Either way ``LoraLoaderModelOnly`` must load every key (no "lora key not loaded"), and every
patched tensor must equal the tuned model (both as ComfyUI's ``ModelSave`` writes them) within
the optimum of what the file can hold: rank-``RANK`` truncations of the fused LDM differences
(node) or of each diffusers part (cli), plus the whole difference of each bias the report flags
as unloadable by ComfyUI.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import pytest
import torch
from comfy_flux_diffusers import flux_map_for
from safetensors import safe_open

from lora_extract.cli.main import main as cli_main
from lora_extract.extract.diffusers_keys import UNMAPPED_PREFIX

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


def tail_energy(d: torch.Tensor, k: int) -> float:
    """sum of sigma_i^2 past the k largest: the squared optimal rank-k error (Eckart-Young).

    The top-k energy comes from a randomized SVD (oversampled, 3 power iterations), which can
    only under-estimate it, so the result is the optimum or slightly above: exact SVDs of these
    3072-wide matrices take minutes on a busy 2-core machine.
    """
    m = d.reshape(d.shape[0], -1).float()
    total = float((m.double() ** 2).sum())
    if min(m.shape) <= k:
        return 0.0
    q = min(min(m.shape), k + 24)
    torch.manual_seed(0)
    _u, s, _v = torch.svd_lowrank(m, q=q, niter=3)
    return max(total - float((s[:k].double() ** 2).sum()), 0.0)


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
    return files[0], set()


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
    return out, flagged


def run_check(server, root: str, route: str, tmp_dir: str) -> dict[str, float]:
    models = os.path.join(root, "models", "diffusion_models")
    if not os.path.exists(os.path.join(models, f"{NAME}_base.safetensors")):
        pytest.skip(f"{NAME} not generated (tests/integration/make_diffusers_flux.py)")
    tag = f"itest_{NAME}_{route}_{int(time.time() * 1000)}"
    lora_path, flagged = (_extract_node(server, root, tag) if route == "node"
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
        return _compare(route, models, flagged, *saved, len(lora_keys))
    finally:
        for p in (*saved, lora_path):
            os.remove(p)


def _compare(route: str, models: str, flagged: set[str], patched_path: str, base_path: str,
             tuned_path: str, n_keys: int) -> dict[str, float]:
    base, tuned, patched = Tensors(base_path), Tensors(tuned_path), Tensors(patched_path)
    d_base, d_tuned = Tensors(os.path.join(models, f"{NAME}_base.safetensors")), \
        Tensors(os.path.join(models, f"{NAME}_tuned.safetensors"))
    suffix = "scale" if "double_blocks.0.img_attn.norm.query_norm.scale" in tuned.keys() else "weight"
    parts: dict[str, list[str]] = {}
    names = {k: torch.empty(0) for k in d_base.keys()}
    names["x_embedder.bias"] = d_base["x_embedder.bias"]      # flux_map_for reads the width
    for dk, t in flux_map_for(names, "", suffix).items():
        if dk in d_base.full:
            parts.setdefault(t if isinstance(t, str) else t[0], []).append(dk)
    worst = 0.0
    for k in tuned.keys():
        t = tuned[k]
        d = t - base[k]
        dn = float(d.norm())
        if dn == 0:
            continue
        err = float((patched[k] - t).norm())
        if route == "node":
            allowed2 = tail_energy(d, RANK) if d.dim() >= 2 else 0.0
        else:
            allowed2 = 0.0
            for dk in parts[k]:
                dd = d_tuned[dk] - d_base[dk]
                allowed2 += (float((dd.double() ** 2).sum()) if dk in flagged
                             else tail_energy(dd, RANK) if dd.dim() >= 2 else 0.0)
        bound = 1.05 * math.sqrt(allowed2) + 1e-4 * dn
        assert err <= bound, (route, k, err, math.sqrt(allowed2), dn)
        worst = max(worst, err / dn)
    return {"worst_rel_error": worst, "flagged": len(flagged), "lora_keys": n_keys}
