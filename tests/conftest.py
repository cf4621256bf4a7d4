"""Shared fixtures. The ComfyUI stub (``tests/comfy_stub``) is importable as ``comfy`` /
``folder_paths`` and the helpers as ``tests.support``: pyproject.toml's ``pythonpath`` puts the
stub and the repository root on ``sys.path``."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch) -> None:
    """Caches (resize's base-model norms) go to a fresh folder, never the user's real one."""
    monkeypatch.setenv("LORA_EXTRACT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def comfy_dirs(tmp_path):
    """The stub's ComfyUI folders under ``tmp_path``, with no interrupt pending before or after."""
    import comfy.model_management as mm
    import folder_paths
    from server import PromptServer

    folder_paths._set_base_dir(str(tmp_path))
    mm.interrupt_current_processing(False)
    PromptServer._reset()          # a fresh recording server for each test
    yield tmp_path
    mm.interrupt_current_processing(False)


@pytest.fixture
def fresh_comfy_stub():
    """The stub's global state (loaded models, free memory, progress hook and log) reset before
    and after, so the tests of the stub itself see a freshly started ComfyUI."""
    import comfy.model_management as mm
    import comfy.utils

    mm._reset()
    comfy.utils._reset()
    yield
    mm._reset()
    comfy.utils._reset()


@pytest.fixture
def emulated_gpu():
    """A one-GPU machine emulated on the CPU (tests/support/emulated_cuda.py): tensors moved to "cuda"
    are marked, mixing them with CPU tensors raises CUDA's error, torch.cuda is faked."""
    from tests.support.emulated_cuda import emulated_cuda

    with emulated_cuda() as state:
        yield state


@pytest.fixture
def comfy_on_gpu(emulated_gpu, comfy_dirs):
    """The ComfyUI stub with a CUDA compute device (on the emulated GPU), reset afterwards."""
    import comfy.model_management as mm
    import comfy.utils

    mm._reset()
    comfy.utils._reset()
    mm._set_compute_device("cuda")
    yield emulated_gpu
    mm._reset()
    comfy.utils._reset()
