"""Faults during a run: a full disk, an unwritable folder, exceptions and interrupts at any layer.

Each case checks the same promise: the error (or interrupt) reaches the caller unchanged or as
one clear message, and the output folder holds neither a partial file nor a temporary file.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

import lora_extract.extract.layer_work as layer_work
import lora_extract.extract.writer as writer
from lora_extract.cli import main
from lora_extract.extract import ExtractConfig, ExtractionInputError, SafetensorsSource, extract_to_file
from lora_extract.extract.synthetic import demo_layers, write_pair
from tests.support.fault_injection import (
    NewComfyInterrupt,
    fail_on_call,
    files_under,
    fill_disk_after,
    prefetch_threads,
)
from tests.support.paths import REPO_ROOT


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_pair(str(tmp_path_factory.mktemp("faults")), demo_layers(24), seed=11)


N_LAYERS = len(demo_layers(24))


@pytest.mark.parametrize("limit", [0, 5, 200, 20_000])
def test_disk_full_mid_write_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, limit: int) -> None:
    tensors = {f"k{i}": torch.randn(64, 64) for i in range(4)}  # 64 KiB: the failure is mid-data
    out = tmp_path / "out" / "lora.safetensors"
    fill_disk_after(monkeypatch, limit)
    with pytest.raises(ExtractionInputError) as info:
        writer.save_safetensors_atomic(tensors, str(out))
    msg = str(info.value)
    assert str(tmp_path / "out") in msg and "No space left on device" in msg
    assert "free some disk space" in msg and "No file was written" in msg
    assert os.listdir(tmp_path / "out") == []


def test_disk_full_through_cli_exits_2_with_one_line(pair, tmp_path, monkeypatch, capsys) -> None:
    fill_disk_after(monkeypatch, 1000)
    out = tmp_path / "o.safetensors"
    assert main(["extract", *pair, "-o", str(out), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(tmp_path) in err
    assert os.listdir(tmp_path) == []


def test_output_folder_that_is_a_file_is_a_clear_error(pair, tmp_path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"x")
    out = blocker / "lora.safetensors"
    with pytest.raises(ExtractionInputError, match="not_a_folder") as info:
        extract_to_file(SafetensorsSource(pair[0]), SafetensorsSource(pair[1]), ExtractConfig(rank=2), str(out))
    assert "check that the folder exists and is writable" in str(info.value)
    assert files_under(tmp_path) == ["not_a_folder"] and blocker.read_bytes() == b"x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_folder_where_files_cannot_be_created_is_a_clear_error() -> None:
    # /proc refuses new files even for root, so this is a real failure, not a mock.
    with pytest.raises(ExtractionInputError, match=r"folder /proc: .*errno"):
        writer.save_safetensors_atomic({"a": torch.ones(2)}, "/proc/lora_extract_test.safetensors")


def test_name_taken_between_check_and_rename_is_not_overwritten(tmp_path, monkeypatch) -> None:
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"someone else's file")
    # Another process creates the name after our existence check: the hard link must refuse.
    monkeypatch.setattr(writer.os.path, "exists", lambda p: False if p == str(out) else os.access(p, os.F_OK))
    with pytest.raises(FileExistsError):
        writer.save_safetensors_atomic({"a": torch.ones(3)}, str(out))
    assert out.read_bytes() == b"someone else's file"
    assert os.listdir(tmp_path) == ["lora.safetensors"]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("at", [0, N_LAYERS // 2, N_LAYERS - 1])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), NewComfyInterrupt()])
def test_failure_at_any_layer_propagates_and_leaves_no_file(pair, tmp_path, monkeypatch, at: int,
                                                             exc: BaseException, prefetch: int) -> None:
    failing = fail_on_call(layer_work.process_pair, at + 1, exc)
    monkeypatch.setattr(layer_work, "process_pair", failing)
    out = tmp_path / "lora.safetensors"
    with pytest.raises(type(exc)) as info:
        extract_to_file(SafetensorsSource(pair[0]), SafetensorsSource(pair[1]), ExtractConfig(rank=2),
                        str(out), prefetch=prefetch)
    assert info.value is exc  # the very same exception: nothing wrapped or swallowed it
    assert failing.calls == at + 1    # stopped at that layer, did not carry on
    assert os.listdir(tmp_path) == []
    assert prefetch_threads() == []


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), NewComfyInterrupt()])
def test_failure_while_reading_a_layer_propagates(pair, tmp_path, exc: BaseException) -> None:
    tuned = SafetensorsSource(pair[1])
    # Differences are read chunk by chunk from the files (``read_elements``).
    tuned.read_elements = fail_on_call(tuned.read_elements, 5, exc)  # type: ignore[method-assign]
    with pytest.raises(type(exc)) as info:
        extract_to_file(SafetensorsSource(pair[0]), tuned, ExtractConfig(rank=2), str(tmp_path / "x.safetensors"))
    assert info.value is exc
    assert os.listdir(tmp_path) == []
    assert prefetch_threads() == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), NewComfyInterrupt()])
def test_interrupt_while_writing_leaves_no_temp_file(pair, tmp_path, monkeypatch, exc: BaseException) -> None:
    monkeypatch.setattr(writer, "_tensor_bytes", fail_on_call(writer._tensor_bytes, 3, exc))
    with pytest.raises(type(exc)) as info:
        extract_to_file(SafetensorsSource(pair[0]), SafetensorsSource(pair[1]), ExtractConfig(rank=2),
                        str(tmp_path / "x.safetensors"))
    assert info.value is exc
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_writing_through_cli_exits_130(pair, tmp_path, monkeypatch, capsys) -> None:
    def interrupted(t):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_tensor_bytes", interrupted)
    assert main(["extract", *pair, "-o", str(tmp_path / "o.safetensors"), "--rank", "2"]) == 130
    assert "no output file was written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# The CLI as a user runs it, except that the second layer waits until the signal arrives: the
# run cannot end before it is interrupted, however fast or slow the machine is.
SIGINT_CHILD = """
import sys, time
import lora_extract.extract.layer_work as layer_work
from lora_extract.cli import main
real, calls = layer_work.process_pair, []
def process_pair(*a, **k):
    calls.append(1)
    if len(calls) == 2:
        sys.stderr.write("READY-FOR-SIGINT\\n")
        sys.stderr.flush()
        while True:              # only the SIGINT gets us out of here (as KeyboardInterrupt)
            time.sleep(0.05)
    return real(*a, **k)
layer_work.process_pair = process_pair
sys.exit(main(sys.argv[1:]))
"""


def _default_sigint() -> None:
    # pytest may run with SIGINT ignored (started with nohup or in the background), and an
    # ignored signal stays ignored across exec: the child gets the default, as in a terminal.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_sigint_to_the_cli_stops_it_cleanly(tmp_path) -> None:
    """A real Ctrl-C (SIGINT) in the middle of a run: exit 130, one line, no file, no temp."""
    import signal
    import subprocess
    import sys

    base, tuned = write_pair(str(tmp_path), demo_layers(16), seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, "extract", base, tuned, "-o",
                             str(out_dir / "o.safetensors"), "--rank", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    assert proc.stderr is not None
    seen = b""
    while b"READY-FOR-SIGINT" not in seen:  # the run is inside its second layer
        chunk = proc.stderr.read1(4096)
        assert chunk, f"the run ended before it could be interrupted: {seen!r}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen + rest).decode(errors="replace")[-2000:]
    assert b"interrupted; no output file was written" in rest
    assert b"Traceback" not in rest
    assert os.listdir(out_dir) == []


def test_hard_crash_while_writing_never_leaves_a_file_under_the_final_name(tmp_path) -> None:
    """SIGKILL mid-write (nothing can clean up): the final name never appears; at most a hidden
    ``.tmp-*.safetensors.part`` remains, which ComfyUI's loaders do not list."""
    import subprocess
    import sys

    out = tmp_path / "lora.safetensors"
    script = f"""
import os, signal, torch
import lora_extract.extract.writer as w
real = w._tensor_bytes
n = 0
def crash(t):
    global n
    n += 1
    if n == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(t)
w._tensor_bytes = crash
w.save_safetensors_atomic({{f"k{{i}}": torch.ones(1000) for i in range(5)}}, {str(out)!r})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode(errors="replace")
    left = os.listdir(tmp_path)
    assert "lora.safetensors" not in left
    assert all(n.startswith(".tmp-") and n.endswith(".safetensors.part") for n in left), left


# Blind handlers that legitimately do not re-raise the same exception in place, with the reason.
HANDS_ON_ELSEWHERE = {
    os.path.join("extract", "prefetch.py"): "the worker hands the exception to the consumer, which re-raises it",
    os.path.join("extract", "norms.py"): "a helper thread of the split sum hands its exception to the "
                                         "caller, which re-raises it (test_float64_norms)",
    os.path.join("extract", "sources.py"): "wraps torch.load's unpickling errors only: nothing in that try "
                                           "checks for an interrupt, and Ctrl-C (BaseException) passes",
}


def _reraises_same_object(handler) -> bool:
    """A bare ``raise`` or ``raise <the name bound by as>``: the very exception that was caught.
    ``raise NewError(...) from e`` wraps it (a cancel turned into an error) and does not count."""
    import ast

    return any(isinstance(n, ast.Raise) and (n.exc is None or (
        isinstance(n.exc, ast.Name) and handler.name is not None and n.exc.id == handler.name))
        for n in ast.walk(handler))


def test_no_blind_except_swallows_an_interrupt() -> None:
    """``except Exception`` / ``BaseException`` / bare ``except`` anywhere in the pack must re-raise
    the same exception object (not wrap it):
    ComfyUI's interrupt is an Exception in 0.3.64 and a BaseException later, Ctrl-C a BaseException."""
    import ast

    root = REPO_ROOT
    offenders = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("tests", "benchmarks", ".git", "build", ".venv")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), rel)
            for node in ast.walk(tree):
                if not isinstance(node, ast.ExceptHandler):
                    continue
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                blind = any(t is None or (isinstance(t, ast.Name) and t.id in ("Exception", "BaseException"))
                            for t in types)
                reraises = _reraises_same_object(node)
                if blind and not reraises and rel not in HANDS_ON_ELSEWHERE:
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == [], f"blind except without re-raise: {offenders}"


def test_folder_without_hard_links_still_gets_the_file(tmp_path, monkeypatch) -> None:
    """exFAT drives and some network shares refuse hard links: fall back to a checked rename."""
    import errno as errno_

    def no_links(src, dst):
        raise OSError(errno_.EPERM, "Operation not permitted")

    monkeypatch.setattr(writer.os, "link", no_links)
    out = tmp_path / "lora.safetensors"
    writer.save_safetensors_atomic({"a": torch.arange(4.0)}, str(out))
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out))["a"], torch.arange(4.0))
    with pytest.raises(FileExistsError):
        writer.save_safetensors_atomic({"a": torch.ones(1)}, str(out))
    assert os.listdir(tmp_path) == ["lora.safetensors"]
