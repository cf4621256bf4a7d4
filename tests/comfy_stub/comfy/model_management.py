"""Stub of ``comfy.model_management``.

Two compute-device modes. CPU (the default): every device function answers CPU, as real ComfyUI
with ``--cpu``. CUDA (``_set_compute_device("cuda")``, used with the emulated accelerator of
``tests/emulated_cuda.py``): ``get_torch_device`` is ``cuda:0``, models rest on the CPU (the
real NORMAL_VRAM state), CUDA memory is read from ``torch.cuda`` exactly as the real code reads
it, and ``load_models_gpu`` loads a model partly (lowvram) when its weights do not fit, with the
real formula. CPU memory figures are configurable numbers instead of psutil queries. Model loading keeps ComfyUI's bookkeeping (``current_loaded_models``, clones of
one module unloading each other, weights patched on load), so a node that calls
``load_models_gpu([patcher])`` and then reads ``patcher.model_state_dict()`` sees patched weights
exactly as in ComfyUI.

Stub-only additions (leading underscore): ``_set_compute_device``, ``_set_free_memory``,
``_set_total_memory`` (CPU figures; the CUDA ones come from ``torch.cuda``), the call
records ``_free_memory_calls``, ``_load_models_gpu_calls``, ``_soft_empty_cache_calls``, and
``_reset()``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

# The real module sets this from torch.cuda when it can.
OOM_EXCEPTION: type[BaseException] = getattr(torch.cuda, "OutOfMemoryError", Exception)

_GIB = 1024 * 1024 * 1024
EXTRA_RESERVED_VRAM = 400 * 1024 * 1024  # the real default outside Windows

_free_memory_bytes: int = 16 * _GIB
_total_memory_bytes: int = 32 * _GIB
_free_memory_calls: list[tuple[float, torch.device]] = []
_load_models_gpu_calls: list[dict[str, Any]] = []
_soft_empty_cache_calls: int = 0

# Real: 0.4, or 0.0 on NVIDIA (``is_nvidia()``); the emulated device stands for an NVIDIA GPU.
MIN_WEIGHT_MEMORY_RATIO = 0.0


# --- interrupt ---------------------------------------------------------------------------------


class InterruptProcessingException(Exception):
    """Raised when the user cancels the queue.

    An ``Exception`` subclass in ComfyUI 0.3.64 (not ``BaseException``), so a bare
    ``except Exception`` in node code swallows a cancel.
    """


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value: bool = True) -> None:
    """Set (or clear, with ``False``) the global interrupt flag."""
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted() -> bool:
    """Whether the interrupt flag is set (does not clear it)."""
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    """Raise InterruptProcessingException if the flag is set, clearing the flag first."""
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


# --- devices -----------------------------------------------------------------------------------

_CPU = torch.device("cpu")
_compute: torch.device = _CPU


def _set_compute_device(device: str | torch.device) -> None:
    """Stub-only: "cpu" (as ``--cpu``) or "cuda" (a GPU in the real NORMAL_VRAM state)."""
    global _compute
    dev = torch.device(device)
    # The real one builds it from torch.cuda.current_device(): an index is always there.
    _compute = _CPU if dev.type == "cpu" else torch.device(dev.type, dev.index or 0)


def get_torch_device() -> torch.device:
    """The compute device: CPU, or ``cuda:<current_device>`` in CUDA mode."""
    return _compute


def unet_offload_device() -> torch.device:
    """Where diffusion models rest when not in use (the CPU unless HIGH_VRAM)."""
    return _CPU


def unet_inital_load_device(parameters: int, dtype: torch.dtype) -> torch.device:
    """Where a freshly loaded diffusion model is put (the real name has this typo)."""
    """The real NORMAL_VRAM rule: the device if it has more free memory than the CPU and the
    model fits, else the CPU."""
    if _compute.type == "cpu":
        return _CPU
    model_size = dtype_size(dtype) * parameters
    mem_dev = get_free_memory(_compute)
    if mem_dev > get_free_memory(_CPU) and model_size < mem_dev:
        return _compute
    return _CPU


def intermediate_device() -> torch.device:
    """Device for intermediate results (CPU unless --gpu-only in the real one)."""
    return _CPU


def text_encoder_device() -> torch.device:
    """Device text encoders run on."""
    return _CPU


def text_encoder_offload_device() -> torch.device:
    """Where text encoders rest."""
    return _CPU


def vae_device() -> torch.device:
    """Device the VAE runs on."""
    return _CPU


def vae_offload_device() -> torch.device:
    """Where the VAE rests."""
    return _CPU


def is_device_type(device: Any, type: str) -> bool:  # noqa: A002 - real parameter name
    """True when ``device`` has a ``.type`` equal to ``type`` (strings are never matched)."""
    return getattr(device, "type", None) == type


def is_device_cpu(device: Any) -> bool:
    """``device.type == "cpu"``."""
    return is_device_type(device, "cpu")


def is_device_cuda(device: Any) -> bool:
    """``device.type == "cuda"``."""
    return is_device_type(device, "cuda")


def is_device_mps(device: Any) -> bool:
    """``device.type == "mps"``."""
    return is_device_type(device, "mps")


def cpu_mode() -> bool:
    """Whether ComfyUI runs in CPU mode (``--cpu``; the stub's CPU mode)."""
    return _compute.type == "cpu"


def device_supports_non_blocking(device: Any) -> bool:
    """Non-blocking copies: the real one says yes except on MPS/XPU/DirectML/--deterministic."""
    return not is_device_mps(device)


# --- dtypes and casting ------------------------------------------------------------------------


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize


def cast_to(
    weight: torch.Tensor,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    non_blocking: bool = False,
    copy: bool = False,
    stream: Any = None,
) -> torch.Tensor:
    """Cast/move a tensor; returns ``weight`` itself when nothing changes and no copy is asked."""
    del stream  # CUDA streams do not exist here
    if device is None or weight.device == device:
        if not copy and (dtype is None or weight.dtype == dtype):
            return weight
        return weight.to(dtype=dtype, copy=copy)
    out = torch.empty_like(weight, dtype=dtype, device=device)
    out.copy_(weight, non_blocking=non_blocking)
    return out


def cast_to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, copy: bool = False) -> torch.Tensor:
    """``cast_to`` with the device's non-blocking policy."""
    return cast_to(tensor, dtype=dtype, device=device, non_blocking=device_supports_non_blocking(device), copy=copy)


# --- memory ------------------------------------------------------------------------------------


def module_size(module: torch.nn.Module) -> int:
    """Bytes held by a module's state dict (parameters and buffers)."""
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def extra_reserved_memory() -> int:
    """Memory ComfyUI keeps free for other applications."""
    return EXTRA_RESERVED_VRAM


def minimum_inference_memory() -> float:
    """Memory ComfyUI keeps free for inference (0.8 GiB + reserve)."""
    return _GIB * 0.8 + extra_reserved_memory()


def _is_cpu_like(dev: Any) -> bool:
    return hasattr(dev, "type") and dev.type in ("cpu", "mps")


def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> int | tuple[int, int]:
    """Total memory of ``dev``: CPU a configurable number; CUDA from ``torch.cuda`` as the real one."""
    if dev is None:
        dev = get_torch_device()
    if _is_cpu_like(dev):
        mem_total = mem_total_torch = _total_memory_bytes
    else:
        stats = torch.cuda.memory_stats(dev)
        mem_total_torch = stats["reserved_bytes.all.current"]
        _, mem_total = torch.cuda.mem_get_info(dev)
    if torch_total_too:
        return (mem_total, mem_total_torch)
    return mem_total


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> int | tuple[int, int]:
    """Free memory of ``dev``: CPU configurable (``_set_free_memory``); CUDA as the real one
    reads it: the driver's free memory plus what torch's cache holds unused.

    With ``torch_free_too`` the real one returns ``(free_total, free_inside_torch_cache)``.
    """
    if dev is None:
        dev = get_torch_device()
    if _is_cpu_like(dev):
        mem_free_total = mem_free_torch = _free_memory_bytes
    else:
        stats = torch.cuda.memory_stats(dev)
        mem_active = stats["active_bytes.all.current"]
        mem_reserved = stats["reserved_bytes.all.current"]
        mem_free_cuda, _ = torch.cuda.mem_get_info(dev)
        mem_free_torch = mem_reserved - mem_active
        mem_free_total = mem_free_cuda + mem_free_torch
    if torch_free_too:
        return (mem_free_total, mem_free_torch)
    return mem_free_total


def soft_empty_cache(force: bool = False) -> None:
    """Release cached accelerator memory (counted); on CUDA the real calls to ``torch.cuda``."""
    del force
    global _soft_empty_cache_calls
    _soft_empty_cache_calls += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


class LoadedModel:
    """Entry of ``current_loaded_models``: one ModelPatcher loaded on its load device.

    The real one holds a weakref; the stub holds the patcher strongly (tests are short-lived).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model.load_device
        self.currently_used = True
        self.real_model: torch.nn.Module | None = None

    def model_memory(self) -> int:
        return self.model.model_size()

    def model_loaded_memory(self) -> int:
        return self.model.loaded_size()

    def model_load(self, lowvram_model_memory: float = 0, force_patch_weights: bool = False) -> torch.nn.Module:
        """Patch and load the model's weights; partly (lowvram) when ``lowvram_model_memory``
        is smaller than the model."""
        extra = lowvram_model_memory if lowvram_model_memory != 0 else 1e32
        self.model.partially_load(self.device, extra, force_patch_weights=force_patch_weights)
        self.real_model = self.model.model
        return self.model.model

    def model_unload(self, memory_to_free: float | None = None, unpatch_weights: bool = True) -> bool:
        """Unload fully (the stub never unloads partially)."""
        del memory_to_free
        self.model.detach(unpatch_weights)
        self.real_model = None
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoadedModel) and self.model is other.model

    __hash__ = None  # type: ignore[assignment]  # compared by patcher identity, like the real one


current_loaded_models: list[LoadedModel] = []


def free_memory(memory_required: float, device: torch.device, keep_loaded: list[Any] | None = None) -> list[LoadedModel]:
    """Record the request; unload this device's models if free memory is short.

    The real one unloads least-useful models one by one until ``get_free_memory(device)``
    exceeds ``memory_required``. Free memory is a fixed number here, so either nothing or every
    unloadable model on ``device`` is unloaded. Returns the unloaded entries.
    """
    keep = keep_loaded or []
    _free_memory_calls.append((memory_required, device))
    unloaded: list[LoadedModel] = []
    if get_free_memory(device) > memory_required:
        return unloaded
    for entry in list(current_loaded_models):
        if entry.device == device and entry not in keep:
            logging.debug("Unloading %s", entry.model.model.__class__.__name__)
            if entry.model_unload():
                current_loaded_models.remove(entry)
                unloaded.append(entry)
    if unloaded:
        soft_empty_cache()
    return unloaded


def load_models_gpu(
    models: list[Any],
    memory_required: float = 0,
    force_patch_weights: bool = False,
    minimum_memory_required: float | None = None,
    force_full_load: bool = False,
) -> None:
    """Load ModelPatchers on their load device, patching their weights, like ComfyUI.

    Kept from the real one: a patcher already loaded is reused; every loaded clone of the same
    module (``is_clone``) is detached first *without* unpatching (the next load sees the other
    patch uuid and restores the shared backup); weights are patched with
    ``comfy.lora.calculate_weight`` through ``ModelPatcher.partially_load``; memory is freed
    only for non-CPU devices. The call is recorded in ``_load_models_gpu_calls``.
    """
    _load_models_gpu_calls.append(
        {
            "models": list(models),
            "memory_required": memory_required,
            "force_patch_weights": force_patch_weights,
            "minimum_memory_required": minimum_memory_required,
            "force_full_load": force_full_load,
        }
    )
    inference_memory = minimum_inference_memory()
    extra_mem = max(inference_memory, memory_required + extra_reserved_memory())
    if minimum_memory_required is None:
        minimum_memory_required = extra_mem
    else:
        minimum_memory_required = max(inference_memory, minimum_memory_required + extra_reserved_memory())

    wanted: list[Any] = []
    for m in models:
        for x in [m, *m.model_patches_models()]:
            if not any(x is w for w in wanted):
                wanted.append(x)

    to_load: list[LoadedModel] = []
    for x in wanted:
        entry = LoadedModel(x)
        if entry in current_loaded_models:
            entry = current_loaded_models[current_loaded_models.index(entry)]
            entry.currently_used = True
        else:
            logging.info("Requested to load %s", x.model.__class__.__name__)
        to_load.append(entry)

    for entry in to_load:
        for other in [c for c in current_loaded_models if entry.model.is_clone(c.model)]:
            current_loaded_models.remove(other)
            other.model.detach(unpatch_all=False)

    required: dict[torch.device, float] = {}
    for entry in to_load:
        required[entry.device] = required.get(entry.device, 0) + entry.model_memory()
    for device, amount in required.items():
        if not is_device_cpu(device):
            free_memory(amount * 1.1 + extra_mem, device)
    for device in required:
        if not is_device_cpu(device) and get_free_memory(device) < minimum_memory_required:
            free_memory(minimum_memory_required, device)

    for entry in to_load:
        torch_dev = entry.model.load_device
        lowvram_model_memory: float = 0
        if not is_device_cpu(torch_dev) and not force_full_load:
            # The real NORMAL_VRAM rule: what does not fit stays on the CPU (lowvram).
            loaded_memory = entry.model_loaded_memory()
            current_free_mem = get_free_memory(torch_dev) + loaded_memory
            lowvram_model_memory = max(128 * 1024 * 1024, (current_free_mem - minimum_memory_required),
                                       min(current_free_mem * MIN_WEIGHT_MEMORY_RATIO,
                                           current_free_mem - minimum_inference_memory()))
            lowvram_model_memory = max(0.1, lowvram_model_memory - loaded_memory)
        entry.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, entry)


def load_model_gpu(model: Any) -> None:
    """``load_models_gpu([model])``."""
    load_models_gpu([model])


def loaded_models(only_currently_used: bool = False) -> list[Any]:
    """Patchers currently loaded, most recent first."""
    return [e.model for e in current_loaded_models if e.currently_used or not only_currently_used]


def cleanup_models() -> None:
    """Drop entries whose module was released (never happens with strong references)."""


def cleanup_models_gc() -> None:
    """Garbage-collect leaked models (nothing to do in the stub)."""


def unload_all_models() -> None:
    """Unload everything on the compute device, via ``free_memory(1e30, ...)`` like the real one."""
    free_memory(1e30, get_torch_device())


# --- stub-only helpers -------------------------------------------------------------------------


def _set_free_memory(num_bytes: int) -> None:
    """Stub-only: what ``get_free_memory`` reports."""
    global _free_memory_bytes
    _free_memory_bytes = int(num_bytes)


def _set_total_memory(num_bytes: int) -> None:
    """Stub-only: what ``get_total_memory`` reports."""
    global _total_memory_bytes
    _total_memory_bytes = int(num_bytes)


def _reset() -> None:
    """Stub-only: unload (unpatch) every model, clear the flag, records and memory settings;
    back to CPU mode."""
    global _soft_empty_cache_calls, interrupt_processing, _compute
    for entry in list(current_loaded_models):
        entry.model_unload()
    current_loaded_models.clear()
    interrupt_processing = False
    _free_memory_calls.clear()
    _load_models_gpu_calls.clear()
    _soft_empty_cache_calls = 0
    _set_free_memory(16 * _GIB)
    _set_total_memory(32 * _GIB)
    _compute = _CPU
