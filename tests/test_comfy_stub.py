"""The ComfyUI stub (tests/comfy_stub) and tests/comfy_keymap behave like ComfyUI 0.3.64."""

from __future__ import annotations

import logging
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_TESTS = Path(__file__).resolve().parent
for _p in (_TESTS / "comfy_stub", _TESTS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import comfy.float  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import comfy.weight_adapter  # noqa: E402
import folder_paths  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402
from comfy_keymap import (  # noqa: E402
    LoraMergeError,
    apply_lora,
    comfy_patchable_keys,
    comfy_unet_key_map,
    unloaded_lora_keys,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _reset_stub():
    mm._reset()
    comfy.utils._reset()
    yield
    mm._reset()
    comfy.utils._reset()


class ToyNet(nn.Module):
    """A small diffusion net: linear, conv 3x3, conv 1x1, conv3d, norm, and a non-leaf param."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 5, 1)
        self.conv3d = nn.Conv3d(3, 4, (2, 3, 3))
        self.norm = nn.LayerNorm(6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6, bias=False)])
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 6))  # owned by a module with children


class ToyBase(nn.Module):
    """Like comfy.model_base.BaseModel: the net lives at ``.diffusion_model``."""

    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = ToyNet()
        self.register_buffer("sigmas", torch.linspace(0, 1, 4))  # a non-diffusion key


def make_patcher(seed: int = 0, dtype: torch.dtype = torch.float32) -> ModelPatcher:
    torch.manual_seed(seed)
    return ModelPatcher(ToyBase().to(dtype), CPU, CPU)


def patch(value, strength: float = 1.0, strength_model: float = 1.0, offset=None, function=None) -> tuple:
    return (strength, value, strength_model, offset, function)


# --- model_management ---------------------------------------------------------------------------


def test_interrupt_is_an_exception_and_clears_the_flag():
    # ComfyUI 0.3.64: class InterruptProcessingException(Exception)
    assert issubclass(mm.InterruptProcessingException, Exception)
    mm.throw_exception_if_processing_interrupted()  # flag not set: no raise
    mm.interrupt_current_processing()
    assert mm.processing_interrupted()
    assert mm.processing_interrupted()  # reading does not clear
    with pytest.raises(mm.InterruptProcessingException):
        mm.throw_exception_if_processing_interrupted()
    assert not mm.processing_interrupted()  # raising clears it
    mm.throw_exception_if_processing_interrupted()
    mm.interrupt_current_processing(True)
    mm.interrupt_current_processing(False)
    assert not mm.processing_interrupted()


def test_devices_and_memory():
    assert mm.get_torch_device() == CPU
    assert mm.unet_offload_device() == CPU and mm.intermediate_device() == CPU
    assert mm.is_device_cpu(CPU) and not mm.is_device_cpu("cpu")  # strings are not devices
    mm._set_free_memory(1234)
    assert mm.get_free_memory() == 1234
    assert mm.get_free_memory(CPU, torch_free_too=True) == (1234, 0)
    mm._set_total_memory(99)
    assert mm.get_total_memory(CPU) == 99
    assert mm.free_memory(10, CPU) == []
    assert mm._free_memory_calls == [(10, CPU)]
    t = torch.ones(2)
    assert mm.cast_to_device(t, CPU, torch.float32) is t
    assert mm.cast_to_device(t, CPU, torch.float32, copy=True) is not t
    assert mm.cast_to_device(t, CPU, torch.float16).dtype == torch.float16


def test_free_memory_unloads_when_short_and_unload_all():
    p = make_patcher()
    p.add_patches({"diffusion_model.lin.weight": ("diff", (torch.ones(6, 8),))})
    before = p.model.diffusion_model.lin.weight.clone()
    mm.load_models_gpu([p])
    assert mm.loaded_models() == [p]
    mm._set_free_memory(100)
    assert mm.free_memory(50, CPU) == []  # enough free: nothing unloaded
    assert len(mm.free_memory(500, CPU)) == 1
    assert mm.loaded_models() == []
    torch.testing.assert_close(p.model.diffusion_model.lin.weight, before, rtol=0, atol=0)
    mm.load_models_gpu([p])
    mm.unload_all_models()
    assert mm.loaded_models() == [] and mm._free_memory_calls[-1][0] == 1e30


# --- utils ---------------------------------------------------------------------------------------


def test_progress_bar_hook_clamp_and_record():
    calls = []
    early = comfy.utils.ProgressBar(5)  # created before the hook: never sees it
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append((v, t, preview, node_id)))
    bar = comfy.utils.ProgressBar(3, node_id="7")
    bar.update(1)
    bar.update(1)
    bar.update(5)  # clamped to total
    bar.update_absolute(2, total=10, preview="img")
    early.update(1)
    assert calls == [(1, 3, None, "7"), (2, 3, None, "7"), (3, 3, None, "7"), (2, 10, "img", "7")]
    assert bar.updates == [(1, 3), (2, 3), (3, 3), (2, 10)]
    assert comfy.utils._progress_log[-1] == (None, 1, 5)
    assert len(comfy.utils._progress_log) == 5


def test_attr_helpers_and_torch_files(tmp_path):
    m = ToyBase()
    w = comfy.utils.get_attr(m, "diffusion_model.lin.weight")
    assert w is m.diffusion_model.lin.weight
    old = comfy.utils.set_attr_param(m, "diffusion_model.lin.weight", torch.zeros(6, 8))
    assert old is w and not m.diffusion_model.lin.weight.requires_grad
    comfy.utils.copy_to_param(m, "diffusion_model.lin.weight", torch.ones(6, 8))
    assert m.diffusion_model.lin.weight.sum() == 48
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2, dtype=torch.float16)}
    path = str(tmp_path / "x.safetensors")
    comfy.utils.save_torch_file(sd, path, metadata={"k": "v"})
    back, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    assert meta == {"k": "v"} and set(back) == {"a", "b"} and back["b"].dtype == torch.float16
    pt = str(tmp_path / "x.pt")
    torch.save({"state_dict": sd}, pt)
    assert set(comfy.utils.load_torch_file(pt)) == {"a", "b"}
    assert comfy.float.stochastic_rounding(torch.ones(2), torch.bfloat16).dtype == torch.bfloat16


def test_string_to_seed_is_crc32():
    for s in ("", "diffusion_model.lin.weight", "a.b"):
        assert comfy.model_patcher.string_to_seed(s) == zlib.crc32(s.encode())


# --- folder_paths --------------------------------------------------------------------------------


def test_folders(tmp_path):
    folder_paths._set_base_dir(tmp_path)
    loras = tmp_path / "models" / "loras"
    assert folder_paths.get_output_directory() == str(tmp_path / "output")
    assert folder_paths.get_folder_paths("loras") == [str(loras)]
    assert folder_paths.get_folder_paths("unet") == [str(tmp_path / "models" / "unet"),
                                                     str(tmp_path / "models" / "diffusion_models")]
    for d in ("output", "models/loras", "models/checkpoints", "models/diffusion_models"):
        assert (tmp_path / d).is_dir()
    (loras / "sub").mkdir()
    (loras / "sub" / "b.safetensors").write_bytes(b"")
    (loras / "a.SFT").write_bytes(b"")
    (loras / "notes.txt").write_text("x")
    assert folder_paths.get_filename_list("loras") == ["a.SFT", os.path.join("sub", "b.safetensors")]
    assert folder_paths.get_full_path("loras", "a.SFT") == str(loras / "a.SFT")
    assert folder_paths.get_full_path("loras", "../loras/a.SFT") is None  # stays inside the folder
    assert folder_paths.get_full_path("nope", "a.SFT") is None
    with pytest.raises(FileNotFoundError):
        folder_paths.get_full_path_or_raise("loras", "missing.safetensors")


def test_save_image_path_counter_and_subfolder(tmp_path):
    out = str(tmp_path / "out")
    folder, name, counter, sub, prefix = folder_paths.get_save_image_path("loras/my_lora", out)
    assert (folder, name, counter, sub, prefix) == (os.path.join(out, "loras"), "my_lora", 1, "loras", "loras/my_lora")
    assert os.path.isdir(folder)  # created when missing
    for f in ("my_lora_00001_.safetensors", "my_lora_00007_.safetensors", "my_lora_x.txt",
              "my_lora2_00050_.safetensors", "MY_LORA_00003_.png"):
        Path(folder, f).write_bytes(b"")
    # "my_lora_x.txt" counts as number 0; "my_lora2_..." is another name
    assert folder_paths.get_save_image_path("loras/my_lora", out)[2] == 8
    assert folder_paths.get_save_image_path("img_%width%x%height%", out, 64, 32)[4] == "img_64x32"


def test_save_image_path_refuses_leaving_output(tmp_path, caplog):
    out = str(tmp_path / "out")
    with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="Saving image outside the output folder is not allowed"):
        folder_paths.get_save_image_path("../x", out)
    assert "outside the output folder" in caplog.text
    with pytest.raises(Exception, match="outside the output folder"):
        folder_paths.get_save_image_path("a/../../x", out)
    # ComfyUI compares output_dir verbatim: a trailing separator refuses even a valid prefix
    with pytest.raises(Exception, match="outside the output folder"):
        folder_paths.get_save_image_path("x", out + os.sep)


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


# --- ModelPatcher ---------------------------------------------------------------------------------


def test_add_patches_storage_clone_and_key_patches():
    p = make_patcher()
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
    p = make_patcher(dtype=torch.float16)
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
    m1, m2 = make_patcher(1), make_patcher(2)
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
    p = make_patcher(3, dtype)
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
