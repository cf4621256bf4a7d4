"""The V2 streamer's asynchronous-copy path (the CUDA path), run on a CPU through a recording fake.

``memory.streams.CudaStreams`` is a pass-through to ``torch.cuda``; everything the streamer does
with it goes through the ``DeviceStreams`` protocol. ``RecordingStreams`` implements that
protocol on the CPU and checks the protocol's order as it goes:

- copies to the device are issued on the side stream only;
- a pinned buffer goes back to the pool only after an event recorded after its copies has been
  waited for on the host (else the next layer refills it while the DMA still reads it);
- every difference handed to the compute thread was marked for the compute stream's allocator,
  and the compute stream waited for its event, on the compute thread, before using it.

So the streamer's CUDA branch runs (and must match V1) in every CI run; ``tests/gpu`` repeats the
equivalence on a real device.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora
from lora_extract.extract.synthetic import LayerSpec, demo_layers, make_pair
from lora_extract.memory import buffers
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MODES, MemoryOptions
from lora_extract.memory.streamed_extract import extract_lora_streamed


@dataclass
class _Event:
    serial: int
    host_synced: bool = False
    kept: bool = False       # its difference was marked for the compute stream's allocator


@dataclass
class _Copy:
    lo: int              # byte range of the pinned memory the copy reads
    hi: int
    serial: int          # position on the side stream


@dataclass
class RecordingStreams:
    """``DeviceStreams`` on the CPU that records the calls and collects order violations."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_thread: int = field(default_factory=threading.get_ident)
    violations: list[str] = field(default_factory=list)
    copies: list[_Copy] = field(default_factory=list)
    events: list[_Event] = field(default_factory=list)
    waited: set[int] = field(default_factory=set)
    releases_checked: int = 0
    oom_on: str | None = None        # the key whose copy runs out of device memory
    copying_key: str | None = None
    _side: threading.local = field(default_factory=threading.local)
    _serial: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def on_side(self):
        self._side.active = True
        try:
            yield None
        finally:
            self._side.active = False

    def to_device(self, pinned: torch.Tensor) -> torch.Tensor:
        if not getattr(self._side, "active", False):
            self.violations.append("a copy to the device was issued outside the side stream")
        if self.oom_on is not None and self.copying_key == self.oom_on:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        with self._lock:
            self._serial += 1
            lo = pinned.data_ptr()
            self.copies.append(_Copy(lo, lo + pinned.numel() * pinned.element_size(), self._serial))
        # A real device copy is a new tensor; the pinned buffer is free to reuse afterwards.
        return pinned.to(self.device, copy=True)

    def mark(self) -> _Event:
        with self._lock:
            event = _Event(self._serial)
            self.events.append(event)
        self._side.last = event
        return event

    def wait_host(self, event: _Event) -> None:
        event.host_synced = True

    def keep_for_compute(self, t: torch.Tensor) -> None:
        event = getattr(self._side, "last", None)
        if event is None or not event.host_synced:
            self.violations.append("a difference was handed over before its event was waited for")
        else:
            event.kept = True

    def compute_waits(self, event: _Event) -> None:
        if threading.get_ident() != self.compute_thread:
            self.violations.append("the compute stream waited from another thread")
        self.waited.add(id(event))

    def copy_done(self, copy: _Copy) -> bool:
        return any(e.host_synced and e.serial >= copy.serial for e in self.events)

    def check_release(self, buf: torch.Tensor) -> None:
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        with self._lock:
            self.releases_checked += 1
            for c in self.copies:
                if c.lo < hi and lo < c.hi and not self.copy_done(c):
                    self.violations.append("a pinned buffer went back to the pool while a copy "
                                           "from it was still in flight")


@pytest.fixture
def recording(monkeypatch) -> RecordingStreams:
    rec = RecordingStreams()
    original = buffers.StagingPool.release

    def checked_release(self, buf):
        rec.check_release(buf)
        original(self, buf)
    monkeypatch.setattr(buffers.StagingPool, "release", checked_release)
    # Which key the reader is copying, for the simulated out-of-memory.
    from lora_extract.memory import streamer
    stage = streamer.PairStreamer._stage_and_copy

    def tagged(self, pair, staged, streams):
        rec.copying_key = pair.tuned_key
        return stage(self, pair, staged, streams)
    monkeypatch.setattr(streamer.PairStreamer, "_stage_and_copy", tagged)
    return rec


class ModelLikeSource:
    """A source the streamer does not stage (as a ComfyUI MODEL): asked for the device directly."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        self._inner = StateDictSource(tensors, name)
        self.name = name

    def keys(self) -> list[str]:
        return self._inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._inner.shape(key)

    def get(self, key: str, device="cpu", dtype=None) -> torch.Tensor:
        return self._inner.get(key, device, dtype)


GIB = 2**30


def _roomy_device() -> tuple[int, int]:
    """A VRAM reading with room to spare: blocks stay resident, as on a real GPU."""
    return 8 * GIB, 16 * GIB


def _layers() -> list[LayerSpec]:
    return demo_layers(32) + [
        LayerSpec("diffusion_model.output_blocks.2.1.proj.weight", (32, 32), 8),
        LayerSpec("diffusion_model.middle_block.0.proj.weight", (32, 32), 8),
        LayerSpec("diffusion_model.middle_block.0.proj2.weight", (32, 32), 8),
    ]


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    return make_pair(_layers(), seed=9, dtype=torch.float16)


def _same(a, b) -> None:
    assert list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k].float(), a.tensors[k].float(), rtol=2e-3,
                                   atol=2e-4)


def _check_protocol(rec: RecordingStreams, out) -> None:
    assert rec.violations == []
    # Every layer that came through the side stream was waited for by the compute stream.
    assert rec.events and {id(e) for e in rec.events} == rec.waited
    assert all(e.host_synced and e.kept for e in rec.events)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ahead", [0, 2])
def test_async_copy_path_equals_v1_and_keeps_the_order(pair, recording, mode, ahead) -> None:
    base, tuned = StateDictSource(pair[0], "base"), StateDictSource(pair[1], "tuned")
    cfg = ExtractConfig(rank=6, output_dtype="fp32")
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(mode=mode, prefetch_ahead=ahead),
                          cache=ResidentCache(), probe=_roomy_device, streams=recording,
                          batched_svd=True)
    _same(v1, out.result)
    _check_protocol(recording, out)
    # Both weights of every layer went through pinned staging and were released checked.
    assert len(recording.copies) == 2 * len(recording.events)
    assert recording.releases_checked >= len(recording.copies)


def test_the_order_check_has_teeth(pair, recording, monkeypatch) -> None:
    """Skipping the host wait before reusing pinned buffers must be reported."""
    monkeypatch.setattr(RecordingStreams, "wait_host", lambda self, event: None)
    base, tuned = StateDictSource(pair[0], "base"), StateDictSource(pair[1], "tuned")
    extract_lora_streamed(base, tuned, ExtractConfig(rank=4), MemoryOptions(prefetch_ahead=1),
                    cache=ResidentCache(), probe=_roomy_device, streams=recording)
    assert any("still in flight" in v for v in recording.violations)


def test_model_sources_are_read_on_the_side_stream(pair, recording) -> None:
    base, tuned = ModelLikeSource(pair[0], "base"), ModelLikeSource(pair[1], "tuned")
    cfg = ExtractConfig(rank=6)
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(), cache=ResidentCache(),
                          probe=_roomy_device, streams=recording)
    _same(v1, out.result)
    _check_protocol(recording, out)
    assert recording.copies == []          # no pinned staging for a MODEL


def test_out_of_memory_during_a_copy_extracts_that_layer_on_the_cpu(pair, recording) -> None:
    key = "diffusion_model.middle_block.0.proj.weight"
    recording.oom_on = key
    base, tuned = StateDictSource(pair[0], "base"), StateDictSource(pair[1], "tuned")
    cfg = ExtractConfig(rank=6)
    v1 = extract_lora(base, tuned, cfg)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(prefetch_ahead=2),
                          cache=ResidentCache(), probe=_roomy_device, streams=recording)
    _same(v1, out.result)
    assert recording.violations == []
    assert [e for e in out.memory.oom_events if key in e]


def test_resident_layers_skip_the_copy_on_the_second_run(pair, recording) -> None:
    base, tuned = StateDictSource(pair[0], "base"), StateDictSource(pair[1], "tuned")
    cache = ResidentCache()
    opts = MemoryOptions(mode="maximum")
    first = extract_lora_streamed(base, tuned, ExtractConfig(rank=4), opts, cache=cache,
                            probe=_roomy_device, streams=recording)
    copies = len(recording.copies)
    assert first.memory.cached_layers > 0
    second = extract_lora_streamed(base, tuned, ExtractConfig(rank=8), opts, cache=cache,
                             probe=_roomy_device, streams=recording)
    assert second.memory.cache_hits == first.memory.cached_layers
    assert len(recording.copies) - copies == copies - 2 * first.memory.cached_layers
    _check_protocol(recording, second)


def test_files_are_read_straight_into_pinned_buffers(tmp_path, recording, monkeypatch) -> None:
    from lora_extract.extract.sources import SafetensorsSource
    from lora_extract.extract.synthetic import write_pair

    paths = write_pair(str(tmp_path), _layers(), seed=9, dtype=torch.bfloat16)
    base, tuned = (SafetensorsSource(p) for p in paths)
    cfg = ExtractConfig(rank=6)
    v1 = extract_lora(base, tuned, cfg)
    reads = []
    real = SafetensorsSource.read_into

    def counted(self, key, buffer):
        reads.append(key)
        return real(self, key, buffer)
    monkeypatch.setattr(SafetensorsSource, "read_into", counted)
    out = extract_lora_streamed(base, tuned, cfg, MemoryOptions(prefetch_ahead=2),
                          cache=ResidentCache(), probe=_roomy_device, streams=recording)
    _same(v1, out.result)
    _check_protocol(recording, out)
    # Both weights of every streamed layer went file -> pinned buffer -> device.
    assert len(reads) == len(recording.copies) == 2 * len(recording.events)
