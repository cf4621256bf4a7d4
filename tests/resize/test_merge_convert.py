"""LoRA merge and LoKr/LoHa/DoRA/diff conversion, against dense oracles written here in numpy.

The oracle of a merge is the dense weighted sum of the members' changes; of a conversion, the
change the adapter makes (numpy re-derivation of ComfyUI's formulas). With every dimension kept
the output must reproduce it; with ``rank=k`` its error must be the Eckart-Young optimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_extract.cli import main
from lora_extract.extract.errors import ExtractionInputError
from lora_extract.resize import BaseModel, ResizeOptions, open_lora_input, parse_recipes, resize_lora
from lora_extract.resize.adapters import DenseModule, dense_change
from lora_extract.resize.block_weights import block_factor, parse_block_weights
from tests.support.resize_fixtures import UNET, kohya_layer, lora_pair, make_base, spectrum

ATTN1 = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
FF = "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj"
CONV = "input_blocks.1.0.in_layers.2"
KOHYA = {n: "lora_unet_" + n.replace(".", "_") for n in (ATTN1, FF, CONV)}
COMFY = {n: "diffusion_model." + n for n in (ATTN1, FF, CONV)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _lora_change(sd: dict[str, torch.Tensor], prefix: str) -> np.ndarray:
    """alpha / r * up @ down of one layer of a written file (the loader's rule), flattened."""
    up, down = _np(sd[prefix + ".lora_up.weight"]), _np(sd[prefix + ".lora_down.weight"])
    r = down.shape[0]
    alpha = float(sd[prefix + ".alpha"]) if prefix + ".alpha" in sd else r
    return alpha / r * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)


def _run(base_path, spec, recipes, out, block_weights=""):
    lora = open_lora_input(spec, block_weights=block_weights)
    return resize_lora(BaseModel.open(base_path), lora, parse_recipes(recipes), str(out),
                       ResizeOptions(output_dtype="fp32"))


@pytest.fixture
def two_styles(tmp_path, gen):
    """A kohya-named LoRA (rank 4, alpha 2) and a ComfyUI-named one (rank 6, no alpha)."""
    base_path, base = make_base(str(tmp_path), gen)
    a: dict[str, torch.Tensor] = {}
    kohya_layer(a, KOHYA[ATTN1], *lora_pair(32, (32,), spectrum(4, 0.3), gen, 2.0), 2.0)
    kohya_layer(a, KOHYA[CONV], *lora_pair(16, (16, 3, 3), spectrum(4, 0.2), gen, 2.0), 2.0)
    b: dict[str, torch.Tensor] = {}
    up, down = lora_pair(32, (32,), spectrum(6, 0.5), gen)
    b[COMFY[ATTN1] + ".lora_B.weight"], b[COMFY[ATTN1] + ".lora_A.weight"] = up, down
    up, down = lora_pair(128, (32,), spectrum(6, 0.4), gen)
    b[COMFY[FF] + ".lora_B.weight"], b[COMFY[FF] + ".lora_A.weight"] = up, down
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return base_path, base, a, b


def _member_change(sd, prefix, up_key=".lora_up.weight", down_key=".lora_down.weight"):
    up, down = _np(sd[prefix + up_key]), _np(sd[prefix + down_key])
    r = down.shape[0]
    alpha = float(sd[prefix + ".alpha"]) if prefix + ".alpha" in sd else r
    return alpha / r * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)


def test_merge_of_key_styles_equals_the_dense_weighted_sum(two_styles, tmp_path) -> None:
    base_path, _base, a, b = two_styles
    report = _run(base_path, f"{tmp_path / 'a.safetensors'}:0.7,{tmp_path / 'b.safetensors'}:-0.4",
                  "rank=1000", tmp_path / "o", block_weights="2:*attn1*=0.5")
    out = load_file(report.outcomes[0].output_path)
    # one layer per base weight, named as the first member names it
    assert not any(k.startswith(COMFY[ATTN1]) for k in out)
    assert report.merged_styles == {KOHYA[ATTN1]: [COMFY[ATTN1]]}
    ca = _member_change(a, KOHYA[ATTN1])
    cb = _member_change(b, COMFY[ATTN1], ".lora_B.weight", ".lora_A.weight")
    want = 0.7 * ca + (-0.4 * 0.5) * cb
    np.testing.assert_allclose(_lora_change(out, KOHYA[ATTN1]), want, atol=2e-6 * np.abs(want).max())
    want_ff = -0.4 * _member_change(b, COMFY[FF], ".lora_B.weight", ".lora_A.weight")
    np.testing.assert_allclose(_lora_change(out, COMFY[FF]), want_ff, atol=2e-6 * np.abs(want_ff).max())
    want_conv = 0.7 * _member_change(a, KOHYA[CONV])
    np.testing.assert_allclose(_lora_change(out, KOHYA[CONV]), want_conv, atol=2e-6 * np.abs(want_conv).max())
    assert out[KOHYA[ATTN1] + ".lora_up.weight"].shape[1] == 10   # rank 4 + 6, nothing dropped


def test_merge_at_a_rank_is_the_best_rank_k_approximation(two_styles, tmp_path) -> None:
    base_path, _base, a, b = two_styles
    report = _run(base_path, f"{tmp_path / 'a.safetensors'}:1,{tmp_path / 'b.safetensors'}:0.5",
                  "rank=3", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    want = _member_change(a, KOHYA[ATTN1]) + 0.5 * _member_change(b, COMFY[ATTN1], ".lora_B.weight",
                                                                  ".lora_A.weight")
    s = np.linalg.svd(want, compute_uv=False)
    err = np.linalg.norm(_lora_change(out, KOHYA[ATTN1]) - want)
    assert out[KOHYA[ATTN1] + ".lora_down.weight"].shape[0] == 3
    assert err == pytest.approx(np.sqrt((s[3:] ** 2).sum()), rel=1e-4)
    line = next(lr for lr in report.outcomes[0].layers if lr.prefix == KOHYA[ATTN1])
    assert line.rle_lora == pytest.approx(np.sqrt((s[3:] ** 2).sum()) / np.linalg.norm(s), rel=1e-4)
    assert "rank3" in report.outcomes[0].output_path


def test_merge_subcommand_writes_one_file_per_recipe(two_styles, tmp_path, capsys) -> None:
    base_path, _base, a, b = two_styles
    rc = main(["merge", base_path, f"{tmp_path / 'a.safetensors'}:0.7", f"{tmp_path / 'b.safetensors'}:0.3",
               "-o", str(tmp_path / "m"), "-t", "32", "-r", "rank=1000:fro_lora=1,thr=-1.5",
               "--block-weights", "*.ff.*=0"])
    assert rc == 0
    files = sorted((tmp_path / "m").iterdir())
    assert len(files) == 2
    full = load_file(str(next(f for f in files if "rank1000" in f.name)))
    assert not any(k.startswith(COMFY[FF]) for k in full)       # block weight 0: nothing left
    assert _lora_change(full, KOHYA[CONV]).any()
    text = capsys.readouterr().out
    assert f"all-zero layers skipped (1): {COMFY[FF]}" in text
    assert "layers merged across key styles: 1" in text


def test_merge_subcommand_needs_two_loras(two_styles, tmp_path, capsys) -> None:
    base_path, *_ = two_styles
    rc = main(["merge", base_path, str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "m"),
               "-r", "rank=4"])
    assert rc == 2 and "at least two LoRAs" in capsys.readouterr().err


@pytest.mark.parametrize("text,why", [
    ("attn=x", "not of the form"),
    ("3:attn=1", "there is no LoRA number 3"),
    ("re:(=1", "bad regular expression"),
])
def test_bad_block_weights(text, why) -> None:
    with pytest.raises(ExtractionInputError, match=why):
        parse_block_weights(text, 2)


def test_block_weights_match_every_name_of_a_layer() -> None:
    w = parse_block_weights("input_blocks.*=0.5; 2:re:attn1=0; *.to_q.weight=3", 2)
    key = UNET + ATTN1 + ".weight"
    assert block_factor(w, 0, KOHYA[ATTN1], key) == 3.0          # last match wins
    assert block_factor(w, 1, KOHYA[ATTN1], key) == 3.0
    assert block_factor(w, 0, KOHYA[FF], UNET + FF + ".weight") == 0.5   # module path, prefix removed
    assert block_factor(w, 1, "lora_unet_attn1_x", "") == 0.0
    assert block_factor(w, 0, "lora_te1_x", "") == 1.0


# ---- conversion: numpy oracles of ComfyUI's adapter formulas -------------------------------------

def _cp_np(t, b, a):
    # [i, j, k, l] core; b [j, r]; a [i, p] -> [p, r, k, l]
    return np.einsum("ijkl,jr,ip->prkl", t, b, a)


def _lokr_oracle(sd, prefix, shape):
    w1 = _np(sd[prefix + ".lokr_w1"])
    w2a, w2b = _np(sd[prefix + ".lokr_w2_a"]), _np(sd[prefix + ".lokr_w2_b"])
    w2 = _cp_np(_np(sd[prefix + ".lokr_t2"]), w2b, w2a) if prefix + ".lokr_t2" in sd else w2a @ w2b
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return float(sd[prefix + ".alpha"]) / w2b.shape[0] * np.kron(w1, w2).reshape(shape)


def _loha_oracle(sd, prefix, shape):
    g = {n: _np(sd[f"{prefix}.hada_{n}"]) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
    m = (g["w1_a"] @ g["w1_b"]) * (g["w2_a"] @ g["w2_b"])
    return float(sd[prefix + ".alpha"]) / g["w1_b"].shape[0] * m.reshape(shape)


def _dora_oracle(w, delta, mag):
    """Patched minus original: output axis normalised by the ORIGINAL rows, input axis by the patched columns."""
    patched = w + delta
    if mag.size == w.shape[0]:
        norm = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).reshape(-1, *[1] * (w.ndim - 1))
    else:
        norm = np.sqrt((patched ** 2).sum(axis=tuple(i for i in range(w.ndim) if i != 1), keepdims=True))
    return patched * (mag.reshape(norm.shape) / (norm + np.finfo(np.float32).eps)) - w


@pytest.fixture
def adapters_file(tmp_path, gen):
    base_path, base = make_base(str(tmp_path), gen)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    sd = {
        # LoKr on a linear 32x32: w1 4x4 whole, w2 8x8 as a rank-3 product
        KOHYA[ATTN1] + ".lokr_w1": r(4, 4), KOHYA[ATTN1] + ".lokr_w2_a": r(8, 3),
        KOHYA[ATTN1] + ".lokr_w2_b": r(3, 8), KOHYA[ATTN1] + ".alpha": torch.tensor(1.5),
        # LoKr with a CP (Tucker) w2 on the 3x3 conv 16x16: w1 2x2, w2 8x8x3x3 from t2
        KOHYA[CONV] + ".lokr_w1": r(2, 2), KOHYA[CONV] + ".lokr_w2_a": r(2, 8),
        KOHYA[CONV] + ".lokr_w2_b": r(2, 8), KOHYA[CONV] + ".lokr_t2": r(2, 2, 3, 3),
        KOHYA[CONV] + ".alpha": torch.tensor(2.0),
        # LoHa on the 128x32 feed-forward
        KOHYA[FF] + ".hada_w1_a": r(128, 2), KOHYA[FF] + ".hada_w1_b": r(2, 32),
        KOHYA[FF] + ".hada_w2_a": r(128, 2), KOHYA[FF] + ".hada_w2_b": r(2, 32),
        KOHYA[FF] + ".alpha": torch.tensor(1.0),
    }
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    return base_path, base, sd


def test_lokr_and_loha_convert_to_their_exact_change(adapters_file, tmp_path) -> None:
    base_path, base, sd = adapters_file
    report = _run(base_path, str(tmp_path / "lyco.safetensors"), "rank=10000", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    assert report.converted == {KOHYA[ATTN1]: "LoKr", KOHYA[CONV]: "LoKr", KOHYA[FF]: "LoHa"}
    for name, oracle in ((ATTN1, _lokr_oracle), (CONV, _lokr_oracle), (FF, _loha_oracle)):
        shape = tuple(base[UNET + name + ".weight"].shape)
        want = oracle(sd, KOHYA[name], shape).reshape(shape[0], -1)
        got = _lora_change(out, KOHYA[name])
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=name)
    # kron rank = rank(w1) * rank(w2): 4 * 3 on the linear layer
    assert out[KOHYA[ATTN1] + ".lora_down.weight"].shape[0] == 12
    assert out[KOHYA[CONV] + ".lora_down.weight"].shape == (out[KOHYA[CONV] + ".lora_down.weight"].shape[0], 16, 3, 3)
    assert "converted to LoRA (error per layer: rle_lora): 1 LoHa, 2 LoKr" in report.format_text()


def test_conversion_at_a_rank_reports_the_optimal_error(adapters_file, tmp_path) -> None:
    base_path, base, sd = adapters_file
    report = _run(base_path, str(tmp_path / "lyco.safetensors"), "rank=2", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    want = _loha_oracle(sd, KOHYA[FF], (128, 32))
    s = np.linalg.svd(want, compute_uv=False)   # Hadamard of two rank-2 products: rank 4
    assert s[3] > 1e-3 * s[0]
    assert np.linalg.norm(_lora_change(out, KOHYA[FF]) - want) == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-4)
    line = next(lr for lr in report.outcomes[0].layers if lr.prefix == KOHYA[FF])
    assert line.rle_lora == pytest.approx(np.sqrt((s[2:] ** 2).sum()) / np.linalg.norm(s), rel=1e-3)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_converts_to_the_change_comfyui_makes(tmp_path, gen, axis) -> None:
    base_path, base = make_base(str(tmp_path), gen)
    up, down = lora_pair(128, (32,), spectrum(4, 0.5), gen, 4.0)
    w = _np(base[UNET + FF + ".weight"])
    rows = np.linalg.norm(w, axis=1 if axis == "output" else 0)
    mag = torch.tensor(rows * (1 + 0.1 * np.random.default_rng(0).standard_normal(rows.size)), dtype=torch.float32)
    mag = mag[:, None] if axis == "output" else mag[None, :]
    sd = {COMFY[FF] + ".lora_up.weight": up, COMFY[FF] + ".lora_down.weight": down,
          COMFY[FF] + ".alpha": torch.tensor(4.0), COMFY[FF] + ".dora_scale": mag}
    save_file(sd, str(tmp_path / "dora.safetensors"))
    report = _run(base_path, f"{tmp_path / 'dora.safetensors'}:0.6", "rank=10000", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    want = 0.6 * _dora_oracle(w, _np(up) @ _np(down), _np(mag))   # strength 0.6 = 0.6 x the change
    np.testing.assert_allclose(_lora_change(out, COMFY[FF]), want, atol=1e-5 * np.abs(want).max())
    assert report.converted == {COMFY[FF]: "DoRA"}
    assert COMFY[FF] + ".dora_scale" not in out


def test_dora_without_a_base_weight_is_refused() -> None:
    m = DenseModule("x", "lora", {"lora_up": "u", "lora_down": "d"}, None, "m")
    t = {"u": torch.ones(4, 1), "d": torch.ones(1, 4), "m": torch.ones(4, 1)}
    with pytest.raises(ExtractionInputError, match="DoRA rescales the patched weight.*needs the base model"):
        dense_change(m, t.__getitem__, (4, 4), None)


def test_full_difference_converts_and_bias_difference_is_copied(tmp_path, gen) -> None:
    base_path, base = make_base(str(tmp_path), gen)
    up, down = lora_pair(32, (32,), spectrum(5, 0.3), gen)
    diff = up @ down
    bias = torch.randn(16, generator=gen)
    sd = {COMFY[ATTN1] + ".diff": diff, COMFY[CONV] + ".diff_b": bias}
    save_file(sd, str(tmp_path / "full.safetensors"))
    report = _run(base_path, str(tmp_path / "full.safetensors"), "fro_lora=1,thr=-3", tmp_path / "o")
    out = load_file(report.outcomes[0].output_path)
    assert out[COMFY[ATTN1] + ".lora_down.weight"].shape[0] == 5      # the rank it really has
    np.testing.assert_allclose(_lora_change(out, COMFY[ATTN1]), _np(diff), atol=1e-5)
    torch.testing.assert_close(out[COMFY[CONV] + ".diff_b"], bias)
    assert report.converted == {COMFY[ATTN1]: "full difference"}


def test_lokr_with_the_wrong_shape_names_the_layer(tmp_path, gen) -> None:
    base_path, _ = make_base(str(tmp_path), gen)
    sd = {KOHYA[ATTN1] + ".lokr_w1": torch.ones(4, 4), KOHYA[ATTN1] + ".lokr_w2": torch.ones(4, 4)}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ExtractionInputError, match=r"LoKr layer 'lora_unet_input_blocks_4.*\[16, 16\].*\[32, 32\]"):
        _run(base_path, str(tmp_path / "bad.safetensors"), "rank=4", tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
