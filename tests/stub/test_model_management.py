"""The stub's ``comfy.model_management`` behaves like ComfyUI 0.3.64: the interrupt flag,
devices, free memory and model unloading."""

from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch

from tests.support.helpers import make_toy_patcher

pytestmark = pytest.mark.usefixtures("fresh_comfy_stub")

CPU = torch.device("cpu")


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
    # The real one answers the same figure twice for the CPU (psutil's available memory).
    assert mm.get_free_memory(CPU, torch_free_too=True) == (1234, 1234)
    mm._set_total_memory(99)
    assert mm.get_total_memory(CPU) == 99
    assert mm.free_memory(10, CPU) == []
    assert mm._free_memory_calls == [(10, CPU)]
    t = torch.ones(2)
    assert mm.cast_to_device(t, CPU, torch.float32) is t
    assert mm.cast_to_device(t, CPU, torch.float32, copy=True) is not t
    assert mm.cast_to_device(t, CPU, torch.float16).dtype == torch.float16


def test_free_memory_unloads_when_short_and_unload_all():
    p = make_toy_patcher()
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
