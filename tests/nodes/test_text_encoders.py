"""Text encoders through the extraction nodes: CLIP pairs, keys ComfyUI's loader maps, ranks,
the report, V2, and bad input."""

from __future__ import annotations

import logging
import os

import comfy.lora
import pytest
import torch
from safetensors.torch import load_file

from lora_extract.extract import ExtractionInputError
from lora_extract.extract.keys.te_keys import encoders_in, lora_keys_for
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from lora_extract.nodes.comfy_adapter import ComfyClipSource
from tests.support.helpers import call_node, optimal_rel_error, patched_pair
from tests.support.te_helpers import SD1ClipModel, SD3ClipModel, SDXLClipModel, make_clip, tuned_clip

V1_DEFAULTS = dict(filename_prefix="loras/te", rank=8, lora_type="standard", algorithm="svd_linalg",
                   lowrank_iters=7, output_dtype="fp32", bias_diff=True, adaptive_param=0.15,
                   clamp_quantile=False)


def _extract(node: str = "LoraExtract", **inputs) -> dict:
    return call_node(NODE_CLASS_MAPPINGS[node], **{**V1_DEFAULTS, **inputs})


def _load_into_clip(clip, lora: dict[str, torch.Tensor], extra_map: dict | None = None):
    """LoraLoader on a CLIP (stub): key map, load_lora, a patched clone; and the unloaded keys."""
    key_map = dict(extra_map or {})
    comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    out = clip.clone()
    out.add_patches(patches)
    return out, [m for m in records if "lora key not loaded" in m]


@pytest.mark.parametrize("cls", [SD1ClipModel, SDXLClipModel, SD3ClipModel])
@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_text_encoder_keys_are_keys_comfyui_maps_to_the_same_weight(cls, style) -> None:
    clip = make_clip(cls)
    sd = clip.cond_stage_model.state_dict()
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    paths = ["text_encoders." + k for k in sd]
    encoders = encoders_in(paths)
    for k in sd:
        module, _, leaf = k.rpartition(".")
        mapped = lora_keys_for("text_encoders." + k, style, module + ".weight" in sd, encoders)
        if leaf not in ("weight", "bias"):
            assert mapped is None, k         # logit_scale: the loader cannot patch it
            continue
        keys, role = mapped
        assert key_map[keys.prefix] == module + ".weight", (k, keys.prefix)
        assert role == leaf


def test_kohya_names_follow_the_number_of_encoders() -> None:
    q = "text_encoders.clip_{}.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    assert lora_keys_for(q.format("l"), "kohya", True, ("clip_l",))[0].prefix == \
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert lora_keys_for(q.format("l"), "kohya", True, ("clip_g", "clip_l"))[0].prefix == \
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"
    assert lora_keys_for(q.format("g"), "kohya", True, ("clip_g", "clip_l"))[0].prefix == \
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert lora_keys_for(t5, "kohya", True, ("clip_g", "clip_l", "t5xxl"))[0].prefix == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    # Norms and embeddings have no kohya name in ComfyUI's map: the generic key is used.
    ln = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
    assert lora_keys_for(ln, "kohya", True, ("clip_l",))[0].prefix == \
        "text_encoders.clip_l.transformer.text_model.final_layer_norm"


def _check_patched_clip(tuned_src: ComfyClipSource, loaded_src: ComfyClipSource, deltas,
                        rank: int, base_sd) -> None:
    left_out = tuned_src.left_out_keys()
    for key, delta in deltas.items():
        tk = "text_encoders." + key
        if key.endswith("logit_scale") or tk in left_out:
            continue
        got = loaded_src.get(tk) - base_sd[key].float()
        err = float(torch.linalg.vector_norm(got - delta)) / float(torch.linalg.vector_norm(delta))
        bound = optimal_rel_error(delta, rank) if delta.dim() == 2 else 0.0
        assert err <= bound * (1 + 1e-3) + 1e-4, (key, err, bound)
        assert torch.allclose(tuned_src.get(tk), base_sd[key].float() + delta, atol=1e-5)


@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_clip_pair_alone_gives_a_file_loraloader_applies_to_the_clip(comfy_dirs, style) -> None:
    base = make_clip(SD1ClipModel, seed=3)
    tuned, deltas = tuned_clip(base, rank=3, seed=4)
    out = _extract(finetuned_clip=tuned, original_clip=base, rank=2, key_style=style)
    path, text, _chart = out["result"]
    lora = load_file(path)
    assert all(k.startswith("text_encoders." if style == "comfy" else ("lora_te_", "text_encoders."))
               for k in lora), sorted(lora)[:5]
    if style == "kohya":
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in lora
    loaded, not_loaded = _load_into_clip(base, lora)
    assert not_loaded == []
    _check_patched_clip(ComfyClipSource(tuned, "t"), ComfyClipSource(loaded, "l"), deltas, 2,
                        base.cond_stage_model.state_dict())
    assert "text encoders:" in text and "logit_scale" not in text  # logit_scale: not changed here


def test_model_and_sdxl_clip_pairs_go_into_one_file_with_their_own_ranks(comfy_dirs) -> None:
    _b, _t, patcher, tuned_patcher = patched_pair(width=32, seed=2)
    base = make_clip(SDXLClipModel, seed=5)
    tuned, deltas = tuned_clip(base, rank=3, seed=6)
    out = _extract(finetuned_model=tuned_patcher, original_model=patcher, finetuned_clip=tuned,
                   original_clip=base, rank=6, text_encoder_rank=3, key_style="kohya")
    path, text, _chart = out["result"]
    lora = load_file(path)
    assert any(k.startswith("lora_unet_") for k in lora)
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in lora
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in lora
    te_ranks = {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight") and k.startswith(("lora_te", "text_encoders."))}
    unet_ranks = {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight") and k.startswith("lora_unet_")}
    assert te_ranks == {3} and max(unet_ranks) == 6
    # One LoraLoader call: the UNet and CLIP key maps together; every key lands somewhere.
    unet_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    loaded, not_loaded = _load_into_clip(base, lora, unet_map)
    assert not_loaded == []
    _check_patched_clip(ComfyClipSource(tuned, "t"), ComfyClipSource(loaded, "l"), deltas, 3,
                        base.cond_stage_model.state_dict())
    assert "diffusion model:" in text and "text encoders:" in text
    assert "text encoders rank: 3..3" in text


def test_report_counts_parts_apart_and_chart_groups_encoder_layers(comfy_dirs) -> None:
    from lora_extract.charts.rows import rows_from_extraction
    from lora_extract.extract.pipeline import extract_lora

    base = make_clip(SD1ClipModel, seed=3)
    tuned, _ = tuned_clip(base, rank=3, seed=4)
    _b, _t, patcher, tuned_patcher = patched_pair(width=32, seed=2)
    from lora_extract.extract.config import ExtractConfig
    from lora_extract.nodes.model_inputs import node_sources

    b, t = node_sources(tuned_patcher, patcher, tuned, base)
    res = extract_lora(b, t, ExtractConfig(rank=4))
    parts = res.report.summary().parts
    assert list(parts) == ["diffusion_model", "text_encoders"]
    te_matrices = sum(1 for k, v in base.cond_stage_model.state_dict().items() if v.dim() == 2)
    # CLIP-L's projection: not in SD1 files, uninitialised in ComfyUI, so reported, not extracted.
    assert parts["text_encoders"]["lora"] == te_matrices - 1
    reasons = {r.key: r.reason for r in res.report.layers}
    assert reasons["text_encoders.clip_l.transformer.text_projection.weight"].startswith(
        "not stored in SD1ClipModel checkpoints")
    assert parts["text_encoders"]["lora"] + parts["text_encoders"]["diff"] + \
        parts["text_encoders"]["skipped"] == len(base.cond_stage_model.state_dict())
    blocks = {r.block for r in rows_from_extraction(res.report)}
    assert {"clip_l.0", "clip_l.1", "clip_l"} <= blocks


def test_v2_gives_the_v1_file_for_model_and_clip(comfy_dirs) -> None:
    _b, _t, patcher, tuned_patcher = patched_pair(width=32, seed=2)
    base = make_clip(SDXLClipModel, seed=5)
    tuned, _ = tuned_clip(base, rank=3, seed=6)
    common = dict(finetuned_model=tuned_patcher, original_model=patcher, finetuned_clip=tuned,
                  original_clip=base, rank=5, text_encoder_rank=2, lora_type="adaptive_energy",
                  adaptive_param=0.99)
    v1 = load_file(_extract(**common)["result"][0])
    v2 = load_file(_extract("LoraExtractV2", batch_size=3, **common)["result"][0])
    assert sorted(v1) == sorted(v2)
    for k in v1:
        assert v1[k].shape == v2[k].shape, k
        assert torch.allclose(v1[k].float(), v2[k].float(), atol=1e-4), k


@pytest.mark.parametrize("inputs,needle", [
    ({}, "nothing to extract: connect finetuned_model and original_model"),
    ({"finetuned_clip": "T"}, "finetuned_clip is connected but original_clip is not"),
    ({"original_clip": "B"}, "original_clip is connected but finetuned_clip is not"),
    ({"finetuned_model": "TM", "finetuned_clip": "T", "original_clip": "B"},
     "finetuned_model is connected but original_model is not"),
    ({"finetuned_clip": "T", "original_clip": "XL"},
     "finetuned_clip is SD1ClipModel (clip_l) but original_clip is SDXLClipModel (clip_g, clip_l)"),
])
@pytest.mark.parametrize("node", ["LoraExtract", "LoraExtractV2"])
def test_bad_pairs_are_one_clear_error_and_no_file(comfy_dirs, inputs, needle, node) -> None:
    base = make_clip(SD1ClipModel, seed=3)
    objs = {"T": tuned_clip(base)[0], "B": base, "XL": make_clip(SDXLClipModel),
            "TM": patched_pair(width=16, seed=1)[3]}
    with pytest.raises(ExtractionInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _extract(node, **{k: objs[v] for k, v in inputs.items()})
    for _root, _dirs, files in os.walk(comfy_dirs):
        assert not [f for f in files if f.endswith(".safetensors")]
