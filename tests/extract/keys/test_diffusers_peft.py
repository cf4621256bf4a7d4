"""Files in the diffusers key style, loaded by the real ``diffusers`` (on ``peft``) into small
models built from a config: every LoRA-patched weight must equal the tuned one within the
rank's optimum. Skipped when the optional packages (``pip install .[diffusers]``) are missing.

diffusers' PEFT loader applies the ``lora_A``/``lora_B`` pairs (with our ``alpha``) and ignores
the ComfyUI ``.diff``/``.diff_b`` entries (biases, norms), so only matrix weights are compared.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_extract.extract import ExtractConfig, StateDictSource, extract_to_file  # noqa: E402

RANK, TRUE_RANK = 4, 3


def _tune(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """base + a rank-TRUE_RANK delta + small dense noise on every matrix; shifts elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        m = v.reshape(v.shape[0], -1)
        if v.dim() >= 2 and min(m.shape) > RANK:
            d = torch.randn(m.shape[0], TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, m.shape[1], generator=g)
            d = 0.02 * d + 1e-4 * torch.randn(m.shape, generator=g)
            out[k] = v + d.reshape(v.shape)
        else:
            out[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    return out


def _extract(tmp_path, base: dict, tuned: dict) -> tuple[str, object]:
    path = str(tmp_path / "lora.safetensors")
    cfg = ExtractConfig(rank=RANK, output_dtype="fp32", clamp_quantile=None)   # key_style auto
    report = extract_to_file(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), cfg, path)
    assert report.config["key_style"] == "diffusers"
    return path, report


def _assert_weights_within_optimum(model, base: dict, tuned: dict, report) -> int:
    """Every matrix the file holds a LoRA for is patched to the rank-RANK optimum of its delta."""
    got = model.state_dict()
    keys = [r.key for r in report.layers if r.status == "lora"]
    for k in keys:
        d = (tuned[k] - base[k]).reshape(base[k].shape[0], -1).double()
        s = torch.linalg.svdvals(d)
        opt = math.sqrt(float((s[RANK:] ** 2).sum()))
        err = float((got[k].double() - tuned[k].double()).norm())
        assert err <= opt * 1.01 + 1e-5 * float(d.norm()), (k, err, opt)
    return len(keys)


def test_flux_transformer_loads_our_file_with_diffusers(tmp_path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
               guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**cfg).state_dict()
    tuned = _tune(base, 1)
    path, report = _extract(tmp_path, base, tuned)
    model = FluxTransformer2DModel(**cfg)
    model.load_state_dict(base)
    state, alphas = FluxPipeline.lora_state_dict(path, return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    assert _assert_weights_within_optimum(model, base, tuned, report) > 20


def test_sd3_transformer_loads_our_file_with_diffusers(tmp_path) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
               pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    torch.manual_seed(0)
    base = SD3Transformer2DModel(**cfg).state_dict()
    tuned = _tune(base, 2)
    path, report = _extract(tmp_path, base, tuned)
    model = SD3Transformer2DModel(**cfg)
    model.load_state_dict(base)
    state = StableDiffusion3Pipeline.lora_state_dict(path)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    assert _assert_weights_within_optimum(model, base, tuned, report) > 10


def test_unet_file_loads_in_diffusers_after_renaming_to_out(tmp_path) -> None:
    """SD/SDXL UNets: ComfyUI maps attention projections only as ``processor.to_q`` ... and
    ``processor.to_out`` (no ``.0``). diffusers drops ``processor.`` but then finds the
    ``to_out`` ModuleList, so the one documented rename makes the file load there too."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
               out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
               attention_head_dim=4, norm_num_groups=4)
    torch.manual_seed(0)
    base = UNet2DConditionModel(**cfg).state_dict()
    tuned = _tune(base, 3)
    path, report = _extract(tmp_path, base, tuned)
    lora = load_file(path)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out.lora_B.weight" in lora
    renamed = {k.replace(".processor.to_out.", ".to_out.0."): v for k, v in lora.items()}
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(base)
    state, alphas = StableDiffusionPipeline.lora_state_dict(renamed)
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    assert _assert_weights_within_optimum(model, base, tuned, report) > 20
