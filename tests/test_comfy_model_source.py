"""Reading a ComfyUI MODEL: patched weights in float32, quantized storage dequantized."""

from __future__ import annotations

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
