"""Text encoders of whole checkpoints on the command line: reading them as ComfyUI names them,
extracting, validating and resizing the files, and the errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.cli import main
from lora_extract.extract.sources import StateDictSource
from lora_extract.extract.te_sources import TextEncoderView
from lora_extract.nodes.comfy_adapter import ComfyClipSource
from tests.nodes.test_text_encoders import _load_into_clip
from tests.support.te_helpers import (
    SD1ClipModel,
    SD3ClipModel,
    SDXLClipModel,
    checkpoint_te_sd,
    low_rank_deltas,
    make_clip,
)

FAMILIES = {"sd1": SD1ClipModel, "sdxl": SDXLClipModel, "sd3": SD3ClipModel}
UNET_PREFIX = {"sd1": "model.diffusion_model.", "sdxl": "model.diffusion_model.",
               "sd3": "model.diffusion_model."}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_text_encoders_read_as_the_loaded_clip_names_them(family) -> None:
    clip = make_clip(FAMILIES[family], seed=2)
    sd = clip.cond_stage_model.state_dict()
    ckpt = checkpoint_te_sd(sd, family)
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    ckpt[UNET_PREFIX[family] + "out.2.weight"] = torch.randn(4, 8, 3, 3)
    view = TextEncoderView(StateDictSource(ckpt))
    te = {k for k in view.keys() if k.startswith("text_encoders.")}
    # Every CLIP key the checkpoint stores, and nothing else; SD1/SDXL files do not store CLIP-L's
    # projection and logit scale (ComfyUI drops them when saving).
    stored = {k for k in sd if not (family in ("sd1", "sdxl") and k.startswith("clip_l.")
                                    and k.endswith(("text_projection.weight", "logit_scale")))}
    assert te == {"text_encoders." + k for k in stored}
    for k in stored:
        assert torch.equal(view.get("text_encoders." + k), sd[k]), k
    assert "first_stage_model.decoder.conv_in.weight" in view.keys()
    assert not any(k.startswith(("cond_stage_model.", "conditioner.")) for k in view.keys())


def _write_checkpoints(folder, family: str, te_in_tuned: bool = True) -> tuple[str, str, dict]:
    clip = make_clip(FAMILIES[family], seed=2)
    sd = clip.cond_stage_model.state_dict()
    deltas = low_rank_deltas(sd, rank=3, seed=9)
    g = torch.Generator().manual_seed(0)
    unet = {"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
            "out.2.weight": torch.randn(4, 8, 3, 3, generator=g)}
    vae = {"first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3, generator=g)}
    tuned_sd = {k: v + deltas.get(k, 0) for k, v in sd.items()}
    files = []
    for name, te_sd, delta in (("base", sd, 0.0), ("tuned", tuned_sd, 0.02)):
        ckpt = {UNET_PREFIX[family] + k: v + delta * v.flip(0) for k, v in unet.items()}
        ckpt.update(vae)
        if name == "base" or te_in_tuned:
            ckpt.update(checkpoint_te_sd(te_sd, family))
        path = os.path.join(folder, f"{family}_{name}.safetensors")
        save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
        files.append(path)
    return files[0], files[1], {"clip": clip, "deltas": deltas}


@pytest.mark.parametrize("family,style", [("sd1", "kohya"), ("sdxl", "kohya"), ("sdxl", "comfy"),
                                          ("sd3", "comfy")])
def test_cli_extracts_the_text_encoders_of_whole_checkpoints(tmp_path, capsys, family, style) -> None:
    base, tuned, info = _write_checkpoints(tmp_path, family)
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    assert main(["extract", base, tuned, "-o", str(out), "--rank", "3", "--dtype", "fp32",
                 "--no-clamp", "--key-style", style, "--report", str(rep)]) == 0
    lora = load_file(str(out))
    clip = info["clip"]
    loaded, not_loaded = _load_into_clip(clip, {k: v for k, v in lora.items()
                                                if not k.startswith(("lora_unet_", "diffusion_model."))})
    assert not_loaded == []
    src = ComfyClipSource(loaded, "loaded")
    sd = clip.cond_stage_model.state_dict()
    checked = 0
    for k, d in info["deltas"].items():
        if "text_encoders." + k not in src.keys() or k.endswith("logit_scale"):
            continue
        if family != "sd3" and k.startswith("clip_l.") and k.endswith("text_projection.weight"):
            continue  # not stored in SD1/SDXL checkpoints
        got = src.get("text_encoders." + k) - sd[k]
        assert torch.allclose(got, d, atol=2e-4), k   # rank 3 deltas, rank 3 LoRA: exact
        checked += 1
    assert checked > 20
    report = json.loads(rep.read_text())
    parts = report["summary"]["parts"]
    assert parts["text_encoders"]["lora"] > 0 and parts["diffusion_model"]["lora"] == 2
    reasons = {r["key"]: r["reason"] for r in report["layers"]}
    assert "VAE" in reasons["first_stage_model.decoder.conv_in.weight"]
    if style == "kohya" and family == "sdxl":
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in lora
    assert "text encoders:" in capsys.readouterr().out


def test_no_text_encoder_skips_them(tmp_path) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sd1")
    out = tmp_path / "o.safetensors"
    assert main(["extract", base, tuned, "-o", str(out), "--no-text-encoder"]) == 0
    assert not any("te_" in k or k.startswith("text_encoders.") for k in load_file(str(out)))


def test_text_encoder_in_one_checkpoint_only_is_one_clear_error(tmp_path, capsys) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sdxl", te_in_tuned=False)
    out = tmp_path / "o.safetensors"
    assert main(["extract", base, tuned, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text encoder clip_g is in sdxl_base.safetensors but not in " \
        "sdxl_tuned.safetensors" in err and "--no-text-encoder" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["sdxl_base.safetensors",
                                                                 "sdxl_tuned.safetensors"]


def test_encoder_only_files_as_cliploader_reads_them(tmp_path) -> None:
    clip = make_clip(SD1ClipModel, seed=2)
    sd = clip.cond_stage_model.state_dict()
    deltas = low_rank_deltas(sd, rank=2, seed=3)
    files = []
    for name, extra in (("base", {}), ("tuned", deltas)):
        hf = {k[len("clip_l.transformer."):]: v + extra.get(k, 0) for k, v in sd.items()
              if k.startswith("clip_l.transformer.")}
        files.append(str(tmp_path / f"clip_{name}.safetensors"))
        save_file(hf, files[-1])
    out = tmp_path / "o.safetensors"
    assert main(["extract", *files, "-o", str(out), "--rank", "2", "--dtype", "fp32", "--no-clamp"]) == 0
    lora = load_file(str(out))
    assert lora and all(k.startswith("text_encoders.clip_l.transformer.") for k in lora)
    loaded, not_loaded = _load_into_clip(clip, lora)
    assert not_loaded == []
    q = "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    got = ComfyClipSource(loaded, "l").get("text_encoders." + q) - sd[q]
    assert torch.allclose(got, deltas[q], atol=1e-4)


@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_validate_checks_the_text_encoders_of_the_file(tmp_path, capsys, style) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sdxl")
    out, rep = tmp_path / "o.safetensors", tmp_path / "v.json"
    assert main(["extract", base, tuned, "-o", str(out), "--rank", "3", "--key-style", style,
                 "--no-clamp"]) == 0
    assert main(["validate", base, tuned, str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    te = [r for r in report["layers"] if r["key"].startswith("text_encoders.")]
    assert te and report["unmatched_keys"] == [] and report["text_encoder_keys"] == []
    changed = [r for r in te if r["status"] != "unchanged"]
    # The rank-3 deltas are reproduced (fp16 file); logit_scale is a parameter ComfyUI's loader
    # cannot patch, so it is the one text-encoder change left uncovered.
    assert len(changed) > 50
    for r in changed:
        if r["key"].endswith("logit_scale"):
            assert r["status"] == "uncovered"
        else:
            assert r["status"] == "covered" and r["rel_error"] < 0.01, (r["key"], r["status"], r["rel_error"])


def test_resize_maps_the_text_encoder_layers_to_the_checkpoint(tmp_path, capsys) -> None:
    base, tuned, _ = _write_checkpoints(tmp_path, "sdxl")
    out = tmp_path / "o.safetensors"
    assert main(["extract", base, tuned, "-o", str(out), "--rank", "3"]) == 0
    folder = tmp_path / "resized"
    folder.mkdir()
    assert main(["resize", base, str(out), "-o", str(folder), "-d", "cpu", "-vv",
                 "-r", "fro_ckpt=1,thr=-3.5"]) == 0
    text = capsys.readouterr().out
    lora = load_file(str(out))
    n_lora = sum(k.endswith("lora_down.weight") for k in lora)
    n_te = sum(k.endswith("lora_down.weight") and k.startswith("text_encoders.") for k in lora)
    assert n_te > 20
    # Every LoRA layer (fused OpenCLIP q/k/v, projection and embeddings of CLIP-G included) is
    # scored against its checkpoint weight; none is copied unresized for want of a base weight.
    assert f"{n_lora} LoRA layers, base norms 0 cached / {n_lora} computed" in text, text
    assert "copied unresized" not in text
