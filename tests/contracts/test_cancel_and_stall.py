"""Cancel always works and a stall is an error, even when a reader or a worker is stuck.

A source whose reads block on an event stands for a read that never returns. The user presses
Cancel (ComfyUI's interrupt, through ``check_interrupt``) or Ctrl-C (``KeyboardInterrupt`` in
the main thread) while the run waits for it: V1, V2 (rolling and batch-barrier consumers),
the size-budgeted pass and validation each stop within 2 s, and no output or temporary file is
left. With no cancel, the stall bound stops the run with an error naming who waits for what.
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import pytest

import lora_extract.memory.streamed_extract as streamed
from lora_extract.extract import ExtractConfig, StateDictSource, extract_lora, extract_to_file
from lora_extract.extract.errors import ExtractionInputError, ExtractionStalled
from lora_extract.extract.synthetic import demo_layers, make_pair
from lora_extract.extract.waits import STALL_ENV, RunWatch, stall_timeout_s
from lora_extract.memory import batch_decompose
from lora_extract.memory.cache import ResidentCache
from lora_extract.memory.planner import MemoryOptions
from lora_extract.validation.validate import validate_lora

CANCEL_AT_S = 0.5      # the user presses Cancel this long after the reader got stuck
LIMIT_S = 2.0          # the promise


class Cancelled(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


class StuckSource(StateDictSource):
    """Reads block (as a read that never returns) from call ``after`` on, until ``unblock``."""

    def __init__(self, tensors, name: str, after: int) -> None:
        super().__init__(tensors, name)
        self.after = after
        self.calls = 0
        self.stuck = threading.Event()
        self.unblock = threading.Event()

    def get(self, key, device="cpu", dtype=None):
        self.calls += 1
        if self.calls >= self.after:
            self.stuck.set()
            self.unblock.wait(60)
        return super().get(key, device, dtype)


@pytest.fixture(scope="module")
def models():
    return make_pair(demo_layers(24), seed=5)


class CancelButton:
    """``check_interrupt`` for the run: raises once pressed; records when it was pressed."""

    def __init__(self) -> None:
        self.pressed_at: float | None = None

    def press(self) -> None:
        self.pressed_at = time.monotonic()

    def __call__(self) -> None:
        if self.pressed_at is not None:
            raise Cancelled()


def _press_when_stuck(source: StuckSource, press) -> threading.Thread:
    def run() -> None:
        if source.stuck.wait(30):
            time.sleep(CANCEL_AT_S)
            press()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _v1(base, tuned, path, check):
    return extract_to_file(base, tuned, ExtractConfig(rank=2), path, check_interrupt=check)


def _budget(base, tuned, path, check):
    return extract_to_file(base, tuned, ExtractConfig(rank=4, target_size_mb=0.01), path,
                           check_interrupt=check)


def _v2(opts):
    def run(base, tuned, path, check):
        return streamed.extract_to_file_streamed(base, tuned, ExtractConfig(rank=2), opts, path,
                                          check_interrupt=check, cache=ResidentCache())
    return run


def _validate(base, tuned, path, check):
    lora = extract_lora(base, StateDictSource(tuned._tensors, "tuned"), ExtractConfig(rank=2))
    return validate_lora(base, tuned, StateDictSource(lora.tensors, "lora"),
                         check_interrupt=check)


RUNS = {
    "v1": _v1,
    "v1_budget": _budget,
    "v2_rolling": _v2(MemoryOptions(mode="balanced", batch_size=4, prefetch_ahead=2)),
    "v2_barrier": _v2(MemoryOptions(mode="balanced", batch_size=1, prefetch_ahead=2)),
    "v2_maximum": _v2(MemoryOptions(mode="maximum", batch_size=8)),
    # No read-ahead: the main thread reads, and the batch's layers run in workers.
    "v2_barrier_workers": _v2(MemoryOptions(mode="balanced", batch_size=4, prefetch_ahead=0)),
    "validate": _validate,
}


def _threads_of_runs() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lora-extract")}


# Every run whose reads happen in a background thread (without read-ahead the main thread
# reads itself, and a read that never returns cannot be left behind there).
@pytest.mark.parametrize("name", [n for n in RUNS if n != "v2_barrier_workers"])
@pytest.mark.parametrize("after", [1, 9])
def test_cancel_stops_within_two_seconds_with_the_reader_stuck(models, tmp_path, name: str,
                                                               after: int) -> None:
    base_sd, tuned_sd = models
    tuned = StuckSource(tuned_sd, "tuned", after)
    button = CancelButton()
    _press_when_stuck(tuned, button.press)
    try:
        with pytest.raises(Cancelled):
            RUNS[name](StateDictSource(base_sd, "base"), tuned, str(tmp_path / "out.safetensors"),
                       button)
        took = time.monotonic() - (button.pressed_at or 0.0)
    finally:
        tuned.unblock.set()      # the stuck read returns; the left-behind reader ends
    assert took < LIMIT_S, f"{name}: stopped {took:.2f} s after Cancel"
    assert os.listdir(tmp_path) == []                   # no output, no temporary file
    deadline = time.monotonic() + 5
    while _threads_of_runs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _threads_of_runs()


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT handled by Python, as in a terminal. A test run started in the background or with
    nohup inherits SIGINT ignored, and ``_thread.interrupt_main`` then does nothing."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("name", ["v1", "v2_rolling", "v2_barrier"])
def test_ctrl_c_reaches_the_main_thread_while_it_waits(models, tmp_path, name: str,
                                                       ctrl_c_as_in_a_terminal) -> None:
    base_sd, tuned_sd = models
    tuned = StuckSource(tuned_sd, "tuned", 3)
    pressed: list[float] = []

    def ctrl_c() -> None:
        pressed.append(time.monotonic())
        _thread.interrupt_main()        # what SIGINT does: KeyboardInterrupt in the main thread

    _press_when_stuck(tuned, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            RUNS[name](StateDictSource(base_sd, "base"), tuned, str(tmp_path / "out.safetensors"),
                       None)
            time.sleep(30)              # pragma: no cover - only reached if the run ended early
        took = time.monotonic() - pressed[0]
    finally:
        tuned.unblock.set()
    assert took < LIMIT_S
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["v1", "v2_rolling", "v2_barrier", "validate"])
def test_a_stuck_reader_is_a_stall_error_naming_who_waits_for_what(models, tmp_path, monkeypatch,
                                                                   name: str) -> None:
    monkeypatch.setenv(STALL_ENV, "0.6")
    base_sd, tuned_sd = models
    tuned = StuckSource(tuned_sd, "tuned", 4)
    t0 = time.monotonic()
    try:
        with pytest.raises(ExtractionStalled) as info:
            RUNS[name](StateDictSource(base_sd, "base"), tuned, str(tmp_path / "out.safetensors"),
                       None)
    finally:
        tuned.unblock.set()
    msg = str(info.value)
    assert time.monotonic() - t0 < 0.6 + LIMIT_S
    assert "no layer completed for" in msg and "bound 0.6 s" in msg and STALL_ENV in msg
    # The waiting thread and what it waits for, and where the stuck reader is.
    assert "waits for the next" in msg and "from the reader" in msg, msg
    assert "lora-extract-prefetch is busy at test_cancel_and_stall.py" in msg, msg
    assert "No file was written" in msg and os.listdir(tmp_path) == []


def test_a_stuck_worker_is_a_stall_error_too(models, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(STALL_ENV, "0.6")
    release = threading.Event()
    real = batch_decompose.extract_matrix

    def stuck(*a, **k):
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(batch_decompose, "extract_matrix", stuck)
    base_sd, tuned_sd = models
    try:
        with pytest.raises(ExtractionStalled) as info:
            RUNS["v2_rolling"](StateDictSource(base_sd, "base"), StateDictSource(tuned_sd, "t"),
                               str(tmp_path / "out.safetensors"), None)
    finally:
        release.set()
    assert "MainThread waits for a layer worker to finish" in str(info.value)
    assert "lora-extract-layer" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, reader_stuck", [("v2_rolling", True), ("v2_barrier_workers", False)])
def test_cancel_with_a_worker_stuck_stops_within_two_seconds(models, tmp_path, monkeypatch,
                                                             name: str, reader_stuck: bool) -> None:
    """A layer worker stuck in its decomposition (and, rolling, the reader stuck as well)."""
    release = threading.Event()
    started = threading.Event()
    real = batch_decompose.extract_matrix

    def stuck(*a, **k):
        started.set()
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(batch_decompose, "extract_matrix", stuck)
    base_sd, tuned_sd = models
    tuned = StuckSource(tuned_sd, "tuned", 6 if reader_stuck else 10**9)
    button = CancelButton()

    def press_when_stuck() -> None:
        if started.wait(30) and (not reader_stuck or tuned.stuck.wait(30)):
            time.sleep(CANCEL_AT_S)
            button.press()
    threading.Thread(target=press_when_stuck, daemon=True).start()
    try:
        with pytest.raises(Cancelled):
            RUNS[name](StateDictSource(base_sd, "base"), tuned, str(tmp_path / "out.safetensors"),
                       button)
        took = time.monotonic() - (button.pressed_at or 0.0)
    finally:
        release.set()
        tuned.unblock.set()
    assert took < LIMIT_S, f"{name}: stopped {took:.2f} s after Cancel"
    assert os.listdir(tmp_path) == []


def test_the_stall_bound_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(STALL_ENV, raising=False)
    assert stall_timeout_s() == 600.0
    monkeypatch.setenv(STALL_ENV, "0")
    assert stall_timeout_s() == 0.0 and RunWatch().stall_s == 0.0
    for bad in ("-1", "ten", "inf", "nan"):
        monkeypatch.setenv(STALL_ENV, bad)
        with pytest.raises(ExtractionInputError, match=STALL_ENV):
            stall_timeout_s()


def test_progress_resets_the_stall_clock() -> None:
    now = [0.0]
    watch = RunWatch(stall_s=10, clock=lambda: now[0])
    now[0] = 9.0
    watch.tick()
    watch.progressed()
    now[0] = 18.0
    watch.tick()                         # 9 s since the last layer: fine
    now[0] = 19.5
    with pytest.raises(ExtractionStalled, match="no layer completed for 10 s"):
        watch.tick()


def test_the_command_line_sets_the_stall_bound(tmp_path, monkeypatch, capsys) -> None:
    from lora_extract.cli.main import main
    from lora_extract.extract.synthetic import write_pair

    monkeypatch.setenv(STALL_ENV, "600")          # main() changes it; this restores it after
    bp, tp = write_pair(str(tmp_path / "in"), demo_layers(8), seed=1)
    out = str(tmp_path / "lora.safetensors")
    assert main(["--stall-timeout", "30", "extract", bp, tp, "-o", out]) == 0
    assert os.environ[STALL_ENV] == "30.0" and os.path.exists(out)
    assert main(["--stall-timeout", "-1", "extract", bp, tp, "-o", out + "2"]) == 2
    assert STALL_ENV in capsys.readouterr().err and not os.path.exists(out + "2")
