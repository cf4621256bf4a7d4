"""Reading a ComfyUI MODEL: patched weights in float32, quantized storage dequantized."""

from __future__ import annotations

import pytest
import torch
from comfy.model_patcher import ModelPatcher

from lora_extract.nodes.comfy_adapter import ComfyModelSource


class ScaledFp8Linear(torch.nn.Module):
    """Like ComfyUI's scaled-fp8 ops: fp8 storage, a scale, and ``convert_weight``."""

    def __init__(self, w: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.scale_weight = torch.nn.Parameter(torch.tensor(scale), requires_grad=False)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        return weight.mul_(self.scale_weight) if inplace else weight * self.scale_weight


class Net(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.diffusion_model = torch.nn.Module()
        self.diffusion_model.lin = ScaledFp8Linear(w, 0.5)
        self.diffusion_model.norm = torch.nn.LayerNorm(4)


def test_scaled_fp8_is_converted_and_patches_apply_in_float32() -> None:
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    patcher = ModelPatcher(Net(w), torch.device("cpu"), torch.device("cpu"))
    src = ComfyModelSource(patcher, "m")
    assert "diffusion_model.lin.scale_weight" in src.keys()  # left to the pairing step to skip
    stored = patcher.model.diffusion_model.lin.weight.float() * 0.5
    got = src.get("diffusion_model.lin.weight")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, stored)
    # A tiny diff patch survives: it is added in float32, never rounded to fp8 first (fp8's
    # step near these weights is ~4e-3; float32 cancellation error is ~1e-8).
    tiny = torch.full((4, 4), 1e-4)
    tuned = patcher.clone()
    tuned.add_patches({"diffusion_model.lin.weight": (tiny,)})
    diff = ComfyModelSource(tuned, "t").get("diffusion_model.lin.weight") - got
    torch.testing.assert_close(diff, tiny, rtol=0, atol=1e-7)


def test_loaded_model_reads_the_unpatched_backup() -> None:
    w = torch.randn(4, 4) * 0.1
    net = Net(w)
    patcher = ModelPatcher(net, torch.device("cpu"), torch.device("cpu"))
    tuned = patcher.clone()
    delta = torch.randn(4) * 0.01
    tuned.add_patches({"diffusion_model.norm.weight": (delta,)})
    tuned.patch_model()  # weights patched in place; originals in the shared backup
    base_src = ComfyModelSource(patcher, "base")
    tuned_src = ComfyModelSource(tuned, "tuned")
    torch.testing.assert_close(base_src.get("diffusion_model.norm.weight"), torch.ones(4))
    torch.testing.assert_close(tuned_src.get("diffusion_model.norm.weight"), torch.ones(4) + delta)


class FakeQuantized(torch.Tensor):
    """A tensor subclass standing in for ComfyUI's QuantizedTensor: knows how to dequantize."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: float):
        t = torch.Tensor._make_subclass(cls, data.to(torch.int8))
        t._scale = scale
        return t

    def dequantize(self) -> torch.Tensor:
        return torch.Tensor(self).as_subclass(torch.Tensor).float() * self._scale


def test_quantized_tensor_subclass_is_dequantized() -> None:
    from lora_extract.nodes.comfy_adapter import _dequantize

    q = FakeQuantized(torch.tensor([[1, -2], [3, 4]]), 0.25)
    out = _dequantize(q)
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.25, -0.5], [0.75, 1.0]]))


def test_a_weight_swapped_by_a_hook_is_read_from_the_hook_backup() -> None:
    # ComfyUI's weight hooks replace a weight in place and keep (original, device) in hook_backup.
    patcher = ModelPatcher(Net(torch.randn(4, 4) * 0.1), torch.device("cpu"), torch.device("cpu"))
    key = "diffusion_model.norm.weight"
    original = torch.linspace(0.5, 2.0, 4)
    patcher.hook_backup[key] = (original, torch.device("cpu"))
    with torch.no_grad():
        patcher.model.diffusion_model.norm.weight.fill_(7.0)           # the hooked weight
    torch.testing.assert_close(ComfyModelSource(patcher, "m").get(key), original, rtol=0, atol=0)


def test_weights_come_in_float32_unless_another_dtype_is_asked_for() -> None:
    patcher = ModelPatcher(Net(torch.randn(4, 4) * 0.1), torch.device("cpu"), torch.device("cpu"))
    tuned = patcher.clone()
    tuned.add_patches({"diffusion_model.norm.weight": (torch.full((4,), 1e-3),)})
    src, key = ComfyModelSource(tuned, "m"), "diffusion_model.norm.weight"
    full = src.get(key)
    assert full.dtype == torch.float32 and src.get(key, dtype=torch.float32).dtype == torch.float32
    half = src.get(key, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, full.half())


def test_nan_in_a_connected_model_or_clip_names_its_input() -> None:
    from lora_extract.extract.errors import ExtractionInputError
    from lora_extract.extract.pairing import load_difference
    from lora_extract.nodes.comfy_adapter import ComfyClipSource
    from tests.support.te_helpers import SD1ClipModel, make_clip

    patcher = ModelPatcher(Net(torch.randn(4, 4) * 0.1), torch.device("cpu"), torch.device("cpu"))
    tuned = patcher.clone()
    tuned.add_patches({"diffusion_model.norm.weight": (torch.full((4,), float("nan")),)})
    key = "diffusion_model.norm.weight"
    with pytest.raises(ExtractionInputError) as e:
        load_difference(ComfyModelSource(patcher, "original_model"), ComfyModelSource(tuned, "finetuned_model"),
                        key, key)
    assert str(e.value).startswith(f"key {key!r} in finetuned_model contains NaN or Inf values")
    base_clip = make_clip(SD1ClipModel, seed=3)
    bad_clip = base_clip.clone()
    clip_key = next(iter(base_clip.patcher.model_state_dict()))
    bad_clip.add_patches({clip_key: (torch.full_like(base_clip.patcher.model_state_dict()[clip_key],
                                                      float("inf")),)})
    te_key = "text_encoders." + clip_key
    with pytest.raises(ExtractionInputError) as e:
        load_difference(ComfyClipSource(base_clip, "original_clip"), ComfyClipSource(bad_clip, "finetuned_clip"),
                        te_key, te_key)
    assert str(e.value).startswith(f"key {te_key!r} in finetuned_clip contains NaN or Inf values")


class _NoPatcher:
    patcher = None


class _NotAPatcher:
    patcher = object()


@pytest.mark.parametrize("obj", [_NoPatcher(), _NotAPatcher()], ids=["no patcher", "not a patcher"])
def test_something_else_on_a_clip_input_is_one_clear_error(obj) -> None:
    from lora_extract.extract.errors import ExtractionInputError
    from lora_extract.nodes.comfy_adapter import ComfyClipSource

    with pytest.raises(ExtractionInputError) as e:
        ComfyClipSource(obj, "finetuned_clip")
    assert str(e.value) == (f"finetuned_clip: expected a CLIP (from Load Checkpoint or Load CLIP), got "
                            f"{type(obj).__name__}. Connect a CLIP output.")


@pytest.mark.parametrize("family", ["SD1ClipModel", "SDXLClipModel"])
def test_clip_l_projection_is_left_out_of_sd1_and_sdxl_clips_with_the_reason(family: str) -> None:
    from lora_extract.nodes.comfy_adapter import ComfyClipSource
    from tests.support import te_helpers

    src = ComfyClipSource(te_helpers.make_clip(getattr(te_helpers, family), seed=1), "finetuned_clip")
    assert src.left_out_keys() == {
        "text_encoders.clip_l.transformer.text_projection.weight":
            f"not stored in {family} checkpoints and unused by the model: ComfyUI leaves it uninitialised "
            "when loading, so its difference is noise"}
    assert "text_encoders.clip_l.transformer.text_projection.weight" in src.keys()
