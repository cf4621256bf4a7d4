"""Validation core: LoRA application by ComfyUI's rules, coverage, unmatched keys, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource, extract_lora
from lora_extract.validation.lora_apply import index_lora, patched_weight
from lora_extract.validation.report import quality_band
from lora_extract.validation.validate import validate_lora
from tests.support.comfy_keymap import apply_lora, unloaded_lora_keys
from tests.support.helpers import matrix_with_spectrum, optimal_rel_error

P = "diffusion_model."
SHAPES = {
    "input_blocks.1.1.proj_in.weight": (16, 12),
    "input_blocks.1.0.in_layers.2.weight": (8, 4, 3, 3),
    "input_blocks.1.0.in_layers.2.bias": (8,),
    "input_blocks.1.1.norm.weight": (12,),
    "pos_embed": (1, 4, 8),
    "patch_embedding.weight": (8, 2, 1, 2, 2),
    "output_blocks.0.0.skip.weight": (6, 6),        # the fine-tune leaves this one alone
}
RANK, ALPHA = 4, 2.0


def _pair_and_lora(gen: torch.Generator) -> tuple[dict, dict, dict]:
    """Base, tuned and a LoRA (comfy keys) that reproduces tuned exactly (rank-4 deltas)."""
    base, tuned, lora = {}, {}, {}
    for path, shape in SHAPES.items():
        w = torch.randn(shape, generator=gen)
        base[P + path] = w
        if path.startswith("output_blocks"):
            tuned[P + path] = w.clone()
            continue
        if len(shape) >= 2 and path.endswith(".weight"):
            up = torch.randn(shape[0], RANK, *([1] * (len(shape) - 2)), generator=gen) * 0.1
            down = torch.randn(RANK, *shape[1:], generator=gen) * 0.1
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
            prefix = P + path[: -len(".weight")]
            # alpha/rank = 0.5 scales the product at load time: store up twice as large.
            lora[prefix + ".lora_up.weight"] = up * (RANK / ALPHA)
            lora[prefix + ".lora_down.weight"] = down
            lora[prefix + ".alpha"] = torch.tensor(ALPHA)
        else:
            delta = torch.randn(shape, generator=gen) * 0.01
            if path.endswith(".bias"):
                lora[P + path[: -len(".bias")] + ".diff_b"] = delta
            elif path.endswith(".weight"):  # a 1-D weight: the module prefix, as for matrices
                lora[P + path[: -len(".weight")] + ".diff"] = delta
            else:
                lora[P + path + ".diff"] = delta
        tuned[P + path] = w + delta
    return base, tuned, lora


def _validate(base: dict, tuned: dict, lora: dict, **kw):
    return validate_lora(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"),
                         StateDictSource(lora, "lora"), **kw)


def _kohya(lora: dict) -> dict:
    out = {}
    for k, v in lora.items():
        stem, _, suffix = k.partition(".lora_")
        if suffix:
            out["lora_unet_" + stem[len(P):].replace(".", "_") + ".lora_" + suffix] = v
        elif k.endswith(".alpha"):
            out["lora_unet_" + k[len(P): -len(".alpha")].replace(".", "_") + ".alpha"] = v
        else:
            out[k] = v  # .diff / .diff_b keep the generic prefix in every style
    return out


def test_perfect_lora_gives_zero_error_and_full_coverage(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    # "complete": every patch applied, as the pack's "Load LoRA (complete)" node does.
    rep = _validate(base, tuned, lora, loader="complete")
    s = rep.summary()
    assert (s.changed, s.covered, s.uncovered, s.coverage) == (6, 6, 0, 1.0)
    assert s.unmatched_keys == 0 and s.spurious == 0 and s.not_merged == 0
    assert s.worst_error is not None and s.worst_error < 1e-6
    assert s.overall_error is not None and s.overall_error < 1e-6
    assert s.bands["excellent"] == 6 and s.success_rate == 1.0
    ranks = {r.path: r.rank for r in rep.layers}
    assert ranks["input_blocks.1.1.proj_in.weight"] == RANK and ranks["pos_embed"] is None
    assert rep.key_styles == ["comfy"]


def test_comfyui_loader_scores_the_nonleaf_patch_as_not_applied(gen) -> None:
    # pos_embed sits on the model root, which has sub-modules: LoraLoader never applies it.
    base, tuned, lora = _pair_and_lora(gen)
    rep = _validate(base, tuned, lora, loader="comfyui")
    s = rep.summary()
    assert (s.changed, s.covered, s.not_merged) == (6, 5, 1)
    row = next(r for r in rep.layers if r.path == "pos_embed")
    assert row.status == "not_merged" and row.rel_error == 1.0
    assert "Load LoRA (complete)" in row.note and any("loader: complete" in n for n in rep.notes)
    # the whole-model error counts the unapplied delta in full
    d = {r.path: r.delta_norm for r in rep.layers}
    total = sum(v * v for v in d.values())
    assert s.overall_error == pytest.approx((d["pos_embed"] ** 2 / total) ** 0.5, rel=1e-4)
    with pytest.raises(ExtractionInputError, match="loader 'diffusers' is not one of comfyui, complete"):
        _validate(base, tuned, lora, loader="diffusers")


def test_application_matches_comfyui_loader(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    patched, unloaded = apply_lora(base, lora)
    assert unloaded == set()
    index = index_lora(lora, [k[len(P):] for k in base])
    src = StateDictSource(lora)
    for k, w in base.items():
        patch = index.patches.get(k[len(P):])
        ours = patched_weight(w, patch, src) if patch else w
        torch.testing.assert_close(ours, patched[k], rtol=0, atol=1e-6)


def test_kohya_keys_validate_the_same(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    kohya = _kohya(lora)
    assert any(k.startswith("lora_unet_") for k in kohya)
    rep = _validate(base, tuned, kohya)
    assert rep.summary().coverage == 1.0 and rep.summary().worst_error < 1e-6
    assert rep.unmatched_keys == [] and rep.key_styles == ["comfy", "kohya"]


def test_dropped_layer_shows_as_uncovered(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    prefix = P + "input_blocks.1.0.in_layers.2"
    for sfx in (".lora_up.weight", ".lora_down.weight", ".alpha"):
        del lora[prefix + sfx]
    rep = _validate(base, tuned, lora)
    s = rep.summary()
    assert (s.changed, s.covered, s.uncovered) == (6, 5, 1)
    assert s.coverage == pytest.approx(5 / 6)
    row = next(r for r in rep.layers if r.path == "input_blocks.1.0.in_layers.2.weight")
    assert row.status == "uncovered" and row.rel_error == 1.0
    # The whole-model error is exactly the dropped layer's share of the difference.
    deltas = {k: float((tuned[k] - base[k]).norm()) for k in base}
    expected = deltas[prefix + ".weight"] / math.sqrt(sum(d * d for d in deltas.values()))
    assert s.overall_error == pytest.approx(expected, rel=1e-5)
    assert rep.worst_layers(1)[0].path == "input_blocks.1.0.in_layers.2.weight"
    assert "1 uncovered" in rep.format_text()


def test_wrong_key_shows_as_unmatched_like_comfyui(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    renamed = {k.replace("proj_in", "proj_typo"): v for k, v in lora.items()}
    renamed["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 2)
    rep = _validate(base, tuned, renamed)
    expected = unloaded_lora_keys(base, renamed) - {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"}
    assert set(rep.unmatched_keys) == expected == {
        P + "input_blocks.1.1.proj_typo" + s for s in (".lora_up.weight", ".lora_down.weight", ".alpha")}
    assert rep.text_encoder_keys == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    s = rep.summary()
    assert s.uncovered == 1
    text = rep.format_text()
    assert "lora key not loaded" in text
    pct = 100 * (s.changed - 1) / s.changed
    assert (f"coverage: {s.changed - 1}/{s.changed} changed weights patched ({pct:.1f}%), "
            "1 uncovered") in text


def test_truncated_lora_error_is_the_optimal_truncation_error(gen) -> None:
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    base = {P + "a.weight": torch.randn(24, 20, generator=gen),
            P + "b.weight": torch.randn(16, 2, 3, 3, generator=gen)}
    deltas = {P + "a.weight": matrix_with_spectrum(24, 20, sigma, gen),
              P + "b.weight": matrix_with_spectrum(16, 18, sigma, gen).reshape(16, 2, 3, 3)}
    tuned = {k: base[k] + deltas[k] for k in base}
    cfg = ExtractConfig(rank=3, output_dtype="fp32", clamp_quantile=None)
    res = extract_lora(StateDictSource(base), StateDictSource(tuned), cfg)
    rep = _validate(base, tuned, res.tensors)
    for row in rep.layers:
        assert row.rank == 3
        assert row.rel_error == pytest.approx(optimal_rel_error(deltas[row.key], 3), abs=2e-5)
    assert rep.summary().bands["good"] == 2
    # Spectra of the largest covered layers are recorded for the chart, descending.
    a = next(r for r in rep.layers if r.key == P + "a.weight")
    assert a.spectrum[:4] == pytest.approx([8.0, 4.0, 2.0, 1.0], rel=1e-4)


def test_lora_that_changes_an_unchanged_weight_is_flagged(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    lora[P + "output_blocks.0.0.skip.diff"] = torch.full((6, 6), 0.1)
    rep = _validate(base, tuned, lora)
    row = next(r for r in rep.layers if r.path == "output_blocks.0.0.skip.weight")
    assert row.status == "spurious" and row.residual_norm == pytest.approx(0.6, rel=1e-5)
    assert rep.summary().spurious == 1


def test_patch_comfyui_would_not_merge_is_reported(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    lora[P + "pos_embed.diff"] = torch.zeros(1, 4, 9)  # wrong shape: ComfyUI logs and skips it
    rep = _validate(base, tuned, lora)
    row = next(r for r in rep.layers if r.path == "pos_embed")
    assert row.status == "not_merged" and row.rel_error == 1.0 and "1, 4, 9" in row.note
    assert rep.summary().not_merged == 1


def test_patch_that_grows_the_weight_is_not_merged_and_the_note_gives_both_shapes(gen) -> None:
    # reshape_weight pads the weight to a larger shape: ComfyUI could not load such a model.
    # proj_in (16, 12) was changed by the fine-tune, skip (6, 6) was not.
    base, tuned, lora = _pair_and_lora(gen)
    for prefix, out, inn in (("input_blocks.1.1.proj_in", 16, 14), ("output_blocks.0.0.skip", 6, 7)):
        lora[P + prefix + ".lora_up.weight"] = torch.randn(out, 2, generator=gen)
        lora[P + prefix + ".lora_down.weight"] = torch.randn(2, inn, generator=gen)
        lora[P + prefix + ".reshape_weight"] = torch.tensor([out, inn])
        lora.pop(P + prefix + ".alpha", None)
    rep = _validate(base, tuned, lora)
    rows = {r.path: r for r in rep.layers}
    changed, unchanged = rows["input_blocks.1.1.proj_in.weight"], rows["output_blocks.0.0.skip.weight"]
    assert (changed.status, changed.rel_error, changed.note) == (
        "not_merged", 1.0, "patched shape [16, 14] != model shape [16, 12]")
    # no difference to miss: no error for that row (never 1.0, never 0)
    assert (unchanged.status, unchanged.rel_error, unchanged.note) == (
        "not_merged", None, "patched shape [6, 7] != model shape [6, 6]")
    assert rep.summary().not_merged == 2


def test_unmerged_patches_on_unchanged_weights_have_no_error(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    tuned[P + "pos_embed"] = base[P + "pos_embed"].clone()           # LoraLoader skips this patch
    lora[P + "output_blocks.0.0.skip.diff"] = torch.zeros(6, 7)      # wrong shape: not merged
    rep = _validate(base, tuned, lora, loader="comfyui")
    rows = {r.path: r for r in rep.layers}
    assert (rows["pos_embed"].status, rows["pos_embed"].rel_error) == ("not_merged", None)
    skip = rows["output_blocks.0.0.skip.weight"]
    assert (skip.status, skip.rel_error) == ("not_merged", None)
    assert skip.note == ("diffusion_model.output_blocks.0.0.skip.diff: shape [6, 7] does not match the "
                         "weight output_blocks.0.0.skip.weight [6, 6]")
    assert rep.summary().not_merged == 2


def test_tucker_mid_and_reshape_follow_comfyui(gen) -> None:
    base = {P + "c.weight": torch.randn(8, 4, 3, 3, generator=gen),
            P + "d.weight": torch.randn(5, 6, generator=gen)}
    lora = {P + "c.lora_up.weight": torch.randn(8, 2, 1, 1, generator=gen),
            P + "c.lora_down.weight": torch.randn(2, 4, 1, 1, generator=gen),
            P + "c.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=gen),
            P + "c.alpha": torch.tensor(1.0),
            P + "d.lora_up.weight": torch.randn(5, 1, generator=gen),
            P + "d.lora_down.weight": torch.randn(1, 6, generator=gen)}
    patched, _ = apply_lora(base, lora)
    index = index_lora(lora, [k[len(P):] for k in base])
    for k in base:
        ours = patched_weight(base[k], index.patches[k[len(P):]], StateDictSource(lora))
        torch.testing.assert_close(ours, patched[k], rtol=1e-5, atol=1e-5)


def test_bad_lora_files_are_clear_errors(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    with pytest.raises(ExtractionInputError, match="no tensors"):
        _validate(base, tuned, {})
    del lora[P + "input_blocks.1.1.proj_in.lora_down.weight"]
    with pytest.raises(ExtractionInputError, match="proj_in.lora_down.weight"):
        _validate(base, tuned, lora)


def test_quality_bands_boundaries() -> None:
    assert [quality_band(e) for e in (0.0, 0.0499, 0.05, 0.4999, 0.5, 1.0, 1.0001)] == [
        "excellent", "excellent", "good", "good", "poor", "poor", "worse than nothing"]


def test_report_json_round_trip(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    data = json.loads(_validate(base, tuned, lora).to_json())
    assert data["summary"]["coverage"] == 1.0 and data["summary"]["changed"] == 6
    assert len(data["layers"]) == len(SHAPES) and data["unmatched_keys"] == []
    assert len(data["worst_layers"]) == 6 and data["worst_layers"][0]["rel_error"] < 1e-6


def test_nan_in_an_input_names_the_key_and_file(gen) -> None:
    base, tuned, lora = _pair_and_lora(gen)
    tuned[P + "pos_embed"][0, 1, 2] = float("nan")
    with pytest.raises(ExtractionInputError, match=r"'diffusion_model.pos_embed' in tuned contains NaN"):
        _validate(base, tuned, lora)
    base, tuned, lora = _pair_and_lora(torch.Generator().manual_seed(1))
    lora[P + "input_blocks.1.1.proj_in.lora_up.weight"][0, 0] = float("inf")
    with pytest.raises(ExtractionInputError, match=r"lora: the patch for 'input_blocks.1.1.proj_in.weight'"):
        _validate(base, tuned, lora)


def test_chart_spectrum_of_a_large_layer_is_the_leading_singular_values(gen) -> None:
    from lora_extract.validation.validate import EXACT_SPECTRUM_SIDE, leading_singular_values

    n = EXACT_SPECTRUM_SIDE + 64  # above the exact limit: the randomized path
    sigma = 0.7 ** torch.arange(40, dtype=torch.float64)
    mat = matrix_with_spectrum(n, n + 100, sigma, gen)
    got = torch.tensor(leading_singular_values(mat, 32), dtype=torch.float64)
    assert got.shape == (32,)
    torch.testing.assert_close(got[:16], sigma[:16], rtol=1e-3, atol=0)
    assert leading_singular_values(mat, 32) == leading_singular_values(mat, 32)  # deterministic


def test_spectra_are_recorded_for_the_largest_covered_layers_only(gen) -> None:
    """The chart shows the SPECTRUM_LAYERS largest layers: those, and no smaller one, carry a
    spectrum (a reversed size order would chart the smallest)."""
    from lora_extract.validation.validate import SPECTRUM_LAYERS

    sizes = [(8, 6), (40, 36), (12, 10), (32, 30), (16, 14), (24, 22)]
    base = {f"{P}l{i}.weight": torch.randn(*s, generator=gen) for i, s in enumerate(sizes)}
    tuned = {k: v + 0.1 * torch.randn(*v.shape, generator=gen) for k, v in base.items()}
    res = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=4, output_dtype="fp32", clamp_quantile=None))
    rep = _validate(base, tuned, res.tensors)
    with_spectrum = {r.key for r in rep.layers if r.spectrum}
    largest = sorted(base, key=lambda k: -math.prod(base[k].shape))[:SPECTRUM_LAYERS]
    assert SPECTRUM_LAYERS < len(sizes) and with_spectrum == set(largest)


@pytest.mark.parametrize("err,band", [(0.0, "excellent"), (0.049, "excellent"), (0.05, "good"),
                                      (0.5, "poor"), (1.0, "poor"), (1.01, "worse than nothing"),
                                      (math.inf, "worse than nothing"),
                                      (math.nan, "worse than nothing")])
def test_quality_bands_cover_every_error(err: float, band: str) -> None:
    assert quality_band(err) == band


def test_validation_reports_its_own_duration(gen) -> None:
    import time

    base, tuned, lora = _pair_and_lora(gen)
    t0 = time.perf_counter()
    rep = _validate(base, tuned, lora)
    assert 0 < rep.seconds <= time.perf_counter() - t0
