"""Layer selection: presets over real architectures' parameter names, include/exclude patterns,
applied before any weight is read, every left-out parameter reported with its rule."""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource, extract_lora
from lora_extract.extract.selection import PRESETS, check_selection_options
from lora_extract.extract.synthetic import LayerSpec, make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from tests.support.paths import REPO_ROOT

# Oracle: parameter paths of real architectures (taken from ComfyUI's own model classes: SD1.5
# UNet, Flux, HunyuanVideo, SD3, Wan 2.1; diffusers Flux; CLIP-L, T5-XXL, an LLM encoder) and
# the verdict of each preset, written by hand: A = attention, M = attention_mlp,
# N = no_embed_head_norm ("" = left out by all three).
NAMES = {
    # SD1.5 UNet
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "AMN",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": "AMN",
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": "MN",
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": "MN",
    "input_blocks.1.1.transformer_blocks.0.norm1.weight": "",
    "input_blocks.1.1.norm.weight": "",
    "input_blocks.1.1.proj_in.weight": "N",
    "input_blocks.1.0.in_layers.0.weight": "",          # GroupNorm
    "input_blocks.1.0.in_layers.2.weight": "N",         # conv
    "input_blocks.1.0.emb_layers.1.weight": "N",
    "input_blocks.0.0.weight": "",                      # conv_in
    "time_embed.0.weight": "",
    "label_emb.0.0.weight": "",
    "out.0.weight": "",
    "out.2.weight": "",
    "middle_block.1.proj_out.weight": "N",
    # Flux / HunyuanVideo (ComfyUI names)
    "double_blocks.0.img_attn.qkv.weight": "AMN",
    "double_blocks.0.txt_attn.proj.bias": "AMN",
    "double_blocks.0.img_attn.norm.query_norm.scale": "",
    "double_blocks.0.img_mlp.0.weight": "MN",
    "double_blocks.0.img_mod.lin.weight": "N",
    "single_blocks.0.linear1.weight": "AMN",
    "single_blocks.0.linear2.weight": "AMN",
    "single_blocks.0.norm.key_norm.scale": "",
    "single_blocks.0.modulation.lin.weight": "N",
    "img_in.weight": "",
    "txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight": "",
    "time_in.in_layer.weight": "",
    "guidance_in.out_layer.weight": "",
    "final_layer.linear.weight": "",
    "final_layer.adaLN_modulation.1.weight": "",
    # SD3
    "joint_blocks.0.x_block.attn.qkv.weight": "AMN",
    "joint_blocks.0.context_block.mlp.fc2.weight": "MN",
    "joint_blocks.0.x_block.adaLN_modulation.1.weight": "N",
    "x_embedder.proj.weight": "",
    "t_embedder.mlp.0.weight": "",
    "pos_embed": "",
    "context_embedder.weight": "",
    # Wan 2.1
    "blocks.0.self_attn.q.weight": "AMN",
    "blocks.0.cross_attn.o.bias": "AMN",
    "blocks.0.self_attn.norm_q.weight": "",
    "blocks.0.ffn.0.weight": "MN",
    "blocks.0.ffn.2.bias": "MN",
    "blocks.0.norm3.weight": "",
    "blocks.0.modulation": "N",
    "patch_embedding.weight": "",
    "text_embedding.0.weight": "",
    "time_projection.1.weight": "",
    "head.head.weight": "",
    "head.modulation": "",
    # diffusers Flux
    "transformer_blocks.0.attn.to_q.weight": "AMN",
    "transformer_blocks.0.attn.add_k_proj.weight": "AMN",
    "transformer_blocks.0.attn.norm_added_q.weight": "",
    "transformer_blocks.0.ff_context.net.0.proj.weight": "MN",
    "single_transformer_blocks.0.proj_mlp.weight": "MN",
    "single_transformer_blocks.0.proj_out.weight": "AMN",
    "time_text_embed.timestep_embedder.linear_1.weight": "",
    "proj_out.weight": "",
    "norm_out.linear.weight": "",
    # text encoders
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": "AMN",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": "MN",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.weight": "",
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": "",
    "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": "",
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": "",
    "text_encoders.clip_g.transformer.text_projection.weight": "",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": "AMN",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight": "MN",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.layer_norm.weight": "",
    "text_encoders.t5xxl.transformer.shared.weight": "",
    "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.o_proj.weight": "AMN",
    "text_encoders.qwen25_7b.transformer.model.layers.0.mlp.down_proj.weight": "MN",
    "text_encoders.qwen25_7b.transformer.model.layers.0.input_layernorm.weight": "",
    "text_encoders.qwen25_7b.transformer.model.embed_tokens.weight": "",
}
LETTER = {"attention": "A", "attention_mlp": "M", "no_embed_head_norm": "N"}


@pytest.mark.parametrize("preset", list(LETTER))
def test_presets_on_real_architecture_names(preset: str) -> None:
    sel = check_selection_options(preset, "", "")
    wrong = {name: sel.left_out_by((name,)) for name, verdict in NAMES.items()
             if (sel.left_out_by((name,)) is None) != (LETTER[preset] in verdict)}
    assert wrong == {}


def test_all_preset_keeps_everything() -> None:
    sel = check_selection_options("all", "", "")
    assert not sel.active
    assert all(sel.left_out_by((n,)) is None for n in NAMES)
    assert set(PRESETS) == {"all", *LETTER}


def test_glob_matches_whole_name_regex_anywhere_and_either_name() -> None:
    sel = check_selection_options("all", "double_blocks.*", "re:img_mlp|\\.bias$")
    assert sel.left_out_by(("double_blocks.0.img_attn.qkv.weight",)) is None
    assert "include" in sel.left_out_by(("single_blocks.0.linear1.weight",))
    assert sel.left_out_by(("double_blocks.0.img_mlp.0.weight",)) == \
        "left out by exclude pattern 're:img_mlp|\\\\.bias$'"
    assert sel.left_out_by(("double_blocks.0.img_attn.qkv.bias",)) is not None
    # A glob must match a whole name: "attn" alone matches nothing, "*attn*" matches.
    assert check_selection_options("all", "attn", "").left_out_by(("blocks.0.attn.q.weight",))
    assert check_selection_options("all", "*attn*", "").left_out_by(("blocks.0.attn.q.weight",)) is None
    # The file key is the second name: a pattern over file keys works too.
    both = ("blocks.0.q.weight", "model.diffusion_model.blocks.0.q.weight")
    assert check_selection_options("all", "model.diffusion_model.*", "").left_out_by(both) is None


def test_bad_regex_and_preset_are_input_errors() -> None:
    with pytest.raises(ExtractionInputError, match=r"exclude pattern 're:attn\[' is not a valid"):
        ExtractConfig(exclude="re:attn[").validate()
    with pytest.raises(ExtractionInputError, match="layer_preset 'attn' is not one of"):
        ExtractConfig(layer_preset="attn").validate()


W = 24
LAYERS = [
    LayerSpec("diffusion_model.blocks.0.self_attn.q.weight", (W, W), 4),
    LayerSpec("diffusion_model.blocks.0.self_attn.q.bias", (W,), 1),
    LayerSpec("diffusion_model.blocks.0.self_attn.norm_q.weight", (W,), 1),
    LayerSpec("diffusion_model.blocks.0.ffn.0.weight", (2 * W, W), 4),
    LayerSpec("diffusion_model.blocks.0.ffn.0.bias", (2 * W,), 1),
    LayerSpec("diffusion_model.patch_embedding.weight", (W, 4, 1, 2, 2), 4),
    LayerSpec("diffusion_model.head.head.weight", (8, W), 4),
]


class CountingSource(StateDictSource):
    def __init__(self, tensors, name):
        super().__init__(tensors, name)
        self.read: list[str] = []

    def get(self, key, device="cpu", dtype=None):
        self.read.append(key)
        return super().get(key, device, dtype)


def _run(cfg: ExtractConfig, engine: str):
    base, tuned = make_pair(LAYERS, seed=1)
    b, t = CountingSource(base, "base"), CountingSource(tuned, "tuned")
    if engine == "v1":
        res = extract_lora(b, t, cfg)
    else:
        res = extract_lora_streamed(b, t, cfg, MemoryOptions(), cache=ResidentCache()).result
    return res, b, t


@pytest.mark.parametrize("engine", ["v1", "v2"])
def test_selection_extracts_only_selected_and_reports_the_rest(engine: str) -> None:
    cfg = ExtractConfig(rank=4, output_dtype="fp32", layer_preset="attention_mlp",
                        exclude="*.ffn.0.bias")
    res, b, t = _run(cfg, engine)
    stored_prefixes = {k.rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")
                       for k in res.tensors}
    assert stored_prefixes == {"diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.ffn.0"}
    assert "diffusion_model.blocks.0.self_attn.q.diff_b" in res.tensors
    reasons = {r.key: r.reason for r in res.report.layers if r.status == "skipped"}
    assert reasons == {
        "diffusion_model.blocks.0.self_attn.norm_q.weight":
            "left out by layer_preset 'attention_mlp' (attention and feed-forward (MLP) layers): "
            "matches its exclude pattern 're:(?i)(^|\\\\.)[^.]*norm[^.]*(\\\\.|$)'",
        "diffusion_model.blocks.0.ffn.0.bias": "left out by exclude pattern '*.ffn.0.bias'",
        "diffusion_model.patch_embedding.weight":
            "left out by layer_preset 'attention_mlp': not one of its attention and feed-forward "
            "(MLP) layers",
        "diffusion_model.head.head.weight":
            "left out by layer_preset 'attention_mlp': not one of its attention and feed-forward "
            "(MLP) layers",
    }
    # Every key is in the report once; left-out weights were never read from either model.
    assert sorted(r.key for r in res.report.layers) == sorted(s.key for s in LAYERS)
    for src in (b, t):
        assert not set(src.read) & set(reasons)
    assert any(n.startswith("selection: 3 of 7 parameters") for n in res.report.notes)


def test_selection_that_leaves_nothing_is_an_input_error() -> None:
    base, tuned = make_pair(LAYERS, seed=1)
    with pytest.raises(ExtractionInputError, match="leaves none of the 7 paired parameters"):
        extract_lora(StateDictSource(base), StateDictSource(tuned),
                     ExtractConfig(include="re:does_not_exist"))


def test_unmatched_include_pattern_is_noted() -> None:
    base, tuned = make_pair(LAYERS, seed=1)
    res = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=2, include="*self_attn*; *nothing_here*"))
    assert "include pattern '*nothing_here*' matched no parameter" in res.report.notes
    assert torch.is_tensor(res.tensors["diffusion_model.blocks.0.self_attn.q.lora_up.weight"])


def test_docs_list_every_preset_pattern() -> None:
    import os
    page = os.path.join(REPO_ROOT, "docs",
                        "layer-selection.md")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    for name, preset in PRESETS.items():
        assert f"`{name}`" in text
        for pattern in preset.include + preset.exclude:
            assert pattern in text, pattern


def test_cli_flags_reach_the_config_and_the_report(tmp_path) -> None:
    import json

    from lora_extract.cli.main import main
    from lora_extract.extract.synthetic import write_pair
    bp, tp = write_pair(str(tmp_path), LAYERS, seed=1)
    out, rep = str(tmp_path / "o.safetensors"), str(tmp_path / "r.json")
    assert main(["extract", bp, tp, "-o", out, "--report", rep, "--rank", "2",
                 "--layer-preset", "attention", "--include", "*blocks*", "--exclude", "*.bias",
                 "--exclude", "re:ffn", "--min-change-abs", "1e-9", "--new-tensors", "skip"]) == 0
    report = json.loads(open(rep).read())
    cfg = report["config"]
    assert (cfg["layer_preset"], cfg["include"], cfg["exclude"], cfg["min_change_abs"],
            cfg["new_tensors"]) == ("attention", "*blocks*", "*.bias;re:ffn", 1e-9, "skip")
    kept = [r["key"] for r in report["layers"] if r["status"] != "skipped"]
    assert kept == ["diffusion_model.blocks.0.self_attn.q.weight"]


def test_dry_run_shows_the_selection_its_size_and_unchanged_layers(tmp_path, capsys) -> None:
    from lora_extract.cli.main import main
    from lora_extract.extract.synthetic import write_pair
    bp, tp = write_pair(str(tmp_path), LAYERS, seed=1)
    assert main(["extract", bp, tp, "--dry-run", "--rank", "2", "--exclude", "re:ffn",
                 "--min-change-abs", "1e6"]) == 0
    out = capsys.readouterr().out
    kept = [s for s in LAYERS if "ffn" not in s.key]
    elements = sum(math.prod(s.shape) for s in kept) / 1e6
    total = sum(math.prod(s.shape) for s in LAYERS) / 1e6
    assert f"selection: {len(kept)} of {len(LAYERS)} parameters ({elements:.2f}M of {total:.2f}M weights)" in out
    assert "  2 left out by exclude pattern 're:ffn'" in out
    assert f"{len(kept)} changed layer(s) below --min-change / --min-change-abs (left out)" in out
