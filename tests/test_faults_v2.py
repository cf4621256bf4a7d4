"""Faults in the V2 (block-swap) extraction: the same promises as V1.

An exception, Ctrl-C or a BaseException-style ComfyUI cancel at any layer, or while the
streamer reads ahead, reaches the caller unchanged, leaves no file and no thread behind; a full
disk while writing is one clear error. (Out-of-memory degradation of V2 is checked in
tests/test_memory_runtime.py.)
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

import lora_extract.extract.pipeline as pipeline
import lora_extract.extract.writer as writer
from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource
from lora_extract.extract.synthetic import demo_layers, make_pair

manager = pytest.importorskip("lora_extract.memory.manager")
planner = pytest.importorskip("lora_extract.memory.planner")
cache_mod = pytest.importorskip("lora_extract.memory.cache")

N_LAYERS = len(demo_layers(24))


class NewComfyInterrupt(BaseException):
    """Newer ComfyUI's InterruptProcessingException derives from BaseException."""


@pytest.fixture(scope="module")
def models():
    return make_pair(demo_layers(24), seed=12)


def _run_v2(models, path: str, **kwargs):
    base, tuned = models
    return manager.extract_to_file_v2(
        StateDictSource(base, "base"), kwargs.pop("tuned", None) or StateDictSource(tuned, "tuned"),
        ExtractConfig(rank=2), planner.MemoryOptions(batch_size=4), path,
        cache=cache_mod.ResidentCache(), **kwargs)


def _new_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.mark.parametrize("at", [0, 5, N_LAYERS - 1])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), NewComfyInterrupt()])
def test_failure_at_any_layer_propagates_without_file_or_thread(models, tmp_path, monkeypatch, at: int,
                                                                exc: BaseException) -> None:
    real = pipeline.process_pair
    calls = 0

    def failing(*a, **k):
        nonlocal calls
        calls += 1
        if calls == at + 1:
            raise exc
        return real(*a, **k)

    # The manager imported process_pair by name: patch it where it is used.
    monkeypatch.setattr(manager, "process_pair", failing)
    before = set(threading.enumerate())
    with pytest.raises(type(exc)) as info:
        _run_v2(models, str(tmp_path / "lora.safetensors"))
    assert info.value is exc and calls == at + 1
    assert os.listdir(tmp_path) == []
    assert _new_threads(before) == []


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), NewComfyInterrupt()])
def test_failure_while_streaming_ahead_propagates(models, tmp_path, exc: BaseException) -> None:
    _, tuned = models
    reads = 0

    class Failing(StateDictSource):
        def get(self, key, device="cpu", dtype=None):
            nonlocal reads
            reads += 1
            if reads == 7:
                raise exc
            return super().get(key, device, dtype)

    before = set(threading.enumerate())
    with pytest.raises(type(exc)):
        _run_v2(models, str(tmp_path / "lora.safetensors"), tuned=Failing(tuned, "tuned"))
    assert os.listdir(tmp_path) == []
    assert _new_threads(before) == []


def test_disk_full_while_writing_v2_is_a_clear_error(models, tmp_path, monkeypatch) -> None:
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f) -> None:
            self._f = f

        def write(self, b) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    monkeypatch.setattr(writer.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(ExtractionInputError, match="No space left on device"):
        _run_v2(models, str(tmp_path / "lora.safetensors"))
    assert os.listdir(tmp_path) == []
