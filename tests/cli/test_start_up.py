"""What the command line does for its start-up time, without changing what it does."""

from __future__ import annotations

import subprocess
import sys
import threading

from lora_extract.cli import progress


def test_importing_the_command_line_leaves_garbage_collection_as_it_was() -> None:
    # Collection is off only while the command line's modules (torch among them) import.
    code = ("import gc; import lora_extract.cli; on = gc.isenabled(); gc.disable(); "
            "import importlib; importlib.reload(lora_extract.cli); "
            "print(on, gc.isenabled())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]     # on stays on; off (the caller's) stays off


def test_progress_bar_is_a_no_op_where_it_is_not_shown(monkeypatch) -> None:
    monkeypatch.delenv("LORA_EXTRACT_PROGRESS", raising=False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)          # importing tqdm would fail
    update = progress.progress_bar("extract")
    update(1, 2, "k")                                       # no tqdm needed, nothing drawn


def test_progress_bar_draws_with_a_thread_lock(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LORA_EXTRACT_PROGRESS", "1")
    from tqdm import tqdm

    update = progress.progress_bar("extract")
    for i in range(1, 4):
        update(i, 3, f"layer.{i}.weight")
    err = capsys.readouterr().err
    assert "extract" in err and "3/3" in err and "layer.3.weight" in err
    # A thread lock, not tqdm's default (which creates a multiprocessing lock too).
    assert isinstance(tqdm.get_lock(), type(threading.RLock()))
