"""Text-encoder checks against a real ComfyUI: apply a LoRA with LoraLoader (model and clip)
and LoraLoaderModelOnly, save what ComfyUI patched (ModelSave, CLIPSave), and hold every
changed UNet and CLIP weight to the optimal error of its difference at the extraction rank.

The models are ``scripts/make_tiny_sd15_clip.py``'s: whole SD1.x checkpoints in
``models/checkpoints`` and the CLIP-L alone in ``models/clip``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import torch
from safetensors.torch import load_file

CKPT = "tiny_sd15_clip_{}.safetensors"
CLIP = "tiny_clip_l_{}.safetensors"


def files_present(root: str) -> bool:
    return all(os.path.exists(os.path.join(root, "models", sub, name.format(v)))
               for sub, name in (("checkpoints", CKPT), ("clip", CLIP)) for v in ("base", "tuned"))


def optimal_rel_error(delta: torch.Tensor, k: int) -> float:
    """Eckart-Young: the best rank-k relative error of a difference (0 for vectors: stored whole)."""
    if delta.dim() < 2:
        return 0.0
    m = delta.reshape(delta.shape[0], -1).double()
    # Eigenvalues of the smaller Gram matrix are the squared singular values: much cheaper than
    # an SVD of a 49408 x 768 token embedding.
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    s2 = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return math.sqrt(float(s2[k:].sum()) / float(s2.sum()))


_OPTIMUM: dict[tuple[str, int, int], float] = {}


def _optimum(key: str, delta: torch.Tensor, k: int) -> float:
    # Cached: the UNet is checked after LoraLoader and after LoraLoaderModelOnly, in every test.
    ident = (key, k, delta.numel())
    if ident not in _OPTIMUM:
        _OPTIMUM[ident] = optimal_rel_error(delta, k)
    return _OPTIMUM[ident]


def check_against_tuned(patched: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                        tuned: dict[str, torch.Tensor], rank: int, what: str,
                        skip: tuple[str, ...] = ()) -> int:
    """Every weight the fine-tune changed is patched to within the rank-``rank`` optimum."""
    checked = 0
    t0 = time.perf_counter()
    for k, t in tuned.items():
        delta = t.float() - base[k].float()
        d = float(delta.norm())
        if d == 0 or k.endswith(skip):
            continue
        assert k in patched, f"{what}: {k} missing from what ComfyUI saved"
        rel = float((patched[k].float() - t.float()).norm()) / d
        opt = _optimum(f"{what == 'clip'}:{k}", delta, rank)
        # fp32 LoRA on fp32 weights: within 1% of the optimum, plus float rounding.
        assert rel <= opt * 1.01 + 2e-3, (what, k, rel, opt)
        checked += 1
    print(f"{what}: {checked} weights checked in {time.perf_counter() - t0:.1f} s")
    return checked


def strip_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "model.diffusion_model."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def load_reference(root: str) -> dict[str, dict[str, torch.Tensor]]:
    """Base and tuned UNet (from the checkpoints) and CLIP-L (HF layout) weights."""
    out = {}
    for v in ("base", "tuned"):
        out[f"unet_{v}"] = strip_unet(load_file(os.path.join(root, "models", "checkpoints", CKPT.format(v))))
        out[f"clip_{v}"] = load_file(os.path.join(root, "models", "clip", CLIP.format(v)))
    return out


TE_KEY_PREFIXES = ("text_encoders.", "lora_te_", "lora_te1_", "lora_te2_")


def apply_workflows(lora_name: str, tag: str, clip_from: str = "checkpoint") -> tuple[dict, dict]:
    """Base checkpoint (or CLIPLoader CLIP) + LoRA via LoraLoader; and via LoraLoaderModelOnly
    (a separate run, since that node has no CLIP and logs every text-encoder key as not loaded)."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT.format("base")}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": lora_name, "strength_model": 1.0,
                                                     "strength_clip": 1.0}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": f"itest/{tag}_unet"}},
        "4": {"class_type": "CLIPSave", "inputs": {"clip": ["2", 1], "filename_prefix": f"itest/{tag}_clip"}},
    }
    if clip_from == "cliploader":
        wf["7"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP.format("base"),
                                                         "type": "stable_diffusion"}}
        wf["2"]["inputs"]["clip"] = ["7", 0]
    only = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT.format("base")}},
        "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                              "strength_model": 1.0}},
        "6": {"class_type": "ModelSave", "inputs": {"model": ["5", 0], "filename_prefix": f"itest/{tag}_only"}},
    }
    return wf, only


def check_applied(server, root: str, lora_path: str, tag: str, rank: int, ref: dict,
                  unet: bool = True, clip_from: str = "checkpoint") -> dict[str, int]:
    """Run the apply workflow; check the log and every patched weight; remove what it wrote."""
    lora_name = os.path.basename(lora_path)
    both, only = apply_workflows(lora_name, tag, clip_from)
    res = server.run(both)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    assert "lora key not loaded" not in res.log, res.log[-3000:]
    res = server.run(only)
    assert res.status == "success", json.dumps(res.messages)[-3000:]
    not_loaded = [ln.split("lora key not loaded: ", 1)[1] for ln in res.log.splitlines()
                  if "lora key not loaded: " in ln]
    # Without a CLIP, ComfyUI logs the text-encoder keys (and only those) as not loaded.
    assert all(k.startswith(TE_KEY_PREFIXES) for k in not_loaded), not_loaded[:5]
    out = os.path.join(root, "output", "itest")
    saved = {p: glob.glob(os.path.join(out, f"{tag}_{p}*.safetensors")) for p in ("unet", "clip", "only")}
    try:
        assert all(len(v) == 1 for v in saved.values()), saved
        counts = {}
        clip = load_file(saved["clip"][0])
        # logit_scale: a parameter ComfyUI's loader cannot patch (the file has none to give).
        counts["clip"] = check_against_tuned(clip, ref["clip_base"], ref["clip_tuned"], rank, "clip")
        for p in ("unet", "only"):
            got = strip_unet(load_file(saved[p][0]))
            if unet:
                counts[p] = check_against_tuned(got, ref["unet_base"], ref["unet_tuned"], rank, p)
            else:  # a CLIP-only LoRA leaves the UNet as it was
                assert all(torch.equal(got[k].float(), v.float()) for k, v in ref["unet_base"].items())
        return counts
    finally:
        for v in saved.values():
            for f in v:
                os.remove(f)
