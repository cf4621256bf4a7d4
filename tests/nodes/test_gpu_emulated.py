"""The nodes and the MODEL adapter as ComfyUI runs them on a GPU, on the emulated accelerator.

Weights on the GPU (a loaded model), offloaded to the CPU, and split between the two (a partly
loaded, lowvram model): the adapter must read each correctly onto the compute device, and the
nodes must write the file a CPU run writes. Real ComfyUI parameters require grad, and
``inference_mode`` covers only the node's own thread: nothing may build autograd state.
"""

from __future__ import annotations

import warnings

import comfy.model_management as mm
import comfy.utils
import pytest
import torch
from comfy.model_patcher import ModelPatcher
from safetensors.torch import load_file

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import demo_layers, make_pair
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed
from lora_extract.nodes import NODE_CLASS_MAPPINGS
from lora_extract.nodes.comfy_adapter import ComfyModelSource
from lora_extract.validation.validate import validate_lora
from tests.support.emulated_cuda import on_device
from tests.support.helpers import call_node, module_from_state_dict

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
NODE_DEFAULTS = dict(filename_prefix="loras/gpu", rank=6, lora_type="standard",
                     algorithm="svd_linalg", lowrank_iters=7, output_dtype="fp32", bias_diff=True,
                     adaptive_param=0.15, clamp_quantile=False)


def _comfy_module(sd: dict[str, torch.Tensor], requires_grad: bool = False) -> torch.nn.Module:
    """The module tree of ``sd``, each leaf module marked like ComfyUI's ``comfy.ops`` layers
    (``comfy_cast_weights``), which is what makes a partial (lowvram) load possible."""
    root = module_from_state_dict(sd)
    for m in root.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.comfy_cast_weights = False
        for p in m.parameters(recurse=False):
            p.requires_grad_(requires_grad)
    return root


def _pair_on(load_device: torch.device, width: int = 32, seed: int = 7, requires_grad=False):
    base, tuned = make_pair(demo_layers(width), seed=seed)
    patcher = ModelPatcher(_comfy_module(base, requires_grad), load_device, CPU)
    tuned_patcher = patcher.clone()
    tuned_patcher.add_patches({k: (tuned[k] - base[k],) for k in base})
    return base, tuned, patcher, tuned_patcher


def _devices(patcher: ModelPatcher) -> set[str]:
    return {p.device.type for p in patcher.model.parameters()}


def _assert_reads(src: ComfyModelSource, expected: dict[str, torch.Tensor]) -> None:
    for k, want in expected.items():
        got = src.get(k, "cuda")
        assert on_device(got) and got.dtype == torch.float32 and got.grad_fn is None
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)
        host = src.get(k, "cpu")
        assert type(host) is torch.Tensor and host.device.type == "cpu"


@pytest.mark.parametrize("state", ["offloaded", "loaded", "lowvram"])
def test_adapter_reads_gpu_cpu_and_split_weights(comfy_on_gpu, state: str) -> None:
    base, tuned, patcher, tuned_patcher = _pair_on(CUDA)
    if state == "loaded":
        mm.load_models_gpu([tuned_patcher])
        assert _devices(tuned_patcher) == {"cuda"}          # patched in place, on the GPU
        assert tuned_patcher.backup                         # originals kept on the CPU
    elif state == "lowvram":
        # What LoadedModel.model_load does when the weights do not all fit: the largest
        # modules go to the GPU (patched), the rest stay on the CPU with a LowVramPatch.
        sizes = sorted((mm.module_size(m) for m in patcher.model.modules()
                        if hasattr(m, "comfy_cast_weights")), reverse=True)
        tuned_patcher.partially_load(CUDA, extra_memory=sizes[0] + sizes[1] + 1)
        assert tuned_patcher.model.model_lowvram
        assert _devices(tuned_patcher) == {"cuda", "cpu"}
        assert any(getattr(m, "weight_function", []) for m in tuned_patcher.model.modules())
    else:
        assert _devices(tuned_patcher) == {"cpu"}
    _assert_reads(ComfyModelSource(tuned_patcher, "tuned"), tuned)
    _assert_reads(ComfyModelSource(patcher, "base"), base)
    cfg = dict(rank=6, output_dtype="fp32")
    ref = extract_lora(StateDictSource(base), StateDictSource(tuned), ExtractConfig(**cfg))
    srcs = ComfyModelSource(patcher, "base"), ComfyModelSource(tuned_patcher, "tuned")
    v1 = extract_lora(*srcs, ExtractConfig(**cfg, device="cuda"))
    v2 = extract_lora_streamed(*srcs, ExtractConfig(**cfg, device="cuda"), MemoryOptions(mode="aggressive"),
                         cache=ResidentCache())
    for out in (v1, v2.result):
        assert set(out.tensors) == set(ref.tensors)   # model order: the module tree's
        for k, t in out.tensors.items():
            assert type(t) is torch.Tensor and t.device.type == "cpu"
            torch.testing.assert_close(t, ref.tensors[k], rtol=1e-3, atol=1e-5)


def test_stub_device_mode_answers_like_comfyui_on_cuda(comfy_on_gpu) -> None:
    comfy_on_gpu.free_bytes, comfy_on_gpu.total_bytes = 10 * 2**30, 24 * 2**30
    comfy_on_gpu.allocated_bytes = 0
    assert mm.get_torch_device() == CUDA and not mm.cpu_mode()
    assert mm.unet_offload_device() == CPU
    assert mm.get_free_memory(CUDA) == 10 * 2**30 and mm.get_total_memory(CUDA) == 24 * 2**30
    assert mm.get_free_memory(CUDA, torch_free_too=True) == (10 * 2**30, 0)
    calls = comfy_on_gpu.empty_cache_calls
    mm.soft_empty_cache()
    assert comfy_on_gpu.empty_cache_calls == calls + 1


def _node_file(kind: str, patcher, tuned_patcher, **extra) -> dict[str, torch.Tensor]:
    comfy.utils._reset()
    inputs = dict(NODE_DEFAULTS, finetuned_model=tuned_patcher, original_model=patcher, **extra)
    if kind == "LoraExtractV2":
        inputs.update(vram_usage_mode="aggressive", blocks_in_gpu=20, batch_size=4)
    path = call_node(NODE_CLASS_MAPPINGS[kind], **inputs)["result"][0]
    return load_file(path)


@pytest.mark.parametrize("kind", ["LoraExtract", "LoraExtractV2"])
def test_extraction_nodes_on_the_gpu_write_the_cpu_file(comfy_on_gpu, monkeypatch, kind) -> None:
    monkeypatch.setattr("lora_extract.memory.cache.RESIDENT", ResidentCache())
    base, tuned, patcher, tuned_patcher = _pair_on(CUDA, requires_grad=True)
    mm.load_models_gpu([patcher])                 # the base model sits loaded on the GPU
    moved = comfy_on_gpu.moved_to_device
    got = _node_file(kind, patcher, tuned_patcher)
    assert comfy_on_gpu.moved_to_device > moved   # the run did use the device
    assert any(dev == CUDA for _size, dev in mm._free_memory_calls)
    ref = extract_lora(StateDictSource(base), StateDictSource(tuned),
                       ExtractConfig(rank=6, output_dtype="fp32", clamp_quantile=None))
    assert set(got) == set(ref.tensors)
    for k in got:
        torch.testing.assert_close(got[k], ref.tensors[k], rtol=1e-3, atol=1e-5)


def test_validate_node_on_the_gpu(comfy_on_gpu) -> None:
    import os

    import folder_paths
    from safetensors.torch import save_file

    base, tuned, patcher, tuned_patcher = _pair_on(CUDA, requires_grad=True)
    lora = extract_lora(StateDictSource(base), StateDictSource(tuned),
                        ExtractConfig(rank=6, output_dtype="fp32")).tensors
    os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
    path = os.path.join(folder_paths.get_output_directory(), "l.safetensors")
    save_file(lora, path)
    moved = comfy_on_gpu.moved_to_device
    text, _chart = call_node(NODE_CLASS_MAPPINGS["LoraValidate"],
        tuned_patcher, patcher, "(from lora_path)", lora_path=path)["result"]
    assert comfy_on_gpu.moved_to_device > moved
    ref = validate_lora(StateDictSource(base), StateDictSource(tuned), StateDictSource(lora, "l"))
    assert f"whole model error: {100 * ref.summary().overall_error:.2f}%" in text


def _grad_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "requires_grad" in str(w.message)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_weights_that_require_grad_build_no_autograd_state(emulated_gpu, device) -> None:
    """ComfyUI's parameters require grad; every read, in every thread, must run without
    autograd (no grad_fn on anything produced, no "Converting a tensor with requires_grad=True
    to a scalar" warning)."""
    base, tuned, patcher, tuned_patcher = _pair_on(CPU, requires_grad=True)
    assert all(p.requires_grad for p in patcher.model.parameters())
    srcs = ComfyModelSource(patcher, "base"), ComfyModelSource(tuned_patcher, "tuned")
    cfg = ExtractConfig(rank=6, output_dtype="fp32", device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [extract_lora(*srcs, cfg, prefetch=2).tensors]
        for mode in ("conservative", "aggressive"):
            outs.append(extract_lora_streamed(*srcs, cfg, MemoryOptions(mode=mode, prefetch_ahead=2),
                                        cache=ResidentCache()).result.tensors)
        report = validate_lora(*srcs, StateDictSource(outs[0], "lora"), device=device, prefetch=2)
    assert _grad_warnings(caught) == []
    for tensors in outs:
        assert all(t.grad_fn is None and not t.requires_grad for t in tensors.values())
    assert report.layers and all(r.status for r in report.layers)
