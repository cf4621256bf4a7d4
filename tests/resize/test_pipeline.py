"""Whole-file resize: formats, outputs ComfyUI loads, merges, the norms cache, the command line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_extract.cli import main
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.resize import BaseModel, ResizeOptions, open_lora_input, parse_recipes, resize_lora
from lora_extract.resize.norm_cache import CACHE_SUFFIX, cache_path, default_cache_dir
from tests.support.comfy_keymap import apply_lora
from tests.support.resize_fixtures import BASE_SHAPES, UNET, kohya_layer, lora_pair, make_base, spectrum

ATTN1 = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
ATTN2 = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
FF = "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj"
CONV = "input_blocks.1.0.in_layers.2"


def _sdxl_lora(gen) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    # sigma_i = 10^-i: spn_lora scores are exactly -i
    tenth = 10.0 ** -torch.arange(6, dtype=torch.float64)
    kohya_layer(sd, "lora_unet_" + ATTN1.replace(".", "_"), *lora_pair(32, (32,), tenth * 0.2, gen, 3.0), 3.0)
    # kohya diffusers-style name of input_blocks.4.1...attn2.to_k
    kohya_layer(sd, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                *lora_pair(32, (48,), tenth[:4] * 0.1, gen, 2.0), 2.0)
    kohya_layer(sd, "lora_unet_" + CONV.replace(".", "_"), *lora_pair(16, (16, 3, 3), tenth[:5], gen, 5.0), 5.0)
    kohya_layer(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                *lora_pair(24, (24,), tenth[:3], gen), None)                            # no alpha
    kohya_layer(sd, "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
                *lora_pair(20, (20,), tenth[:4], gen, 4.0), 4.0)
    kohya_layer(sd, "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                torch.zeros(80, 4), torch.zeros(4, 20), 4.0)                            # never trained
    kohya_layer(sd, "lora_unet_output_blocks_3_1_proj_in", *lora_pair(8, (8,), tenth[:2], gen), 2.0)  # not in base
    return sd


@pytest.fixture
def sdxl_files(tmp_path, gen):
    base_path, base_sd = make_base(str(tmp_path), gen)
    lora_sd = _sdxl_lora(gen)
    lora_path = str(tmp_path / "my_lora.safetensors")
    save_file(lora_sd, lora_path)  # no metadata, like every ComfyUI-saved LoRA
    return base_path, base_sd, lora_path, lora_sd


def _resize(base_path, spec, recipes, out, dtype="fp32", **kw):
    return resize_lora(BaseModel.open(base_path), open_lora_input(spec), parse_recipes(recipes), str(out),
                       ResizeOptions(output_dtype=dtype, **kw))


def test_sdxl_kohya_lora_resized_by_threshold_and_size(sdxl_files, tmp_path) -> None:
    base_path, _base_sd, lora_path, _ = sdxl_files
    out = tmp_path / "out"
    report = _resize(base_path, lora_path, "spn_lora,thr=-1.5:fro_ckpt=3,spn_lora=1,size=0.002", out, "fp16")
    thr, size = report.outcomes
    assert os.path.basename(thr.output_path) == "my_lora_spnlora1.00_th-1.50.safetensors"
    ranks = {lr.prefix: lr.new_rank for lr in thr.layers}
    assert ranks == {"lora_unet_" + ATTN1.replace(".", "_"): 2,
                     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": 2,
                     "lora_unet_" + CONV.replace(".", "_"): 2,
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 2,
                     "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": 2}
    assert report.zero_layers == ["lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    assert report.unmapped == ["lora_unet_output_blocks_3_1_proj_in"]
    lora = load_file(thr.output_path)
    assert lora["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 16, 3, 3)
    assert lora["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (16, 2, 1, 1)
    assert lora["lora_unet_input_blocks_1_0_in_layers_2.alpha"].item() == pytest.approx(5.0 / 5 * 2)
    assert lora["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0  # no alpha: scale 1
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" not in lora
    assert lora["lora_unet_output_blocks_3_1_proj_in.lora_up.weight"].shape == (8, 2)  # copied unresized
    with safe_open(thr.output_path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lora_resize.ranks"])["lora_unet_" + ATTN1.replace(".", "_")] == 2
    assert meta["lora_resize.recipe"] == "spn_lora,thr=-1.5" and meta["lora_resize.threshold"] == "-1.50"
    # size: the file name carries the implied threshold, the bytes stay under the target
    name = os.path.basename(size.output_path)
    assert name.startswith("my_lora_frockpt0.75_spnlora0.25_size0.002_th") and f"_th{size.threshold:.2f}." in name
    assert size.kept_bytes <= 0.002 * (1 << 20) and size.threshold > -math.inf
    per_layer = report.format_text(per_layer=True)
    assert "dim:   6->2    rle_lora:" in per_layer and "score quantiles: 0.01:" in per_layer


def test_resized_lora_loads_in_comfyui_and_matches_truncation(tmp_path, gen) -> None:
    shapes = {k: s for k, s in BASE_SHAPES.items() if k.startswith(UNET)}
    base_sd = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base_path = str(tmp_path / "unet.safetensors")
    save_file(base_sd, base_path)
    lora_sd: dict[str, torch.Tensor] = {}
    kohya_layer(lora_sd, "lora_unet_" + FF.replace(".", "_"), *lora_pair(128, (32,), spectrum(8, 0.5, 0.5), gen, 4.0), 4.0)
    kohya_layer(lora_sd, "diffusion_model." + CONV, *lora_pair(16, (16, 3, 3), spectrum(6, 0.3, 0.4), gen, 6.0), 6.0)
    lora_path = str(tmp_path / "l.safetensors")
    save_file(lora_sd, lora_path)
    report = _resize(base_path, lora_path, "spn_lora,thr=-0.95,rescale=0.5", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    model_sd = {"diffusion_model." + k[len(UNET):]: v for k, v in base_sd.items()}
    patched, unloaded = apply_lora(model_sd, out)
    assert unloaded == set()
    for prefix, key in (("lora_unet_" + FF.replace(".", "_"), FF), ("diffusion_model." + CONV, CONV)):
        up, down = lora_sd[prefix + ".lora_up.weight"], lora_sd[prefix + ".lora_down.weight"]
        scale = float(lora_sd[prefix + ".alpha"]) / down.shape[0]
        full = scale * up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        k = int((0.5 * s >= s[0] * 10 ** -0.95).sum())  # rescale counts; the spn_lora reference not
        expected = 0.5 * (u[:, :k] * s[:k]) @ vh[:k]
        delta = (patched["diffusion_model." + key + ".weight"] - model_sd["diffusion_model." + key + ".weight"])
        torch.testing.assert_close(delta.double().reshape(expected.shape), expected, atol=2e-5, rtol=1e-4)
        assert out[prefix + ".lora_down.weight"].shape[0] == k < down.shape[0]


def test_merge_concatenates_weighted_loras(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    prefix = "lora_unet_" + ATTN1.replace(".", "_")
    deltas = []
    for name, alpha, r in (("a", 2.0, 4), ("b", 8.0, 8)):
        sd: dict[str, torch.Tensor] = {}
        up, down = lora_pair(32, (32,), spectrum(r, 0.3), gen, alpha)
        kohya_layer(sd, prefix, up, down, alpha)
        save_file(sd, str(tmp_path / f"{name}.safetensors"), metadata={"ss_network_dim": str(r)})
        deltas.append(alpha / r * up.double() @ down.double())
    spec = f"{tmp_path / 'a'}:0.7,{tmp_path / 'b'}:-0.3"
    report = _resize(base_path, spec, "spn_lora,thr=-20", tmp_path / "o")
    path = report.outcomes[0].output_path
    assert os.path.basename(path).startswith("a0.7+b-0.3_spnlora1.00_th-20.00")
    out = load_file(path)
    k = out[prefix + ".lora_down.weight"].shape[0]
    merged = out[prefix + ".alpha"].item() / k * out[prefix + ".lora_up.weight"].double() @ out[prefix + ".lora_down.weight"].double()
    torch.testing.assert_close(merged, 0.7 * deltas[0] - 0.3 * deltas[1], atol=1e-6, rtol=1e-5)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lora_resize.merge"]) == [["a.safetensors", 0.7], ["b.safetensors", -0.3]]
    assert meta["ss_network_dim"] == "4"  # the first member's own metadata is kept


def test_norms_cache_reused_and_invalidated(sdxl_files, tmp_path) -> None:
    base_path, base_sd, lora_path, _ = sdxl_files
    recipes = "spn_ckpt,thr=-3:fro_ckpt,thr=-3"
    first = _resize(base_path, lora_path, recipes, tmp_path / "o1")
    assert first.norms_computed == 5 and first.norms_cached == 0
    assert first.cache_path == cache_path(base_path) and os.path.isfile(first.cache_path)
    # in the user's cache folder, never beside the model
    assert os.path.dirname(first.cache_path) == default_cache_dir() != os.path.dirname(base_path)
    assert not [n for n in os.listdir(os.path.dirname(base_path)) if n.endswith(CACHE_SUFFIX)]
    base = BaseModel.open(base_path)
    second = resize_lora(base, open_lora_input(lora_path), parse_recipes(recipes), str(tmp_path / "o2"),
                         ResizeOptions(output_dtype="fp32"))
    assert second.norms_cached == 5 and second.norms_computed == 0
    assert base.weights_read == 0  # not a single base tensor read on the second run
    assert [o.rank_after for o in second.outcomes] == [o.rank_after for o in first.outcomes]
    # a changed checkpoint (same size, new mtime) must never get the old norms
    key = UNET + ATTN1 + ".weight"
    base_sd[key] = base_sd[key] * 1000.0
    save_file(base_sd, base_path)
    st = os.stat(base_path)
    os.utime(base_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = _resize(base_path, lora_path, recipes, tmp_path / "o3")
    assert third.norms_computed == 5
    line = next(lr for lr in third.outcomes[1].layers if lr.base_key == key)
    old = next(lr for lr in first.outcomes[1].layers if lr.base_key == key)
    assert line.new_rank < old.new_rank   # fro_ckpt grew 1000x: fewer dimensions pass


def test_only_the_base_statistics_a_recipe_needs_are_computed(sdxl_files, tmp_path) -> None:
    # Spectral norms (the slow part) only for spn_ckpt, base weights only for subspace.
    base_path, _b, lora_path, _l = sdxl_files
    fro = _resize(base_path, lora_path, "fro_ckpt,thr=-3", tmp_path / "o1")
    assert (fro.norms_computed, fro.norms_cached) == (5, 0)
    spn = _resize(base_path, lora_path, "spn_ckpt,thr=-3", tmp_path / "o2")
    assert (spn.norms_computed, spn.norms_cached) == (5, 0)
    base = BaseModel.open(base_path)
    sub = resize_lora(base, open_lora_input(lora_path), parse_recipes("subspace,thr=-3"), str(tmp_path / "o3"),
                      ResizeOptions(output_dtype="fp32"))
    assert (sub.norms_computed, sub.norms_cached, base.weights_read) == (0, 5, 5)


def test_peft_file_without_alpha_and_merge_of_formats(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    up, down = lora_pair(32, (32,), spectrum(4, 0.2), gen)
    save_file({"diffusion_model." + ATTN1 + ".lora_A.weight": down,
               "diffusion_model." + ATTN1 + ".lora_B.weight": up}, str(tmp_path / "peft.safetensors"))
    report = _resize(base_path, str(tmp_path / "peft.safetensors"), "spn_lora,thr=-20", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    prefix = "diffusion_model." + ATTN1
    assert out[prefix + ".alpha"].item() == 4.0   # alpha = rank: the layer is up @ down as is
    torch.testing.assert_close(out[prefix + ".lora_up.weight"] @ out[prefix + ".lora_down.weight"], up @ down,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("extra,needle", [
    ({"lora_unet_x.weird_suffix": torch.zeros(2)}, "unknown family: 'lora_unet_x.weird_suffix'"),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa layer 'lora_unet_x' lacks hada_w1_b"),
    ({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, "LoKr layer 'lora_unet_x' lacks lokr_w2_a"),
    ({"lora_unet_x.dora_scale": torch.zeros(2, 1)}, "DoRA scales without a LoRA"),
    ({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)}, "OFT"),
])
def test_unknown_or_unsupported_keys_are_errors(tmp_path, gen, extra, needle) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    sd: dict[str, torch.Tensor] = {}
    kohya_layer(sd, "lora_unet_" + ATTN1.replace(".", "_"), *lora_pair(32, (32,), spectrum(2), gen), 1.0)
    sd.update(extra)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ExtractionInputError, match=needle) as e:
        _resize(base_path, str(tmp_path / "bad.safetensors"), "spn_lora,thr=-1", tmp_path / "o")
    assert "bad.safetensors" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_wrong_base_is_a_clear_error(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    sd: dict[str, torch.Tensor] = {}
    kohya_layer(sd, "lora_unet_" + ATTN1.replace(".", "_"), *lora_pair(64, (64,), spectrum(2), gen), 1.0)
    save_file(sd, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ExtractionInputError, match=r"does not fit base base.safetensors.*\[64, 64\].*\[32, 32\]"):
        _resize(base_path, str(tmp_path / "sd15.safetensors"), "spn_lora,thr=-1", tmp_path / "o")


def test_cli_resize(sdxl_files, tmp_path, capsys) -> None:
    base_path, _b, lora_path, _l = sdxl_files
    out = tmp_path / "cli"
    rc = main(["resize", base_path, lora_path, "-o", str(out), "-t", "32", "-d", "cpu",
               "-r", "fro_ckpt=1,thr=-3.5:spn_lora=1,thr=-0.7", "-vv"])
    assert rc == 0
    names = sorted(os.listdir(out))
    assert names == ["my_lora_frockpt1.00_th-3.50.safetensors", "my_lora_spnlora1.00_th-0.70.safetensors"]
    assert load_file(str(out / names[0]))["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].dtype == torch.float32
    assert "rle_ckpt:" in capsys.readouterr().out
    # rerun: an existing file is never replaced without --overwrite (nor renamed quietly)
    capsys.readouterr()
    before = (out / names[1]).read_bytes()
    assert main(["resize", base_path, lora_path, "-o", str(out), "-r", "spn_lora=1,thr=-0.7"]) == 2
    err = capsys.readouterr().err
    assert f"{out / names[1]} already exists; pass --overwrite" in err and err.count("\n") == 1
    assert sorted(os.listdir(out)) == names and (out / names[1]).read_bytes() == before
    assert main(["resize", base_path, lora_path, "-o", str(out), "-r", "spn_lora=1,thr=-0.7",
                 "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == names and (out / names[1]).read_bytes() != before


def test_cli_bad_recipe_exits_2_without_files(sdxl_files, tmp_path, capsys) -> None:
    base_path, _b, lora_path, _l = sdxl_files
    out = tmp_path / "cli"
    assert main(["resize", base_path, lora_path, "-o", str(out), "-r", "fro_ckpt=1"]) == 2
    err = capsys.readouterr().err
    assert "exactly one of thr= and size=" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("spec,members", [
    ("a.safetensors", [("a.safetensors", 1.0)]),
    (" a : 0.7 , b:-0.3 ", [("a", 0.7), ("b", -0.3)]),
    ("a:.5,b:+2,c:1e-2,d:3.", [("a", 0.5), ("b", 2.0), ("c", 0.01), ("d", 3.0)]),
    ("C:\\loras\\x.safetensors", [("C:\\loras\\x.safetensors", 1.0)]),   # a drive letter, no weight
    ("v1:2.safetensors:0.5", [("v1:2.safetensors", 0.5)]),                # ':' inside a name
])
def test_merge_spec_members_and_weights(spec: str, members: list[tuple[str, float]]) -> None:
    from lora_extract.resize.merge import parse_lora_spec

    assert [(m.path, m.weight) for m in parse_lora_spec(spec)] == members


@pytest.mark.parametrize("method,short", [
    ("fro_ckpt", "frockpt"), ("fro_lora", "frolora"), ("params", "params"),
    ("spn_ckpt", "spnckpt"), ("spn_lora", "spnlora"), ("subspace", "subspace"),
])
def test_every_method_has_its_short_name_in_output_file_names(method: str, short: str) -> None:
    from lora_extract.resize.output import output_file_name
    from lora_extract.resize.recipe import parse_recipe

    assert output_file_name("x", parse_recipe(f"{method},thr=-1"), -1.0) == f"x_{short}1.00_th-1.00.safetensors"
    mixed = parse_recipe(f"{method}=3,spn_lora,size=0.004,rescale=0.8" if method != "spn_lora"
                         else "spn_lora,size=0.004,rescale=0.8")
    parts = sorted([(method, f"{short}0.75"), ("spn_lora", "spnlora0.25")])  # in method-name order
    expected = "_".join(p for _m, p in parts) if method != "spn_lora" else "spnlora1.00"
    assert output_file_name("x", mixed, -math.inf) == f"x_{expected}_scale0.8_size0.004_th-inf.safetensors"
    assert output_file_name("x", mixed, math.inf).endswith("_thinf.safetensors")
    # a method weighted 0 is not part of the recipe
    zero = parse_recipe(f"spn_lora,{method}=0,thr=-1" if method != "spn_lora" else "spn_lora,fro_ckpt=0,thr=-1")
    assert output_file_name("x", zero, -1.0) == "x_spnlora1.00_th-1.00.safetensors"
    assert not zero.needs_spectral and not zero.needs_subspace


def _member(tmp_path, gen, name: str, r: int, alpha: float | None, extra: dict | None = None):
    prefix = "lora_unet_" + ATTN1.replace(".", "_")
    sd: dict[str, torch.Tensor] = {}
    up, down = lora_pair(32, (32,), spectrum(r, 0.3), gen, alpha or None)
    kohya_layer(sd, prefix, up, down, alpha)
    save_file({**sd, **(extra or {})}, str(tmp_path / f"{name}.safetensors"))
    scale = 1.0 if alpha is None else alpha / r
    return prefix, scale * up.double() @ down.double()


def test_single_weighted_lora_is_a_merge_and_weight_one_is_not(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    prefix, delta = _member(tmp_path, gen, "a", 4, 2.0)
    _member(tmp_path, gen, "b", 2, 2.0)
    a, b = tmp_path / "a", tmp_path / "b"
    paths = [_resize(base_path, spec, "spn_lora,thr=-20", tmp_path / f"o{i}").outcomes[0].output_path
             for i, spec in enumerate([str(a), f"{a}:0.5", f"{a},{b}"])]
    assert [os.path.basename(p) for p in paths] == [
        "a_spnlora1.00_th-20.00.safetensors", "a0.5_spnlora1.00_th-20.00.safetensors",
        "a1+b1_spnlora1.00_th-20.00.safetensors"]
    plain, half, both = paths
    with safe_open(plain, "pt") as f:
        assert "lora_resize.merge" not in f.metadata()
    with safe_open(half, "pt") as f:
        assert json.loads(f.metadata()["lora_resize.merge"]) == [["a.safetensors", 0.5]]
    with safe_open(both, "pt") as f:
        assert json.loads(f.metadata()["lora_resize.merge"]) == [["a.safetensors", 1.0], ["b.safetensors", 1.0]]
    out = load_file(half)
    k = out[prefix + ".lora_down.weight"].shape[0]
    got = out[prefix + ".alpha"].item() / k * out[prefix + ".lora_up.weight"].double() @ out[prefix + ".lora_down.weight"].double()
    torch.testing.assert_close(got, 0.5 * delta, atol=1e-6, rtol=1e-5)


def test_merge_alpha_is_the_rank_weighted_geometric_mean_of_the_members_scales(tmp_path, gen) -> None:
    from lora_extract.resize.merge import open_lora_input as open_input

    _member(tmp_path, gen, "a", 4, 2.0)      # alpha / rank = 0.5
    _member(tmp_path, gen, "b", 8, 8.0)      # 1.0
    _member(tmp_path, gen, "z", 2, 0.0)      # alpha 0: a LoRA that changes nothing
    prefix = "lora_unet_" + ATTN1.replace(".", "_")
    merged = open_input(f"{tmp_path / 'a'}:1,{tmp_path / 'b'}:0.333").factors(prefix, "cpu")
    assert merged.scale == 1.0 and merged.up.shape == (32, 12) and merged.down.shape == (12, 32)
    assert merged.output_scale == pytest.approx(0.5 ** (4 / 12), rel=1e-12)
    # a zero scale has no logarithm: the output alpha is then the rank (scale 1)
    with_zero = open_input(f"{tmp_path / 'a'}:1,{tmp_path / 'z'}:1").factors(prefix, "cpu")
    assert with_zero.output_scale == 1.0 and float(with_zero.up[:, 4:].abs().max()) == 0.0
    assert open_input(f"{tmp_path / 'a'}:1,{tmp_path / 'b'}:0.333").name == "a1+b0.33"


def test_merge_of_locon_conv_layers_is_the_weighted_sum(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    prefix = "lora_unet_" + CONV.replace(".", "_")
    deltas = []
    for name, r, alpha in (("a", 3, 3.0), ("b", 2, 1.0)):
        up, down = lora_pair(16, (16, 3, 3), spectrum(r, 0.3), gen, alpha)   # up [16, r, 1, 1]
        sd: dict[str, torch.Tensor] = {}
        kohya_layer(sd, prefix, up, down, alpha)
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        deltas.append(alpha / r * up.flatten(1).double() @ down.flatten(1).double())
    report = _resize(base_path, f"{tmp_path / 'a'}:0.5,{tmp_path / 'b'}:2", "spn_lora,thr=-20", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    up, down = out[prefix + ".lora_up.weight"], out[prefix + ".lora_down.weight"]
    assert up.shape == (16, 5, 1, 1) and down.shape == (5, 16, 3, 3)
    merged = out[prefix + ".alpha"].item() / 5 * up.flatten(1).double() @ down.flatten(1).double()
    torch.testing.assert_close(merged, 0.5 * deltas[0] + 2 * deltas[1], atol=1e-6, rtol=1e-5)


def test_merged_full_weight_patches_come_from_the_first_file_with_its_weight(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    bias = "lora_unet_" + CONV.replace(".", "_") + ".diff_b"
    _member(tmp_path, gen, "a", 4, 2.0, {bias: torch.ones(16)})
    _member(tmp_path, gen, "b", 4, 2.0, {bias: torch.full((16,), 5.0)})
    report = _resize(base_path, f"{tmp_path / 'a'}:0.5,{tmp_path / 'b'}:2", "spn_lora,thr=-20", tmp_path / "o")
    assert report.passthrough == [bias]
    out = load_file(report.outcomes[0].output_path)
    torch.testing.assert_close(out[bias], torch.full((16,), 0.5), rtol=0, atol=0)
