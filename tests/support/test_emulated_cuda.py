"""The emulated accelerator itself: what it marks, what it refuses, what it fakes."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.support.emulated_cuda import MIXED_DEVICES, emulated_cuda, on_device


def test_moves_mark_tensors_and_mixing_raises_cudas_error(emulated_gpu) -> None:
    x = torch.randn(4, 3).to("cuda")
    assert on_device(x) and x.device == torch.device("cuda", 0) and x.is_cuda
    for moved in (torch.ones(2).cuda(), torch.ones(2).to(torch.device("cuda", 0)),
                  torch.ones(2).to(x), torch.zeros(2, device="cuda"), torch.empty_like(x),
                  torch.ones(2).to(device="cuda", dtype=torch.float16, non_blocking=True)):
        assert on_device(moved) and moved.device.type == "cuda"
    # Results of device tensors stay on the device, through linalg and views.
    assert on_device(x @ x.T) and on_device(torch.linalg.svd(x, full_matrices=False)[1])
    assert on_device(x.view(-1)[1:]) and on_device(torch.quantile(x.flatten(), 0.5))
    for mixed in (lambda: x - torch.ones(4, 3), lambda: torch.ones(4, 3) + x,
                  lambda: x.addmm_(x, torch.eye(3)), lambda: torch.stack([x, torch.ones(4, 3)])):
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            mixed()
    assert str(MIXED_DEVICES).startswith("Expected all tensors to be on the same device")
    # As on CUDA: 0-dim CPU tensors and Python scalars mix; copies between devices work.
    assert on_device(x * torch.tensor(2.0)) and on_device(x * 2)
    y = torch.zeros(4, 3, device="cuda")
    y.copy_(torch.ones(4, 3))
    assert on_device(y) and float(y.sum()) == 12.0


def test_cpu_unmarks_and_numpy_refuses_device_tensors(emulated_gpu) -> None:
    x = torch.arange(6.0).to("cuda")
    for back in (x.cpu(), x.to("cpu"), x.to(torch.device("cpu"), torch.float16)):
        assert type(back) is torch.Tensor and back.device.type == "cpu"
    back = x.cpu()
    back[0] = 100.0                          # a copy, as a device-to-host copy is
    assert float(x[0]) == 0.0 and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
        x.numpy()


def test_pinned_memory_and_worker_threads(emulated_gpu) -> None:
    buf = torch.empty(64, dtype=torch.uint8, pin_memory=True)
    assert buf.is_pinned() and buf[8:].view(torch.float32).is_pinned()
    assert not torch.empty(4).is_pinned() and torch.ones(3).pin_memory().is_pinned()
    # The emulation covers every thread (the pack reads weights in worker threads).
    seen = []
    t = threading.Thread(target=lambda: seen.append(on_device(torch.ones(2).to("cuda"))))
    t.start()
    t.join()
    assert seen == [True]


def test_torch_cuda_is_faked_and_restored() -> None:
    real = torch.cuda.is_available()
    with emulated_cuda() as state:
        state.free_bytes = 5 * 2**30
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        assert torch.cuda.mem_get_info() == (5 * 2**30, state.total_bytes)
        torch.cuda.empty_cache()
        assert state.empty_cache_calls == 1
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            assert torch.cuda.current_stream() is side
        ev = torch.cuda.Event()
        ev.record(side)
        ev.synchronize()
        torch.ones(2).to("cuda").record_stream(torch.cuda.current_stream())
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            torch.ones(2).record_stream(side)
    assert torch.cuda.is_available() == real
    assert type(torch.ones(2)) is torch.Tensor
