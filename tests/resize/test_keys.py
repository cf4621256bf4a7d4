"""LoRA key -> base key mapping: kohya diffusers-style SD1/SDXL names, text encoders, fused qkv."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract.sources import StateDictSource
from lora_extract.resize.key_map import BaseTarget, build_key_map, map_prefixes
from lora_extract.resize.unet_names import ldm_to_diffusers

# Real SDXL UNet module names (LDM layout) and their diffusers names, as ComfyUI 0.3.64's
# ``comfy.utils.unet_to_diffusers`` pairs them for the SDXL config (facts checked against it).
SDXL_LDM_TO_DIFFUSERS = [
    ("input_blocks.0.0", "conv_in"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.2.0.emb_layers.1", "down_blocks.0.resnets.1.time_emb_proj"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.4.1.proj_in", "down_blocks.1.attentions.0.proj_in"),
    ("input_blocks.4.1.transformer_blocks.1.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
    ("input_blocks.5.1.transformer_blocks.0.attn2.to_k", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
    ("input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
    ("input_blocks.7.1.transformer_blocks.9.ff.net.0.proj", "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.0.proj"),
    ("input_blocks.8.1.transformer_blocks.3.attn1.to_out.0", "down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_out.0"),
    ("input_blocks.8.0.out_layers.3", "down_blocks.2.resnets.1.conv2"),
    ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("middle_block.1.transformer_blocks.5.attn2.to_v", "mid_block.attentions.0.transformer_blocks.5.attn2.to_v"),
    ("middle_block.1.proj_out", "mid_block.attentions.0.proj_out"),
    ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    ("output_blocks.0.1.transformer_blocks.0.attn1.to_k", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("output_blocks.2.1.transformer_blocks.9.ff.net.2", "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.3.0.in_layers.2", "up_blocks.1.resnets.0.conv1"),
    ("output_blocks.4.1.transformer_blocks.1.attn2.to_q", "up_blocks.1.attentions.1.transformer_blocks.1.attn2.to_q"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("output_blocks.6.0.out_layers.3", "up_blocks.2.resnets.0.conv2"),
    ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.2", "conv_out"),
]
# SD1 differs where up block 0 has no attention (upsampler at .1) and there are 4 levels.
SD1_LDM_TO_DIFFUSERS = [
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
    ("input_blocks.10.0.in_layers.2", "down_blocks.3.resnets.0.conv1"),
    ("output_blocks.11.1.transformer_blocks.0.attn2.to_out.0", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    ("output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
    ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("middle_block.1.transformer_blocks.0.ff.net.0.proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
]


@pytest.mark.parametrize("ldm,diffusers", SDXL_LDM_TO_DIFFUSERS + SD1_LDM_TO_DIFFUSERS)
def test_ldm_to_diffusers_table(ldm: str, diffusers: str) -> None:
    assert ldm_to_diffusers(ldm) == diffusers


def test_not_a_unet_module_has_no_diffusers_name() -> None:
    assert ldm_to_diffusers("double_blocks.0.img_attn.qkv") is None
    assert ldm_to_diffusers("input_blocks.3.1.proj_in") is None      # slot 2 holds only the downsampler


def _shape_source(shapes: dict[str, tuple[int, ...]]) -> StateDictSource:
    return StateDictSource({k: torch.zeros(s) for k, s in shapes.items()})


def test_kohya_names_on_real_sdxl_keys_map_to_ldm_keys() -> None:
    base_keys = {"model.diffusion_model." + ldm + ".weight": (4, 4) for ldm, _d in SDXL_LDM_TO_DIFFUSERS}
    km = build_key_map(_shape_source(base_keys))
    prefixes = []
    for ldm, diffusers in SDXL_LDM_TO_DIFFUSERS:
        prefixes += ["lora_unet_" + diffusers.replace(".", "_"),      # kohya, diffusers-style
                     "lora_unet_" + ldm.replace(".", "_"),            # kohya, LDM-style (sd-scripts SDXL)
                     "diffusion_model." + ldm,                        # ComfyUI-native
                     "unet." + diffusers]                             # PEFT / diffusers
    mapped, unmapped = map_prefixes(prefixes, km)
    assert unmapped == []
    for i, (ldm, _d) in enumerate(SDXL_LDM_TO_DIFFUSERS):
        for m in mapped[4 * i: 4 * i + 4]:
            assert m.target == BaseTarget("model.diffusion_model." + ldm + ".weight")


def test_text_encoders_and_fused_qkv_in_q_k_v_order() -> None:
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.3."
    te2 = "conditioner.embedders.1.model.transformer.resblocks.3."
    shapes = {te1 + "self_attn.v_proj.weight": (8, 8), te2 + "attn.in_proj_weight": (3 * 6, 6),
              te2 + "attn.out_proj.weight": (6, 6), te2 + "mlp.c_fc.weight": (24, 6),
              te2 + "mlp.c_proj.weight": (6, 24), "conditioner.embedders.1.model.text_projection": (6, 6)}
    km = build_key_map(_shape_source(shapes))
    lp = "lora_te2_text_model_encoder_layers_3_"
    expect = {
        "lora_te1_text_model_encoder_layers_3_self_attn_v_proj": BaseTarget(te1 + "self_attn.v_proj.weight"),
        "lora_te_text_model_encoder_layers_3_self_attn_v_proj": BaseTarget(te1 + "self_attn.v_proj.weight"),
        "text_encoder.text_model.encoder.layers.3.self_attn.v_proj": BaseTarget(te1 + "self_attn.v_proj.weight"),
        lp + "self_attn_q_proj": BaseTarget(te2 + "attn.in_proj_weight", 0, 3),
        lp + "self_attn_k_proj": BaseTarget(te2 + "attn.in_proj_weight", 1, 3),
        lp + "self_attn_v_proj": BaseTarget(te2 + "attn.in_proj_weight", 2, 3),
        "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj": BaseTarget(te2 + "attn.in_proj_weight", 1, 3),
        lp + "self_attn_out_proj": BaseTarget(te2 + "attn.out_proj.weight"),
        lp + "mlp_fc1": BaseTarget(te2 + "mlp.c_fc.weight"),
        lp + "mlp_fc2": BaseTarget(te2 + "mlp.c_proj.weight"),
        "lora_te2_text_projection": BaseTarget("conditioner.embedders.1.model.text_projection", transpose=True),
    }
    for prefix, target in expect.items():
        assert km.lookup(prefix) == target, prefix
    assert km.lookup(lp + "self_attn_q_proj").matrix_shape(shapes[te2 + "attn.in_proj_weight"]) == (6, 6)


def test_fused_qkv_rows_are_the_real_q_k_v(tmp_path) -> None:
    from lora_extract.resize.base_model import BaseModel

    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    w = torch.arange(18 * 6, dtype=torch.float32).reshape(18, 6)
    base = BaseModel(StateDictSource({te2: w}))
    for i, name in enumerate(("q", "k", "v")):
        t = base.key_map.lookup(f"lora_te2_text_model_encoder_layers_0_self_attn_{name}_proj")
        assert torch.equal(base.weight(t, "cpu"), w[6 * i: 6 * (i + 1)])


def test_unmapped_prefixes_are_listed_not_guessed() -> None:
    km = build_key_map(_shape_source({"model.diffusion_model.input_blocks.4.1.proj_in.weight": (4, 4)}))
    mapped, unmapped = map_prefixes(
        ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_proj_out",
         "lora_unet_down_blocks_1_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"], km)
    assert [m.prefix for m in mapped] == ["lora_unet_input_blocks_4_1_proj_in",
                                          "lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert unmapped == ["lora_unet_input_blocks_4_1_proj_out", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]


def test_other_architectures_map_by_direct_and_underscore_names() -> None:
    km = build_key_map(_shape_source({"double_blocks.0.img_attn.qkv.weight": (12, 4)}))  # bare Flux file
    for prefix in ("diffusion_model.double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv",
                   "double_blocks.0.img_attn.qkv"):
        assert km.lookup(prefix) == BaseTarget("double_blocks.0.img_attn.qkv.weight")
    assert km.lookup("lora_unet_double_blocks_0_txt_attn_qkv") is None
