"""The diffusers key style: detection, key names, and what ComfyUI's loader makes of the file.

ComfyUI's side is the independent model in ``comfy_flux_diffusers.py`` (UNETLoader's diffusers ->
LDM conversion, the ``transformer.`` LoRA keys, load_lora's consumption and slice/function math).
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource, extract_lora
from lora_extract.extract.keys.diffusers_keys import (
    UNMAPPED_BIAS,
    UNMAPPED_PARAM,
    detect_diffusers_naming,
    diffusers_prefix,
)
from lora_extract.extract.keys.lora_keys import keys_for_param
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from tests.support.comfy_flux_diffusers import (
    convert_diffusers_flux,
    flux_lora_key_map,
    flux_map_for,
    load_and_apply,
)
from tests.support.diffusers_flux_model import flux_pair, flux_shapes

RANK = 6


@pytest.fixture(scope="module")
def flux() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return flux_pair(flux_shapes(hidden=32, depth=2, depth_single=2, guidance=True), seed=3, true_rank=4)


def _extract(base, tuned, **kw):
    cfg = ExtractConfig(rank=RANK, output_dtype="fp32", clamp_quantile=None, **kw)
    return extract_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), cfg)


def test_detects_each_diffusers_family_and_not_ldm_names() -> None:
    assert detect_diffusers_naming(list(flux_shapes())).family == "flux"
    sd3 = ["pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight", "proj_out.weight"]
    assert detect_diffusers_naming(sd3).family == "sd3"
    unet = ["conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert detect_diffusers_naming(unet).family == "unet"
    ldm = ["double_blocks.0.img_attn.qkv.weight", "img_in.weight", "input_blocks.0.0.weight",
           "joint_blocks.0.x_block.attn.qkv.weight", "blocks.0.self_attn.q.weight"]
    assert detect_diffusers_naming(ldm).family is None


def test_prefixes_follow_comfyui_diffusers_key_map() -> None:
    # model_lora_keys_unet: UNet keys get ".processor.to_*", and ".to_out.0" loses its ".0".
    a = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert diffusers_prefix(f"{a}.to_q") == f"unet.{a}.processor.to_q"
    assert diffusers_prefix(f"{a}.to_out.0") == f"unet.{a}.processor.to_out"
    assert diffusers_prefix("down_blocks.0.resnets.0.conv1") == "unet.down_blocks.0.resnets.0.conv1"
    assert diffusers_prefix("transformer_blocks.3.attn.to_q") == "transformer.transformer_blocks.3.attn.to_q"
    keys, role = keys_for_param("transformer_blocks.0.attn.to_q.weight", "diffusers", True)
    assert role == "weight" and keys.up.endswith(".lora_B.weight") and keys.down.endswith(".lora_A.weight")
    assert keys.alpha == "transformer.transformer_blocks.0.attn.to_q.alpha"


def test_auto_picks_diffusers_and_comfyui_loads_every_key_to_the_optimum(flux) -> None:
    base, tuned = flux
    res = _extract(base, tuned)                       # key_style auto (the default)
    assert res.report.config["key_style"] == "diffusers"
    assert res.metadata["lora_extract.key_style"] == "diffusers"
    assert any("key_style auto" in n for n in res.report.notes)
    assert all(k.startswith("transformer.") for k in res.tensors)

    # ComfyUI: UNETLoader converts both models to LDM names (fused q/k/v), LoraLoader maps the keys.
    ldm_base, ldm_tuned = convert_diffusers_flux(base), convert_diffusers_flux(tuned)
    model = {"diffusion_model." + k: v for k, v in ldm_base.items()}
    patched, not_loaded = load_and_apply(model, res.tensors, flux_lora_key_map(base))
    assert not_loaded == []

    # Per LDM tensor: the patched error equals the optimum of its diffusers parts (each part a
    # rank-RANK truncation), bar the flagged biases, which stay at the base.
    parts: dict[str, list[str]] = {}
    for dk, t in flux_map_for(base).items():
        parts.setdefault(t if isinstance(t, str) else t[0], []).append(dk)
    flagged = {r.key for r in res.report.layers if r.reason == UNMAPPED_BIAS}
    checked = 0
    for lk, dks in parts.items():
        if lk not in ldm_tuned:
            continue
        err = float((patched["diffusion_model." + lk] - ldm_tuned[lk]).norm())
        opt2 = 0.0
        for dk in dks:
            d = (tuned[dk] - base[dk]).double()
            if dk in flagged:
                opt2 += float((d ** 2).sum())        # not stored: its whole difference remains
            elif d.dim() == 2:
                s = torch.linalg.svdvals(d)
                opt2 += float((s[RANK:] ** 2).sum())
        assert err <= math.sqrt(opt2) * 1.001 + 1e-6, (lk, err, math.sqrt(opt2))
        checked += 1
    assert checked == len(ldm_tuned)


def test_biases_comfyui_cannot_apply_are_flagged_counted_and_left_out(flux) -> None:
    base, tuned = flux
    res = _extract(base, tuned)
    flagged = sorted(r.key for r in res.report.layers if r.reason == UNMAPPED_BIAS)
    # q/k/v + add_q/k/v of 2 double blocks, q/k/v + proj_mlp of 2 single blocks, norm_out.linear.
    assert len(flagged) == 2 * 6 + 2 * 4 + 1
    assert "transformer_blocks.0.attn.to_q.bias" in flagged and "norm_out.linear.bias" in flagged
    assert not any(k.endswith(".diff_b") and any(k.startswith("transformer." + f[:-5]) for f in flagged)
                   for k in res.tensors)
    assert any(n.startswith(f"{len(flagged)} changed parameter(s)") for n in res.report.notes)
    assert "skipped 21" in res.report.format_text()
    # Stored biases (string targets) do load: to_out.0's bias patches img_attn.proj.bias.
    assert "transformer.transformer_blocks.0.attn.to_out.0.diff_b" in res.tensors


def test_v2_manager_writes_the_same_diffusers_keys(flux) -> None:
    base, tuned = flux
    cfg = ExtractConfig(rank=RANK, output_dtype="fp32", clamp_quantile=None)
    v1 = extract_lora(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg)
    v2 = extract_lora_streamed(StateDictSource(base, "b"), StateDictSource(tuned, "t"), cfg, MemoryOptions())
    assert list(v2.result.tensors) == list(v1.tensors)
    assert v2.result.report.config["key_style"] == "diffusers"


def test_diffusers_style_on_a_comfyui_named_model_is_one_clear_error() -> None:
    base = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 4)}
    tuned = {"double_blocks.0.img_attn.qkv.weight": torch.ones(6, 4)}
    with pytest.raises(ExtractionInputError, match="key_style 'diffusers' needs a model in diffusers naming"):
        _extract(base, tuned, key_style="diffusers")
    res = _extract(base, tuned)                        # auto keeps the comfy style here
    assert list(res.tensors)[0].startswith("diffusion_model.double_blocks.0.img_attn.qkv.")


def test_comfy_style_on_a_diffusers_model_says_comfyui_will_not_match(flux) -> None:
    base, tuned = flux
    res = _extract(base, tuned, key_style="comfy")
    assert any("will match none of these keys" in n for n in res.report.notes)
    _patched, not_loaded = load_and_apply(
        {"diffusion_model." + k: v for k, v in convert_diffusers_flux(base).items()},
        res.tensors, flux_lora_key_map(base))
    assert len(not_loaded) == len(res.tensors)         # why the note is there


def test_validate_reads_the_diffusers_style_against_the_diffusers_named_pair(flux) -> None:
    from lora_extract.validation.validate import validate_lora

    base, tuned = flux
    res = _extract(base, tuned)
    rep = validate_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"),
                        StateDictSource(res.tensors, "lora"))
    assert rep.key_styles == ["diffusers"] and rep.unmatched_keys == []
    by_path = {r.path: r for r in rep.layers}
    for layer in res.report.layers:
        if layer.status == "lora":   # validate's error of each LoRA layer is the extraction's
            assert by_path[layer.key].rank == RANK
            assert abs(by_path[layer.key].rel_error - layer.rel_error) < 1e-5, layer.key


def test_sd3_flags_exactly_the_biases_comfyui_maps_to_slices_or_swaps() -> None:
    """The expected set is what ComfyUI 0.3.64's ``mmdit_to_diffusers`` maps to a non-string
    target among the biases of a 2-block diffusers SD3 (checked against the real code)."""
    from lora_extract.extract.keys.diffusers_keys import comfy_unmapped

    paths = ["pos_embed.proj.weight", "pos_embed.proj.bias", "norm_out.linear.weight", "norm_out.linear.bias"]
    for i in range(2):
        b = f"transformer_blocks.{i}"
        mods = [f"{b}.attn.{m}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
        mods += [f"{b}.norm1.linear", f"{b}.norm1_context.linear", f"{b}.attn.to_out.0", f"{b}.ff.net.2"]
        paths += [f"{m}.{e}" for m in mods for e in ("weight", "bias")]
    weights = {p for p in paths if p.endswith(".weight")}
    got = comfy_unmapped(paths, weights, "sd3")
    expected = {"norm_out.linear.bias", "transformer_blocks.1.norm1_context.linear.bias"} | {
        f"transformer_blocks.{i}.attn.{m}.bias" for i in range(2)
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    assert set(got) == expected
    assert comfy_unmapped(["conv_in.weight", "conv_in.bias", "down_blocks.0.attentions.0.norm.weight"],
                          {"conv_in.weight", "down_blocks.0.attentions.0.norm.weight"}, "unet") == {}


def test_cli_defaults_to_diffusers_keys_and_refuses_them_for_comfyui_names(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from lora_extract.cli.main import main

    base, tuned = flux_pair(flux_shapes(hidden=16, depth=1, depth_single=1), seed=5)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    out = tmp_path / "l.safetensors"
    assert main(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                 "-o", str(out), "--rank", "4"]) == 0
    assert all(k.startswith("transformer.") for k in load_file(str(out)))
    assert "skipped 11: not stored: ComfyUI's loader" in capsys.readouterr().out
    ldm = {"img_in.weight": torch.zeros(4, 4)}
    save_file(ldm, str(tmp_path / "lb.safetensors"))
    save_file({"img_in.weight": torch.ones(4, 4)}, str(tmp_path / "lt.safetensors"))
    assert main(["extract", str(tmp_path / "lb.safetensors"), str(tmp_path / "lt.safetensors"),
                 "-o", str(tmp_path / "x.safetensors"), "--key-style", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--key-style 'diffusers' needs a model in diffusers naming" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("bias_diff", [True, False])
def test_a_weight_comfyui_cannot_map_is_flagged_not_stored(flux, bias_diff: bool) -> None:
    """A 2-D weight outside ComfyUI's diffusers Flux map (here an extra projection) is flagged
    and left out, with or without bias_diff: never written under a key nothing loads."""
    base, tuned = dict(flux[0]), dict(flux[1])
    g = torch.Generator().manual_seed(1)
    key = "transformer_blocks.0.extra_proj.weight"
    base[key] = torch.randn(16, 32, generator=g)
    tuned[key] = base[key] + 0.1 * torch.randn(16, 32, generator=g)
    res = _extract(base, tuned, bias_diff=bias_diff)
    row = next(r for r in res.report.layers if r.key == key)
    assert row.reason == UNMAPPED_PARAM and row.status == "skipped"
    assert not any("extra_proj" in k for k in res.tensors)
