"""Faults in the V2 (block-swap) extraction: the same promises as V1.

An exception, Ctrl-C or a BaseException-style ComfyUI cancel at any layer, or while the
streamer reads ahead, reaches the caller unchanged, leaves no file and no thread behind; a full
disk while writing is one clear error. (Out-of-memory degradation of V2 is checked in
tests/memory/test_runtime.py.)
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

import lora_extract.extract.layer_work as layer_work
import lora_extract.memory.cache as cache_mod
import lora_extract.memory.layer_store as layer_store
import lora_extract.memory.planner as planner
import lora_extract.memory.streamed_extract as streamed
from lora_extract.extract import ExtractConfig, ExtractionInputError, StateDictSource
from lora_extract.extract.synthetic import demo_layers, make_pair
from tests.support.fault_injection import NewComfyInterrupt, fail_on_call, fill_disk_after, new_threads

N_LAYERS = len(demo_layers(24))


@pytest.fixture(scope="module")
def models():
    return make_pair(demo_layers(24), seed=12)


def _run_v2(models, path: str, **kwargs):
    base, tuned = models
    return streamed.extract_to_file_streamed(
        StateDictSource(base, "base"), kwargs.pop("tuned", None) or StateDictSource(tuned, "tuned"),
        ExtractConfig(rank=2), planner.MemoryOptions(batch_size=4), path,
        cache=cache_mod.ResidentCache(), **kwargs)


@pytest.mark.parametrize("at", [0, 5, N_LAYERS - 1])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), NewComfyInterrupt()])
def test_failure_at_any_layer_propagates_without_file_or_thread(models, tmp_path, monkeypatch, at: int,
                                                                exc: BaseException) -> None:
    failing = fail_on_call(layer_work.process_pair, at + 1, exc)
    # The V2 store step imported process_pair by name: patch it where it is used.
    monkeypatch.setattr(layer_store, "process_pair", failing)
    before = set(threading.enumerate())
    with pytest.raises(type(exc)) as info:
        _run_v2(models, str(tmp_path / "lora.safetensors"))
    assert info.value is exc and failing.calls == at + 1
    assert os.listdir(tmp_path) == []
    assert new_threads(before) == []


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), NewComfyInterrupt()])
def test_failure_while_streaming_ahead_propagates(models, tmp_path, exc: BaseException) -> None:
    _, tuned = models
    failing = StateDictSource(tuned, "tuned")
    failing.get = fail_on_call(failing.get, 7, exc)  # type: ignore[method-assign]
    before = set(threading.enumerate())
    with pytest.raises(type(exc)):
        _run_v2(models, str(tmp_path / "lora.safetensors"), tuned=failing)
    assert os.listdir(tmp_path) == []
    assert new_threads(before) == []


def test_disk_full_while_writing_v2_is_a_clear_error(models, tmp_path, monkeypatch) -> None:
    fill_disk_after(monkeypatch, 0)  # the very first write fails
    with pytest.raises(ExtractionInputError, match="No space left on device"):
        _run_v2(models, str(tmp_path / "lora.safetensors"))
    assert os.listdir(tmp_path) == []
