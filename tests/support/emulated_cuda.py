"""An emulated CUDA device for CPU-only CI: catches tensors on the wrong device without a GPU.

Inside ``emulated_cuda()`` (or the ``emulated_cuda`` pytest fixture in conftest.py):

- every tensor moved to "cuda" (``.to("cuda")``, ``.to(torch.device("cuda", 0))``, ``.to(t)`` with
  ``t`` a device tensor, ``.cuda()``, factory calls with ``device="cuda"``) becomes a
  ``DeviceTensor``: its data stays in CPU memory, but ``.device`` says ``cuda:0`` and ``is_cuda``
  is True; every result computed from device tensors is a device tensor too;
- an operation that mixes a device tensor with a CPU tensor of one or more dimensions raises
  the RuntimeError CUDA raises ("Expected all tensors to be on the same device, ..."); 0-dim CPU
  tensors are allowed, as CUDA allows them; ``copy_`` across devices is allowed, as in torch;
- ``.cpu()`` / ``.to("cpu")`` give a plain CPU tensor (a copy, like a real device-to-host copy);
  ``.numpy()`` of a device tensor fails as on CUDA;
- ``pin_memory()`` / ``pin_memory=True`` work on a CPU-only torch (the tensor is remembered as
  pinned: ``is_pinned()`` answers True);
- ``torch.cuda`` answers as a one-GPU machine (``emulated_cuda_api.py``): ``is_available``, ``device_count``,
  ``mem_get_info`` (settable), ``memory_allocated`` / ``memory_reserved``, ``empty_cache``
  (counted), ``synchronize``, ``Stream`` / ``stream`` / ``current_stream``, ``Event`` and
  ``Tensor.record_stream``. Streams and events run everything synchronously (the CPU is done
  when the call returns); the order of stream calls is checked by the recording fake of
  ``tests/memory/test_streamer_order.py``.

The checks live at torch's dispatch level (``__torch_dispatch__``), so they see every aten
operation, including those inside ``torch.linalg`` calls and composite functions.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import return_and_correct_aliasing

from tests.support.emulated_cuda_api import fake_cuda_functions

CUDA0 = torch.device("cuda", 0)
MIXED_DEVICES = ("Expected all tensors to be on the same device, but found at least two devices, "
                 "cuda:0 and cpu!")

# Calls that legitimately take tensors of both devices, as on a real GPU: copies between
# devices, and indexing a device tensor with CPU indices.
_CROSS_DEVICE_OK = {
    torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.__getitem__,
}


class DeviceTensor(torch.Tensor):
    """A tensor "on cuda:0" whose data is the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> DeviceTensor:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=elem.device, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    # Python code sees the device; C++ kernels (which run on ``elem``) see the CPU.
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA0

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor(cuda:0, {self.elem!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        # The device check is made here, on the call as the code wrote it: below, at the
        # dispatch level, composite operations (quantile, matmul, ...) make CPU scratch tensors
        # of their own, which a real GPU would have made on the device.
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist:          # a device-to-host copy, then the list
            return args[0].elem.tolist()
        if func is torch._has_compatible_shallow_copy_type:
            # Module.to(): a device tensor cannot be poured into a CPU parameter's ``.data``;
            # a new Parameter wraps it instead (as for a real CUDA tensor).
            return type(args[0]) is type(args[1])
        if func not in _CROSS_DEVICE_OK:
            _check_same_device(args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        inner_args = pytree.tree_map_only(DeviceTensor, lambda t: t.elem, args)
        inner_kwargs = pytree.tree_map_only(DeviceTensor, lambda t: t.elem, kwargs)
        out = func(*inner_args, **inner_kwargs)
        wrapped = pytree.tree_map_only(torch.Tensor, _wrap, out)
        if func is torch.ops.aten.copy_.default:
            return args[0]
        return return_and_correct_aliasing(func, args, kwargs, wrapped)


def _wrap(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, DeviceTensor) else DeviceTensor(t)


def _check_same_device(args: Any, kwargs: Any) -> None:
    on_device = False
    on_cpu = False
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, DeviceTensor):
            on_device = True
        elif isinstance(t, torch.Tensor) and t.dim() > 0:
            on_cpu = True
    if on_device and on_cpu:
        raise RuntimeError(MIXED_DEVICES)


def to_device(t: torch.Tensor) -> DeviceTensor:
    """``t`` "copied to cuda:0" (a new storage, as a host-to-device copy is)."""
    if isinstance(t, DeviceTensor):
        return t
    return DeviceTensor(t.detach().clone() if t.requires_grad else t.clone())


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied back to the host (a plain CPU tensor)."""
    return t.elem.clone() if isinstance(t, DeviceTensor) else t


def _is_cuda(device: Any) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True             # .to(0) / .cuda(0)
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, torch.device) and device.type == "cuda"


def _is_device_arg(x: Any) -> bool:
    return isinstance(x, (str, torch.device)) and not isinstance(x, torch.dtype)


_FACTORY_NAMES = (
    "empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange",
    "linspace", "eye", "tensor", "as_tensor", "empty_strided", "empty_like", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "scalar_tensor",
)
_FACTORY_FUNCS = [getattr(torch, n) for n in _FACTORY_NAMES]
_FACTORIES = set(_FACTORY_FUNCS)
_TENSOR_METHODS = ("to", "cuda", "cpu", "numpy", "pin_memory", "is_pinned", "record_stream",
                   "data_ptr")
_ORIG: dict[str, Any] = {n: getattr(torch.Tensor, n) for n in _TENSOR_METHODS}


@dataclass
class EmulatedCuda:
    """State of one emulation: what the fake ``torch.cuda`` reports and what it was asked."""

    free_bytes: int = 16 * 2**30
    total_bytes: int = 24 * 2**30
    allocated_bytes: int = 0
    empty_cache_calls: int = 0
    synchronize_calls: int = 0
    # Pinned host allocations: data_ptr -> bytes (views of them are pinned too, as in torch).
    pinned: dict[int, int] = field(default_factory=dict)
    moved_to_device: int = 0     # tensors that entered the device (copies and factories)


class _Router:
    """Routes device moves, factories and pinned memory; everything else runs as usual.

    Installed by patching torch's Python attributes for the duration of the emulation (not a
    ``TorchFunctionMode``: modes are per thread, and the pack reads weights in worker threads).
    """

    def __init__(self, state: EmulatedCuda) -> None:
        self.state = state

    def handle(self, func, args, kwargs):
        kwargs = dict(kwargs or {})
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is _ORIG["to"]:
            return self._to(self_t, args[1:], kwargs)
        if func is _ORIG["cuda"]:
            return self._moved(to_device(self_t))
        if func is _ORIG["cpu"]:
            return to_host(self_t)
        if func is _ORIG["numpy"] and isinstance(self_t, DeviceTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                            "to copy the tensor to host memory first.")
        if func is _ORIG["pin_memory"]:
            if isinstance(self_t, DeviceTensor):
                raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors "
                                   "can be pinned")
            return self._pin(self_t.clone())
        if func is _ORIG["is_pinned"]:
            if isinstance(self_t, DeviceTensor) or self_t.numel() == 0:
                return False
            p = _ORIG["data_ptr"](self_t)
            return any(lo <= p < lo + n for lo, n in list(self.state.pinned.items()))
        if func is _ORIG["record_stream"]:
            if not isinstance(self_t, DeviceTensor):
                raise RuntimeError("record_stream: the tensor is not on a CUDA device")
            return None
        if func is _ORIG["data_ptr"] and isinstance(self_t, DeviceTensor):
            return self_t.elem.data_ptr()
        if func in _FACTORIES:
            return self._factory(func, args, kwargs)
        return func(*args, **kwargs)

    def _moved(self, t: torch.Tensor) -> torch.Tensor:
        self.state.moved_to_device += 1
        return t

    def _factory(self, func, args, kwargs):
        pin = bool(kwargs.pop("pin_memory", False))
        device = kwargs.get("device")
        if device is None and func in (torch.tensor, torch.as_tensor) and args \
                and isinstance(args[0], DeviceTensor):
            device = CUDA0
        if device is None and func.__name__.endswith("_like") and args \
                and isinstance(args[0], DeviceTensor):
            device = CUDA0
        if _is_cuda(device):
            if pin:
                raise RuntimeError("Only dense CPU tensors can be pinned")
            kwargs["device"] = "cpu"
            inner = [to_host(a) if isinstance(a, DeviceTensor) else a for a in args]
            return self._moved(DeviceTensor(func(*inner, **kwargs)))
        out = func(*args, **kwargs)
        return self._pin(out) if pin else out

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        ptr = _ORIG["data_ptr"](t)
        self.state.pinned[ptr] = t.untyped_storage().nbytes()
        weakref.finalize(t, self.state.pinned.pop, ptr, None)
        return t

    def _to(self, t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        copy = bool(kwargs.pop("copy", False))
        kwargs.pop("non_blocking", None)
        memory_format = kwargs.pop("memory_format", None)
        for a in args:
            if a is None or isinstance(a, bool):   # .to(device, dtype, non_blocking, copy)
                continue
            if isinstance(a, torch.Tensor):        # .to(other): its device and dtype
                device = a.device
                dtype = a.dtype
            elif isinstance(a, torch.dtype):
                dtype = a
            elif _is_device_arg(a) or isinstance(a, int):
                device = a
        fmt = {} if memory_format is None else {"memory_format": memory_format}
        here = isinstance(t, DeviceTensor)
        want_device = _is_cuda(device) if device is not None else here
        if want_device and not here:
            inner = _ORIG["to"](t, dtype=dtype or t.dtype, **fmt)
            return self._moved(to_device(inner))
        if not want_device and here:
            return _ORIG["to"](t.elem, dtype=dtype or t.dtype, copy=True, **fmt)
        # Same device: torch's own semantics (a no-op returns ``t`` itself).
        return _ORIG["to"](t, dtype=dtype or t.dtype, copy=copy, **fmt)


_install_lock = threading.Lock()


def _patched(router: _Router, func: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return router.handle(func, args, kwargs)
    call.__name__ = getattr(func, "__name__", "patched")
    return call


@contextlib.contextmanager
def emulated_cuda(state: EmulatedCuda | None = None) -> Iterator[EmulatedCuda]:
    """Run the block as on a one-GPU machine, in every thread; see the module docstring."""
    state = state or EmulatedCuda()
    router = _Router(state)
    fakes = fake_cuda_functions(state)
    with _install_lock:
        saved_cuda = {n: getattr(torch.cuda, n) for n in fakes if hasattr(torch.cuda, n)}
        for n, fn in fakes.items():
            setattr(torch.cuda, n, fn)
        for n in _TENSOR_METHODS:
            setattr(torch.Tensor, n, _patched(router, _ORIG[n]))
        for n in _FACTORY_NAMES:
            setattr(torch, n, _patched(router, getattr(torch, n)))
    try:
        yield state
    finally:
        with _install_lock:
            for n in _TENSOR_METHODS:
                setattr(torch.Tensor, n, _ORIG[n])
            for n, fn in zip(_FACTORY_NAMES, _FACTORY_FUNCS, strict=True):
                setattr(torch, n, fn)
            for n in fakes:
                if n in saved_cuda:
                    setattr(torch.cuda, n, saved_cuda[n])
                else:
                    delattr(torch.cuda, n)


def on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` is "on cuda:0" in the emulation."""
    return isinstance(t, DeviceTensor)
