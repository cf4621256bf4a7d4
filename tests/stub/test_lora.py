"""The stub's ``comfy.lora`` (calculate_weight, LoRA adapters, load_lora, the UNet key map)
behaves like ComfyUI 0.3.64, and tests/support/comfy_keymap reproduces it.

The other stub modules are covered by the neighbouring tests/test_comfy_stub_*.py files.
"""

from __future__ import annotations

import logging

import comfy.lora
import comfy.model_management as mm
import comfy.weight_adapter
import pytest
import torch
import torch.nn.functional as F

from tests.support.comfy_keymap import (
    LoraMergeError,
    apply_lora,
    comfy_patchable_keys,
    comfy_unet_key_map,
    unloaded_lora_keys,
)
from tests.support.helpers import ToyBase, make_toy_patcher

pytestmark = pytest.mark.usefixtures("fresh_comfy_stub")


def patch(value, strength: float = 1.0, strength_model: float = 1.0, offset=None, function=None) -> tuple:
    return (strength, value, strength_model, offset, function)


# --- comfy.lora.calculate_weight ----------------------------------------------------------------


def test_calculate_weight_diff_set_and_strength_model():
    torch.manual_seed(0)
    w, d = torch.randn(4, 3), torch.randn(4, 3)
    out = comfy.lora.calculate_weight([patch(("diff", (d,)), 0.5)], w.clone(), "k")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, w + 0.5 * d, rtol=0, atol=0)
    out = comfy.lora.calculate_weight([patch((d,), -1.0, strength_model=2.0)], w.clone(), "k")
    torch.testing.assert_close(out, 2.0 * w - d, rtol=0, atol=0)
    s = torch.randn(4, 3)
    out = comfy.lora.calculate_weight([patch(("set", (s,)), 0.3), patch(("diff", (d,)))], w.clone(), "k")
    torch.testing.assert_close(out, s + d, rtol=0, atol=0)
    # an offset narrows the weight: the diff must have the slice's shape
    out = comfy.lora.calculate_weight([patch(("diff", (d[:2],)), 2.0, offset=(0, 1, 2))], w.clone(), "k")
    expected = w.clone()
    expected[1:3] += 2.0 * d[:2]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_calculate_weight_logs_mismatch_and_unknown_types(caplog):
    w = torch.zeros(2, 2)
    with caplog.at_level(logging.WARNING):
        out = comfy.lora.calculate_weight([patch(("diff", (torch.ones(3),)))], w.clone(), "k.weight")
        # pre-adapter LoRA tuples are no longer understood by ComfyUI 0.3.64
        out = comfy.lora.calculate_weight([patch(("lora", (torch.ones(2, 1), torch.ones(1, 2), None, None, None, None)))],
                                          out, "k.weight")
    assert torch.equal(out, w)
    assert "WARNING SHAPE MISMATCH k.weight WEIGHT NOT MERGED" in caplog.text
    assert "patch type not recognized lora k.weight" in caplog.text


def lora_adapter(up, down, alpha=None, mid=None, dora=None) -> comfy.weight_adapter.LoRAAdapter:
    sd = {"x.lora_up.weight": up, "x.lora_down.weight": down}
    if mid is not None:
        sd["x.lora_mid.weight"] = mid
    return comfy.weight_adapter.LoRAAdapter.load("x", sd, alpha, dora, set())


def test_lora_linear_alpha_scale():
    torch.manual_seed(1)
    w, up, down = torch.randn(6, 8), torch.randn(6, 2), torch.randn(2, 8)
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down, alpha=1.0), 0.7)], w.clone(), "k")
    torch.testing.assert_close(out, w + (0.7 * 0.5) * (up @ down), rtol=0, atol=0)
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down))], w.clone(), "k")  # no alpha: scale 1
    torch.testing.assert_close(out, w + up @ down, rtol=0, atol=0)


def test_lora_conv3x3_matches_conv_composition():
    torch.manual_seed(2)
    w = torch.randn(5, 4, 3, 3)
    up, down = torch.randn(5, 2, 1, 1), torch.randn(2, 4, 3, 3)
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down, alpha=4.0))], w.clone(), "k")
    x = torch.randn(1, 4, 7, 7)
    want = F.conv2d(x, w, padding=1) + 2.0 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, out, padding=1), want, rtol=1e-4, atol=1e-4)


def test_lora_conv_5d_reshape():
    torch.manual_seed(3)
    w = torch.randn(4, 3, 2, 3, 3)
    up, down = torch.randn(4, 2, 1, 1, 1), torch.randn(2, 3, 2, 3, 3)
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down, alpha=2.0))], w.clone(), "k")
    torch.testing.assert_close(out, w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape), rtol=0, atol=0)
    x = torch.randn(1, 3, 4, 6, 6)
    want = F.conv3d(x, w) + F.conv3d(F.conv3d(x, down), up)
    torch.testing.assert_close(F.conv3d(x, out), want, rtol=1e-4, atol=1e-4)
    # a 2-D up/down (as a Linear-style extractor may write) reshapes to the conv weight too
    out2 = comfy.lora.calculate_weight([patch(lora_adapter(up.flatten(1), down.flatten(1), alpha=2.0))], w.clone(), "k")
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_lora_mid_locon_matches_conv_composition():
    torch.manual_seed(4)
    w = torch.randn(5, 4, 3, 3)
    up, mid, down = torch.randn(5, 2, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(2, 4, 1, 1)
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down, alpha=2.0, mid=mid))], w.clone(), "k")
    x = torch.randn(1, 4, 6, 6)
    want = F.conv2d(x, w, padding=1) + F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, out, padding=1), want, rtol=1e-4, atol=1e-4)


def test_lora_dora_uses_original_weight_norm_on_output_axis():
    torch.manual_seed(5)
    w, up, down = torch.randn(6, 8), torch.randn(6, 2), torch.randn(2, 8)
    mag = torch.rand(6, 1) + 0.5
    out = comfy.lora.calculate_weight([patch(lora_adapter(up, down, alpha=2.0, dora=mag))], w.clone(), "k")
    norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, (w + up @ down) * (mag / norm))


def test_lora_bad_shape_logs_error_and_keeps_weight(caplog):
    w = torch.zeros(6, 8)
    with caplog.at_level(logging.ERROR):
        out = comfy.lora.calculate_weight([patch(lora_adapter(torch.ones(5, 2), torch.ones(2, 8)))], w.clone(), "k.weight")
    assert torch.equal(out, w) and "ERROR lora k.weight" in caplog.text


# --- load_lora / model_lora_keys_unet -----------------------------------------------------------


def test_model_lora_keys_unet_generic_part():
    km = comfy.lora.model_lora_keys_unet(ToyBase(), {})
    assert km["lora_unet_lin"] == "diffusion_model.lin.weight"
    assert km["diffusion_model.lin"] == "diffusion_model.lin.weight"
    assert km["lora_unet_blocks_0"] == "diffusion_model.blocks.0.weight"
    assert km["diffusion_model.lin.bias"] == "diffusion_model.lin.bias"
    assert km["diffusion_model.pos_embed"] == "diffusion_model.pos_embed"
    assert not any("sigmas" in k for k in km)
    assert km == comfy_unet_key_map(ToyBase().state_dict())
    assert comfy.lora.model_lora_keys_unet(ToyBase()) is not comfy.lora.model_lora_keys_unet(ToyBase())


def test_load_lora_patch_types_and_unloaded_log(caplog):
    lora = {
        "lora_unet_lin.lora_up.weight": torch.ones(6, 2),
        "lora_unet_lin.lora_down.weight": torch.ones(2, 8),
        "lora_unet_lin.alpha": torch.tensor(1.0),
        "diffusion_model.lin.diff_b": torch.ones(6),
        "diffusion_model.blocks.0.lora_B.weight": torch.ones(6, 1),
        "diffusion_model.blocks.0.lora_A.weight": torch.ones(1, 6),
        "diffusion_model.norm.diff": torch.ones(6),
        "diffusion_model.norm.set_weight": torch.ones(6),  # set wins over diff on the same key
        "diffusion_model.pos_embed.diff": torch.ones(1, 4, 6),
        "diffusion_model.conv.alpha": torch.tensor(3.0),  # alpha alone is still consumed
        "lora_unet_nope.lora_up.weight": torch.ones(1, 1),
        "diffusion_model.lin.lora_magnitude": torch.ones(1),
    }
    key_map = comfy.lora.model_lora_keys_unet(ToyBase(), {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == ["lora key not loaded: lora_unet_nope.lora_up.weight",
                     "lora key not loaded: diffusion_model.lin.lora_magnitude"]
    lin = patches["diffusion_model.lin.weight"]
    assert isinstance(lin, comfy.weight_adapter.LoRAAdapter) and lin.name == "lora" and lin.weights[2] == 1.0
    assert isinstance(patches["diffusion_model.blocks.0.weight"], comfy.weight_adapter.LoRAAdapter)
    assert patches["diffusion_model.lin.bias"][0] == "diff"
    assert patches["diffusion_model.norm.weight"][0] == "set"
    assert patches["diffusion_model.pos_embed"][0] == "diff"
    assert set(patches) == {"diffusion_model.lin.weight", "diffusion_model.lin.bias", "diffusion_model.blocks.0.weight",
                            "diffusion_model.norm.weight", "diffusion_model.pos_embed"}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora(lora, key_map, log_missing=False)
    assert caplog.text == ""
    assert unloaded_lora_keys(ToyBase().state_dict(), lora) == {"lora_unet_nope.lora_up.weight",
                                                               "diffusion_model.lin.lora_magnitude"}


def test_load_lora_missing_down_raises_like_comfy():
    with pytest.raises(KeyError):
        comfy.lora.load_lora({"diffusion_model.lin.lora_up.weight": torch.ones(6, 1)}, {"diffusion_model.lin": "w"})


# --- comfy_keymap against the stub pipeline ------------------------------------------------------


def random_lora(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A LoRA touching every parameter, in mixed key styles, plus one junk key."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(sd.items()):
        if not k.startswith("diffusion_model."):
            continue
        path = k[len("diffusion_model."):]
        if k.endswith(".weight") and v.dim() >= 2:
            mod = path[: -len(".weight")]
            pre = "lora_unet_" + mod.replace(".", "_") if i % 2 else "diffusion_model." + mod
            r = 2
            up_shape = (v.shape[0], r, *([1] * (v.dim() - 2)))
            out[f"{pre}.lora_up.weight"] = torch.randn(up_shape, generator=g).half()
            out[f"{pre}.lora_down.weight"] = torch.randn((r, *v.shape[1:]), generator=g).half()
            out[f"{pre}.alpha"] = torch.tensor(1.5)
        elif k.endswith(".weight"):
            out[f"diffusion_model.{path[: -len('.weight')]}.diff"] = torch.randn(v.shape, generator=g)
        elif k.endswith(".bias"):
            out[f"diffusion_model.{path[: -len('.bias')]}.diff_b"] = torch.randn(v.shape, generator=g)
        else:
            out[f"{k}.diff"] = torch.randn(v.shape, generator=g)
    out["diffusion_model.lin.junk"] = torch.zeros(1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_lora_matches_stub_loader(dtype, caplog):
    p = make_toy_patcher(3, dtype)
    model_sd = {k: v.clone() for k, v in p.model.state_dict().items()}
    lora = random_lora(model_sd, 4)

    with caplog.at_level(logging.WARNING):
        patched, unloaded = apply_lora(model_sd, lora, strength=0.8)
    assert unloaded == {"diffusion_model.lin.junk"}

    # ComfyUI's LoraLoader path: key map, load_lora, clone + add_patches(strength), load
    caplog.clear()
    key_map = comfy.lora.model_lora_keys_unet(p.model, {})
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(lora, key_map)
    logged = {r.getMessage()[len("lora key not loaded: "):] for r in caplog.records
              if r.getMessage().startswith("lora key not loaded: ")}
    assert logged == unloaded
    lp = p.clone()
    assert set(lp.add_patches(loaded, 0.8)) == set(loaded)
    mm.load_models_gpu([lp])
    got = lp.model_state_dict()
    for k, v in got.items():
        assert v.dtype == model_sd[k].dtype
        if k == "diffusion_model.pos_embed":  # see the non-leaf quirk
            torch.testing.assert_close(v, model_sd[k], rtol=0, atol=0)
            assert not torch.equal(patched[k], model_sd[k])
        else:
            torch.testing.assert_close(v, patched[k], rtol=0, atol=0)
    assert patched["sigmas"] is model_sd["sigmas"]

    # with ComfyUI's load-time rule modelled, every key matches, pos_embed included
    patchable = comfy_patchable_keys(p.model)
    assert "diffusion_model.pos_embed" not in patchable and "sigmas" not in patchable
    assert patchable == {k for k, _ in p.model.named_parameters()} - {"diffusion_model.pos_embed"}
    with pytest.raises(LoraMergeError, match="diffusion_model.pos_embed is not patched"):
        apply_lora(model_sd, lora, strength=0.8, patchable=patchable)
    with caplog.at_level(logging.WARNING):
        patched, _ = apply_lora(model_sd, lora, strength=0.8, patchable=patchable, strict=False)
    for k, v in got.items():
        torch.testing.assert_close(v, patched[k], rtol=0, atol=0)


def test_apply_lora_formats_conv_and_errors(caplog):
    torch.manual_seed(6)
    model_sd = {
        "diffusion_model.c.weight": torch.randn(4, 3, 2, 3, 3),
        "diffusion_model.l.weight": torch.randn(6, 8),
        "diffusion_model.l.bias": torch.randn(6),
    }
    up, down = torch.randn(4, 2), torch.randn(2, 3 * 2 * 3 * 3)
    lora = {"lora_unet_c.lora_B.weight": up, "lora_unet_c.lora_A.weight": down, "lora_unet_c.alpha": torch.tensor(4.0)}
    patched, unloaded = apply_lora(model_sd, lora, strength=0.5)
    assert unloaded == set()
    want = model_sd["diffusion_model.c.weight"] + (0.5 * 2.0) * (up @ down).reshape(4, 3, 2, 3, 3)
    torch.testing.assert_close(patched["diffusion_model.c.weight"], want, rtol=0, atol=0)
    assert patched["diffusion_model.l.weight"] is model_sd["diffusion_model.l.weight"]

    bad = {"diffusion_model.l.diff": torch.ones(6, 7)}
    with pytest.raises(LoraMergeError, match="SHAPE MISMATCH"):
        apply_lora(model_sd, bad)
    with caplog.at_level(logging.WARNING):
        patched, unloaded = apply_lora(model_sd, bad, strict=False)
    assert unloaded == set() and "SHAPE MISMATCH" in caplog.text
    assert patched["diffusion_model.l.weight"] is model_sd["diffusion_model.l.weight"]
    bad_lora = {"diffusion_model.l.lora_up.weight": torch.ones(5, 1), "diffusion_model.l.lora_down.weight": torch.ones(1, 8)}
    with pytest.raises(LoraMergeError, match="ERROR lora"):
        apply_lora(model_sd, bad_lora)
    # a diff_b for a weight whose module has no bias: ComfyUI drops it as NOT LOADED
    with pytest.raises(LoraMergeError, match="NOT LOADED diffusion_model.c.bias"):
        apply_lora(model_sd, {"diffusion_model.c.diff_b": torch.ones(4)})
    assert comfy_unet_key_map(model_sd) == {
        "lora_unet_c": "diffusion_model.c.weight", "diffusion_model.c": "diffusion_model.c.weight",
        "lora_unet_l": "diffusion_model.l.weight", "diffusion_model.l": "diffusion_model.l.weight",
        "diffusion_model.l.bias": "diffusion_model.l.bias",
    }
