"""Format and rounding noise of quantized weights a ComfyUI MODEL holds (``ComfyModelSource``).

Both ways ComfyUI hands them over: 0.3.64's fp8 module weight with a ``scale_weight`` attribute,
and the newest ComfyUI's ``QuantizedTensor`` (codes in ``_qdata``, the layout class name in
``_layout_cls``, scales in ``_params``). The node path must report what the file path reports
for the same stored codes and scales, and the noise must be the independent estimate
``sqrt(sum (step * scale)^2 / 12)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from comfy.model_patcher import ModelPatcher
from safetensors.torch import save_file

from lora_extract.extract.config import ExtractConfig
from lora_extract.extract.formats.dispatch import open_source
from lora_extract.extract.pipeline import extract_lora
from lora_extract.extract.source_info import describe, format_of, quantization_noise
from lora_extract.nodes.comfy_adapter import ComfyModelSource
from tests.support.quant_files import mxfp8_example, nvfp4_example, write_comfy_quant, write_scaled_fp8


def fp8_noise_oracle(codes: torch.Tensor, scale: float) -> float:
    """Element by element: an e4m3fn value ``v`` has the spacing ``2**(floor(log2|v|) - 3)``
    (exponent at least -6; zero and subnormals share the smallest normal spacing)."""
    total = 0.0
    for v in codes.float().reshape(-1).tolist():
        e = max(math.floor(math.log2(abs(v))), -6) if v != 0.0 else -6
        total += (2.0 ** (e - 3) * scale) ** 2 / 12.0
    return math.sqrt(total)


class ScaledFp8Linear(torch.nn.Module):
    """ComfyUI 0.3.64's scaled-fp8 Linear: fp8 weight, ``scale_weight``, ``convert_weight``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.scale_weight = None if scale is None else torch.nn.Parameter(scale, requires_grad=False)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        if self.scale_weight is None:
            return weight
        return weight.mul_(self.scale_weight) if inplace else weight * self.scale_weight


@dataclass(frozen=True)
class Params:
    scale: torch.Tensor
    orig_dtype: torch.dtype
    orig_shape: tuple[int, ...]
    block_scale: torch.Tensor | None = None


class FakeQuantizedTensor(torch.Tensor):
    """The attributes of comfy_kitchen's QuantizedTensor that ComfyUI's model holds (a float
    tensor of the dequantized value underneath, so the stub's state dict can list it)."""

    @staticmethod
    def __new__(cls, value: torch.Tensor, qdata: torch.Tensor, layout: str, params: Params):
        t = torch.Tensor._make_subclass(cls, value)
        t._qdata, t._layout_cls, t._params = qdata, layout, params
        return t

    def detach(self) -> FakeQuantizedTensor:  # what nn.Parameter calls: keep the storage
        return FakeQuantizedTensor(torch.Tensor(self).detach(), self._qdata, self._layout_cls,
                                   self._params)

    def dequantize(self) -> torch.Tensor:
        return torch.Tensor(self).clone()


class QuantLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def _patcher(layers: dict[str, torch.nn.Module]) -> ModelPatcher:
    net = torch.nn.Module()
    net.diffusion_model = torch.nn.Module()
    for name, module in layers.items():
        setattr(net.diffusion_model, name, module)
    net.diffusion_model.norm = torch.nn.LayerNorm(4)
    return ModelPatcher(net, torch.device("cpu"), torch.device("cpu"))


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max() / 448.0).float().reshape(())
    return (w / scale).to(torch.float8_e4m3fn), scale


W = torch.randn(24, 16, generator=torch.Generator().manual_seed(3)) * 0.05


def test_comfyui_0364_scaled_fp8_weight_reports_format_and_noise(tmp_path) -> None:
    codes, scale = _fp8(W)
    src = ComfyModelSource(_patcher({"lin": ScaledFp8Linear(codes, scale),
                                     "raw": ScaledFp8Linear(codes, None)}), "m")
    key = "diffusion_model.lin.weight"
    assert format_of(src, key) == "float8_e4m3fn scaled"
    assert format_of(src, "diffusion_model.raw.weight") == "float8_e4m3fn"
    assert format_of(src, "diffusion_model.norm.weight") == "fp32"
    assert quantization_noise(src, "diffusion_model.norm.weight") is None
    noise = quantization_noise(src, key)
    assert noise == pytest.approx(fp8_noise_oracle(codes, float(scale)), rel=1e-9)
    assert quantization_noise(src, "diffusion_model.raw.weight") == pytest.approx(
        fp8_noise_oracle(codes, 1.0), rel=1e-9)
    # The same codes and scale in a scaled-fp8 file: the file reader says the same.
    path = str(tmp_path / "m.safetensors")
    write_scaled_fp8(path, {"lin.weight": W}, {})
    fsrc = open_source(path)
    assert format_of(fsrc, "lin.weight") == "float8_e4m3fn scaled"
    assert quantization_noise(fsrc, "lin.weight") == pytest.approx(noise, rel=1e-12)
    assert "float8_e4m3fn scaled" in describe(src, "base")


@pytest.mark.parametrize("layout,fmt", [("TensorCoreFP8E4M3Layout", "float8_e4m3fn"),
                                        ("TensorCoreFP8E5M2Layout", "float8_e5m2"),
                                        ("TensorWiseINT8Layout", "int8_tensorwise")])
def test_newest_comfyui_quantized_tensor_matches_the_file_reader(tmp_path, layout, fmt) -> None:
    path = str(tmp_path / "q.safetensors")
    write_comfy_quant(path, {"lin.weight": W}, {}, fmt)
    fsrc = open_source(path)
    from safetensors.torch import load_file

    sd = load_file(path)
    qdata, scale = sd["lin.weight"], sd["lin.weight_scale"]
    value = fsrc.get("lin.weight")
    qt = FakeQuantizedTensor(value, qdata, layout, Params(scale, torch.bfloat16, tuple(W.shape)))
    src = ComfyModelSource(_patcher({"lin": QuantLinear(qt)}), "m")
    key = "diffusion_model.lin.weight"
    want = fmt if fmt == "int8_tensorwise" else f"{fmt} scaled"
    assert format_of(src, key) == format_of(fsrc, "lin.weight") == want
    assert quantization_noise(src, key) == pytest.approx(quantization_noise(fsrc, "lin.weight"),
                                                         rel=1e-12)
    if fmt == "int8_tensorwise":  # every int8 step is the scale
        assert quantization_noise(src, key) == pytest.approx(
            float(scale) * math.sqrt(W.numel() / 12.0), rel=1e-9)
    else:
        assert quantization_noise(src, key) > 0
    torch.testing.assert_close(src.get(key), value, rtol=0, atol=0)


def test_newest_comfyui_nvfp4_and_mxfp8_match_the_file_reader(tmp_path) -> None:
    packed, blocked, ts, value = nvfp4_example(32, 64)
    codes, scales, mvalue = mxfp8_example(32, 64)
    for name, sd, qt in (
            ("n", {"n.weight": packed, "n.weight_scale": blocked, "n.weight_scale_2": ts},
             FakeQuantizedTensor(value, packed, "TensorCoreNVFP4Layout",
                                 Params(ts, torch.bfloat16, (32, 64), block_scale=blocked))),
            ("m", {"m.weight": codes, "m.weight_scale": scales},
             FakeQuantizedTensor(mvalue, codes, "TensorCoreMXFP8Layout",
                                 Params(scales, torch.bfloat16, (32, 64))))):
        fmt = "nvfp4" if name == "n" else "mxfp8"
        conf = torch.tensor(list(f'{{"format": "{fmt}"}}'.encode()), dtype=torch.uint8)
        path = str(tmp_path / f"{name}.safetensors")
        save_file({**sd, f"{name}.comfy_quant": conf}, path)
        fsrc = open_source(path)
        src = ComfyModelSource(_patcher({name: QuantLinear(qt)}), "m")
        key = f"diffusion_model.{name}.weight"
        assert format_of(src, key) == format_of(fsrc, f"{name}.weight") == fmt
        expected = quantization_noise(fsrc, f"{name}.weight")
        assert expected is not None and expected > 0
        assert quantization_noise(src, key) == pytest.approx(expected, rel=1e-12)


def test_unknown_layout_is_named_without_a_noise_estimate() -> None:
    qt = FakeQuantizedTensor(W.clone(), W.to(torch.int8), "SomeFutureLayout",
                             Params(torch.tensor(1.0), torch.bfloat16, tuple(W.shape)))
    src = ComfyModelSource(_patcher({"lin": QuantLinear(qt)}), "m")
    assert format_of(src, "diffusion_model.lin.weight") == "SomeFutureLayout"
    assert quantization_noise(src, "diffusion_model.lin.weight") is None


def test_models_from_scaled_fp8_files_get_a_noise_floor_in_the_report() -> None:
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) * 0.01
    (cb, sb), (ct, st) = _fp8(W), _fp8(W + delta)
    base = ComfyModelSource(_patcher({"lin": ScaledFp8Linear(cb, sb)}), "base")
    tuned = ComfyModelSource(_patcher({"lin": ScaledFp8Linear(ct, st)}), "tuned")
    res = extract_lora(base, tuned, ExtractConfig(rank=4, output_dtype="fp32", clamp_quantile=None))
    assert res.report is not None
    layer = next(r for r in res.report.layers if r.key == "diffusion_model.lin.weight")
    diff = ct.float() * st - cb.float() * sb
    fro = float(torch.linalg.norm(diff.double()))
    floor = math.hypot(fp8_noise_oracle(cb, float(sb)), fp8_noise_oracle(ct, float(st)))
    assert layer.noise_floor == pytest.approx(floor / fro, rel=1e-6)
    assert res.report.inputs[0].startswith("base:") and "float8_e4m3fn scaled" in res.report.inputs[0]
