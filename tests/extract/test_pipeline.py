"""Whole-model extraction from files: keys ComfyUI accepts, faithful weights, complete report."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_extract.extract import (
    ExtractConfig,
    ExtractionInputError,
    NothingToExtract,
    SafetensorsSource,
    StateDictSource,
    extract_lora,
    extract_to_file,
)
from lora_extract.extract.synthetic import demo_layers, make_pair, write_pair
from tests.support.comfy_keymap import apply_lora
from tests.support.fault_injection import fail_on_call


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("pair")), demo_layers(64), seed=3)


def _model_sd(path: str) -> dict[str, torch.Tensor]:
    # ComfyUI's MODEL state dict: every diffusion-model key under "diffusion_model.".
    return {k if k.startswith("diffusion_model.") else "diffusion_model." + k: v
            for k, v in load_file(path).items()}


@pytest.mark.parametrize("key_style", ["comfy", "kohya"])
def test_lora_loads_with_no_unloaded_key_and_reproduces_tuned(pair_dir, tmp_path, key_style: str) -> None:
    base_p, tuned_p = pair_dir
    out = str(tmp_path / "lora.safetensors")
    cfg = ExtractConfig(rank=64, conv_rank=64, clamp_quantile=None, output_dtype="fp32", key_style=key_style)
    report = extract_to_file(SafetensorsSource(base_p), SafetensorsSource(tuned_p), cfg, out)
    lora = load_file(out)
    patched, unloaded = apply_lora(_model_sd(base_p), lora)
    assert unloaded == set()
    tuned = _model_sd(tuned_p)
    base = _model_sd(base_p)
    for k in tuned:
        d = (tuned[k] - base[k]).norm()
        if d == 0:
            assert torch.equal(patched[k], base[k])
            continue
        rel = float((patched[k] - tuned[k]).norm() / d)
        entry = next(r for r in report.layers if r.key == k)
        assert entry.status in ("lora", "diff")
        assert rel == pytest.approx(entry.rel_error, abs=1e-4)
    if key_style == "kohya":
        assert any(k.startswith("lora_unet_") for k in lora)
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == "64"
        assert json.loads(meta["lora_extract.config"])["key_style"] == "kohya"
    else:
        assert all(k.startswith("diffusion_model.") for k in lora)


def test_every_key_is_accounted_for(pair_dir, tmp_path) -> None:
    base_p, tuned_p = pair_dir
    extra_base = dict(load_file(base_p))
    extra_base["first_stage_model.decoder.conv.weight"] = torch.ones(3, 3)
    extra_base["diffusion_model.only_in_base.weight"] = torch.ones(4, 4)
    bp = str(tmp_path / "b.safetensors")
    save_file(extra_base, bp)
    res = extract_lora(SafetensorsSource(bp), SafetensorsSource(tuned_p), ExtractConfig(rank=4))
    keys = [r.key for r in res.report.layers]
    assert sorted(keys) == sorted(set(extra_base) | set(load_file(tuned_p)))
    reasons = {r.key: r.reason for r in res.report.layers if r.status == "skipped"}
    assert reasons["first_stage_model.decoder.conv.weight"].startswith("not part of the diffusion model")
    assert reasons["diffusion_model.only_in_base.weight"] == "only in the base model"
    assert reasons["diffusion_model.middle_block.1.proj_out.weight"] == "no difference"


def test_bias_diff_off_reports_instead_of_dropping(pair_dir) -> None:
    base_p, tuned_p = pair_dir
    res = extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p),
                       ExtractConfig(rank=4, bias_diff=False))
    assert not any(k.endswith((".diff", ".diff_b")) for k in res.tensors)
    skipped = [r for r in res.report.layers if r.reason.startswith("bias_diff is off")]
    assert {r.kind for r in skipped} >= {"vector"}
    assert any(r.key.endswith("modulation") for r in skipped)


def test_full_type_stores_exact_differences(pair_dir) -> None:
    base_p, tuned_p = pair_dir
    res = extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p),
                       ExtractConfig(lora_type="full", output_dtype="fp32"))
    patched, unloaded = apply_lora(_model_sd(base_p), res.tensors)
    assert not unloaded
    for k, v in _model_sd(tuned_p).items():
        torch.testing.assert_close(patched[k], v, rtol=0, atol=1e-6)


def test_non_weight_parameters_use_generic_keys(pair_dir) -> None:
    base_p, tuned_p = pair_dir
    res = extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p),
                       ExtractConfig(rank=4, key_style="kohya"))
    assert "diffusion_model.blocks.0.modulation.diff" in res.tensors
    assert "lora_unet_input_blocks_0_0.diff_b" in res.tensors
    assert "lora_unet_input_blocks_1_1_norm.diff" in res.tensors
    assert "lora_unet_patch_embedding.lora_down.weight" in res.tensors
    assert res.tensors["lora_unet_patch_embedding.lora_down.weight"].shape == (4, 16, 1, 2, 2)


def test_identical_models_write_nothing(pair_dir, tmp_path) -> None:
    base_p, _ = pair_dir
    out = tmp_path / "x.safetensors"
    with pytest.raises(NothingToExtract, match="identical") as info:
        extract_to_file(SafetensorsSource(base_p), SafetensorsSource(base_p), ExtractConfig(), str(out))
    assert not out.exists()
    assert os.listdir(tmp_path) == []
    assert all(r.reason == "no difference" for r in info.value.report.layers)


def test_disjoint_models_are_refused() -> None:
    a = StateDictSource({"diffusion_model.a.weight": torch.ones(2, 2)}, "a")
    b = StateDictSource({"diffusion_model.b.weight": torch.ones(2, 2)}, "b")
    with pytest.raises(ExtractionInputError, match="different architectures"):
        extract_lora(a, b, ExtractConfig())


def test_shape_mismatch_names_the_key() -> None:
    a = StateDictSource({"diffusion_model.a.weight": torch.ones(2, 2)}, "a")
    b = StateDictSource({"diffusion_model.a.weight": torch.ones(3, 2)}, "b")
    with pytest.raises(ExtractionInputError, match=r"diffusion_model\.a\.weight.*not the same architecture"):
        extract_lora(a, b, ExtractConfig())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_key_and_model(bad: float) -> None:
    base, tuned = make_pair(demo_layers(32), seed=1)
    tuned["diffusion_model.blocks.0.self_attn.qkv.weight"][3, 3] = bad
    with pytest.raises(ExtractionInputError, match=r"qkv\.weight.*in tuned.*NaN or Inf"):
        extract_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), ExtractConfig())


def test_bf16_sources_and_prefetch_give_same_result() -> None:
    base, tuned = make_pair(demo_layers(32), seed=2, dtype=torch.bfloat16)
    cfg = ExtractConfig(rank=4)
    a = extract_lora(StateDictSource(base), StateDictSource(tuned), cfg, prefetch=0)
    b = extract_lora(StateDictSource(base), StateDictSource(tuned), cfg, prefetch=3)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k])


def test_interrupt_between_layers_leaves_no_file(pair_dir, tmp_path) -> None:
    base_p, tuned_p = pair_dir

    class Stop(Exception):
        pass

    check = fail_on_call(lambda: None, 3, Stop())
    out = tmp_path / "x.safetensors"
    with pytest.raises(Stop):
        extract_to_file(SafetensorsSource(base_p), SafetensorsSource(tuned_p), ExtractConfig(),
                        str(out), check_interrupt=check)
    assert os.listdir(tmp_path) == []


def test_progress_reports_every_layer(pair_dir, tmp_path) -> None:
    base_p, tuned_p = pair_dir
    seen: list[tuple[int, int]] = []
    extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p), ExtractConfig(rank=2),
                 progress=lambda d, t, k: seen.append((d, t)))
    n = len(load_file(tuned_p))
    assert seen == [(i, n) for i in range(1, n + 1)]


def test_report_json_round_trip(pair_dir) -> None:
    base_p, tuned_p = pair_dir
    res = extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p), ExtractConfig(rank=4))
    d = json.loads(res.report.to_json())
    assert d["summary"]["lora"] == sum(1 for r in d["layers"] if r["status"] == "lora")
    assert d["config"]["rank"] == 4
    assert "worst layers" in res.report.format_text()


def test_parameters_comfyui_ignores_are_flagged(pair_dir) -> None:
    base_p, tuned_p = pair_dir
    res = extract_lora(SafetensorsSource(base_p), SafetensorsSource(tuned_p), ExtractConfig(rank=4))
    flagged = {r.key for r in res.report.layers if "does not apply" in r.reason}
    # blocks.0 has sub-modules (self_attn), so its own 'modulation' is never patched by ComfyUI.
    assert flagged == {"diffusion_model.blocks.0.modulation"}
    assert any("non-leaf" in n for n in res.report.notes)
    # ...and the report says how to get them applied: this pack's complete loader.
    assert all("'Load LoRA (complete)'" in r.reason for r in res.report.layers if r.key in flagged)
    assert any("'Load LoRA (complete)'" in n for n in res.report.notes)
    # The note counts exactly the flagged parameters and names one of them.
    note = next(n for n in res.report.notes if "non-leaf" in n)
    assert note == ("1 parameter difference(s) such as 'diffusion_model.blocks.0.modulation' are "
                    "stored, but ComfyUI's LoRA loader ignores parameters of non-leaf modules; load "
                    "the LoRA with this pack's 'Load LoRA (complete)' node to apply them (other "
                    "loaders apply them too).")


@pytest.mark.parametrize("key", [
    "first_stage_model.decoder.conv_in.weight", "cond_stage_model.transformer.text_model.x.weight",
    "conditioner.embedders.0.transformer.x.weight", "text_encoders.clip_l.transformer.x.weight",
    "vae.decoder.conv_in.weight", "text_encoder.text_model.x.weight",
    "text_encoder_2.text_model.x.weight", "clip_l.transformer.text_model.x.weight",
    "clip_g.transformer.text_model.x.weight", "t5xxl.transformer.encoder.x.weight",
    "model_ema.decay",
])
def test_text_encoder_vae_and_ema_keys_are_not_diffusion_model_paths(key: str) -> None:
    """Keys of a whole checkpoint's other parts (and encoder-only files) never pair as
    diffusion-model layers: they are extracted as text encoders or skipped with a reason."""
    from lora_extract.extract.keys.lora_keys import diffusion_path

    assert diffusion_path(key) is None
    assert diffusion_path("model.diffusion_model.input_blocks.0.0.weight") == "input_blocks.0.0.weight"


@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_file_metadata_names_the_format_style_and_kohya_network(style: str) -> None:
    """What trainers and UIs read from the header: our format version and key style, and in the
    kohya style the ss_* network fields (rank, alpha, conv rank, who made it)."""
    from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora

    base, tuned = make_pair(demo_layers(24), seed=4)
    res = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=6, conv_rank=3, alpha=2.0, key_style=style))
    meta = res.metadata
    assert meta["lora_extract.format"] == "1" and meta["lora_extract.key_style"] == style
    assert json.loads(meta["lora_extract.config"])["rank"] == 6
    if style == "comfy":
        assert not any(k.startswith("ss_") for k in meta)
        return
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "6" and meta["ss_network_alpha"] == "2"
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "3", "conv_alpha": "2", "algo": "lora", "extracted_by": "lora_extract"}
