"""The fake ``torch.cuda`` of the emulated accelerator (see ``emulated_cuda.py``).

One GPU; streams and events run everything synchronously (the CPU is done when a call returns);
memory figures come from the emulation's state, so tests can set them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

CUDA0 = torch.device("cuda", 0)


class _FakeStream:
    def __init__(self, device: Any = None, priority: int = 0) -> None:
        self.device = CUDA0

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        event = event or _FakeEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _FakeEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self.recorded = False

    def record(self, stream: Any = None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_DEFAULT_STREAM = _FakeStream()
_current = threading.local()


@contextlib.contextmanager
def _stream_ctx(stream: Any) -> Iterator[None]:
    before = getattr(_current, "stream", _DEFAULT_STREAM)
    _current.stream = stream or before
    try:
        yield
    finally:
        _current.stream = before


def fake_cuda_functions(state: Any) -> dict[str, Any]:
    def empty_cache() -> None:
        state.empty_cache_calls += 1

    def synchronize(device: Any = None) -> None:
        state.synchronize_calls += 1

    props = type("Props", (), {"total_memory": state.total_bytes, "name": "Emulated GPU",
                               "major": 9, "minor": 0, "multi_processor_count": 132})
    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda device: None,
        "get_device_name": lambda device=None: "Emulated GPU",
        "get_device_properties": lambda device=None: props,
        "get_device_capability": lambda device=None: (9, 0),
        "is_bf16_supported": lambda *a, **k: True,
        "mem_get_info": lambda device=None: (state.free_bytes, state.total_bytes),
        "memory_allocated": lambda device=None: state.allocated_bytes,
        "max_memory_allocated": lambda device=None: state.allocated_bytes,
        "memory_reserved": lambda device=None: state.allocated_bytes,
        "max_memory_reserved": lambda device=None: state.allocated_bytes,
        "reset_peak_memory_stats": lambda device=None: None,
        "memory_stats": lambda device=None: {"allocated_bytes.all.current": state.allocated_bytes,
                                             "active_bytes.all.current": state.allocated_bytes,
                                             "reserved_bytes.all.current": state.allocated_bytes},
        "ipc_collect": lambda: None,
        "empty_cache": empty_cache,
        "synchronize": synchronize,
        "Stream": _FakeStream,
        "Event": _FakeEvent,
        "stream": _stream_ctx,
        "current_stream": lambda device=None: getattr(_current, "stream", _DEFAULT_STREAM),
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "is_initialized": lambda: True,
        "init": lambda: None,
    }
