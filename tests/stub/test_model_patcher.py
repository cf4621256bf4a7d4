"""The stub's ``comfy.model_patcher`` behaves like ComfyUI 0.3.64: patches, clones, key patches,
patching on load and restoring, the ModelSubtract flow, and its seed helper."""

from __future__ import annotations

import zlib

import comfy.model_management as mm
import comfy.model_patcher
import pytest
import torch

from tests.support.helpers import make_toy_patcher

pytestmark = pytest.mark.usefixtures("fresh_comfy_stub")

CPU = torch.device("cpu")


def test_string_to_seed_is_crc32():
    for s in ("", "diffusion_model.lin.weight", "a.b"):
        assert comfy.model_patcher.string_to_seed(s) == zlib.crc32(s.encode())


def test_add_patches_storage_clone_and_key_patches():
    p = make_toy_patcher()
    assert p.model.device == CPU and p.model.current_weight_patches_uuid is None
    d = torch.ones(6, 8)
    uuid0 = p.patches_uuid
    added = p.add_patches({"diffusion_model.lin.weight": ("diff", (d,)), "diffusion_model.nope.weight": ("diff", (d,))},
                          0.5, 0.9)
    assert added == ["diffusion_model.lin.weight"] and p.patches_uuid != uuid0
    assert p.patches["diffusion_model.lin.weight"] == [(0.5, ("diff", (d,)), 0.9, None, None)]
    added = p.add_patches({("diffusion_model.lin.weight", (0, 0, 2)): ("diff", (d[:2],))})
    assert added == [("diffusion_model.lin.weight", (0, 0, 2))]
    assert p.patches["diffusion_model.lin.weight"][1][3] == (0, 0, 2)

    c = p.clone()
    assert c.model is p.model and c.backup is p.backup and c.is_clone(p) and c.parent is p
    assert c.patches_uuid == p.patches_uuid and c.clone_has_same_weights(p)
    c.add_patches({"diffusion_model.lin.weight": ("diff", (d,))})
    assert len(c.patches["diffusion_model.lin.weight"]) == 3 and len(p.patches["diffusion_model.lin.weight"]) == 2
    assert not c.clone_has_same_weights(p)

    kp = p.get_key_patches("diffusion_model.")
    assert set(kp) == {k for k in p.model.state_dict() if k.startswith("diffusion_model.")}
    weight, convert = kp["diffusion_model.lin.weight"][0]
    assert weight is p.model.diffusion_model.lin.weight and convert(weight, inplace=True) is weight
    assert kp["diffusion_model.lin.weight"][1:] == p.patches["diffusion_model.lin.weight"]
    assert kp["diffusion_model.conv.weight"] == [(p.model.diffusion_model.conv.weight, kp["diffusion_model.conv.weight"][0][1])]
    assert set(p.model_state_dict("diffusion_model.lin")) == {"diffusion_model.lin.weight", "diffusion_model.lin.bias"}
    assert "sigmas" in p.model_state_dict()


def test_load_patches_weights_then_unpatch_restores():
    p = make_toy_patcher(dtype=torch.float16)
    orig = {k: v.clone() for k, v in p.model.state_dict().items()}
    d = torch.randn(6, 8)
    p.add_patches({"diffusion_model.lin.weight": ("diff", (d,))}, 0.25)
    mm.load_models_gpu([p])
    sd = p.model_state_dict()
    want = (orig["diffusion_model.lin.weight"].float() + 0.25 * d).half()
    assert sd["diffusion_model.lin.weight"].dtype == torch.float16
    torch.testing.assert_close(sd["diffusion_model.lin.weight"], want, rtol=0, atol=0)
    assert p.model.current_weight_patches_uuid == p.patches_uuid and p.loaded_size() == p.model_size()
    # the key patches of a patched model still start from the original weight
    torch.testing.assert_close(p.get_key_patches()["diffusion_model.lin.weight"][0][0], orig["diffusion_model.lin.weight"])
    mm.load_models_gpu([p])  # already loaded with these patches: no double application
    torch.testing.assert_close(p.model_state_dict()["diffusion_model.lin.weight"], want, rtol=0, atol=0)
    p.unpatch_model()
    for k, v in p.model.state_dict().items():
        torch.testing.assert_close(v, orig[k], rtol=0, atol=0)
    assert p.backup == {}


def test_model_subtract_flow_and_clone_switching():
    m1, m2 = make_toy_patcher(1), make_toy_patcher(2)
    w1 = {k: v.clone() for k, v in m1.model.state_dict().items()}
    w2 = {k: v.clone() for k, v in m2.model.state_dict().items()}
    # comfy_extras ModelSubtract, multiplier 1
    diff = m1.clone()
    kp = m2.get_key_patches("diffusion_model.")
    for k in kp:
        diff.add_patches({k: kp[k]}, -1.0, 1.0)
    mm.load_models_gpu([diff], force_patch_weights=True)
    sd = diff.model_state_dict("diffusion_model.")
    for k in sd:
        if k == "diffusion_model.pos_embed":
            # a parameter of a module that has children is never patched on load (ComfyUI quirk)
            torch.testing.assert_close(sd[k], w1[k], rtol=0, atol=0)
        else:
            torch.testing.assert_close(sd[k], w1[k] - w2[k], rtol=0, atol=0)
    # loading another clone of the same module restores the shared backup first
    other = m1.clone()
    other.add_patches({"diffusion_model.lin.weight": ("diff", (torch.ones(6, 8),))})
    mm.load_models_gpu([other])
    assert mm.loaded_models() == [other]
    sd = other.model_state_dict()
    torch.testing.assert_close(sd["diffusion_model.lin.weight"], w1["diffusion_model.lin.weight"] + 1)
    torch.testing.assert_close(sd["diffusion_model.conv.weight"], w1["diffusion_model.conv.weight"], rtol=0, atol=0)
