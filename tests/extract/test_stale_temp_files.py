"""Hidden temporary files of killed writers are removed by the next save into their folder.

A hard kill (SIGKILL, OOM killer, power loss) leaves ``.tmp-lora-extract-<host>-<pid>-*.part``
behind; the next atomic write into that folder removes the ones whose writer is provably gone,
and nothing else.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

import lora_extract.extract.tempfiles as tempfiles
from lora_extract.extract.writer import save_safetensors_atomic
from tests.support.paths import REPO_ROOT

# The folder that contains the package folder: what a child needs on PYTHONPATH to import it.
PACKAGE_PARENT = os.path.dirname(REPO_ROOT)
DAY = 24 * 3600
OTHER_HOST = tempfiles.host_tag() + "-elsewhere"


def _dead_pid() -> int:
    """A pid that ran on this machine and is gone: a child that exited and was reaped.

    Checked right after reaping; the pid could only be reused by a process started since,
    which the tests below detect (they skip instead of failing).
    """
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        if tempfiles._pid_alive(proc.pid) is False:
            return proc.pid
    pytest.skip("every pid of an exited child was reused at once")


def _skip_if_reused(pid: int) -> None:
    if tempfiles._pid_alive(pid) is not False:
        pytest.skip(f"pid {pid} was reused by a new process during the test")


def _touch(folder, name: str, size: int = 1000, age_s: float = 0.0) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def _ours(pid: int, host: str | None = None, rand: str = "abcd1234", suffix: str = ".safetensors.part") -> str:
    return f"{tempfiles.temp_prefix(host=host, pid=pid)}{rand}{suffix}"


def _save(folder, name: str = "lora.safetensors") -> None:
    save_safetensors_atomic({"w": torch.ones(4)}, os.path.join(folder, name))


@pytest.fixture
def live_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_our_temp_file_names_identify_the_writer(tmp_path) -> None:
    fd, path = tempfiles.create_temp_file(str(tmp_path), ".safetensors.part")
    os.close(fd)
    name = os.path.basename(path)
    assert name.startswith(f".tmp-lora-extract-{tempfiles.host_tag()}-{os.getpid()}-")
    assert name.endswith(".safetensors.part")
    m = tempfiles._OURS.fullmatch(name)
    assert m and m["host"] == tempfiles.host_tag() and int(m["pid"]) == os.getpid()


@pytest.mark.parametrize("hostname", ["my host/with:odd*chars", "x" * 200, "", "a-12-34.local"])
def test_host_tag_is_short_and_file_name_safe(monkeypatch, hostname: str) -> None:
    monkeypatch.setattr(tempfiles.socket, "gethostname", lambda: hostname)
    tag = tempfiles.host_tag()
    host = tag.split(".ns")[0]  # a container's pid namespace may follow
    assert 0 < len(host) <= 24
    assert all(c.isalnum() or c in "_.-" for c in tag)
    m = tempfiles._OURS.fullmatch(_ours(4321, host=tag))
    assert m and m["host"] == tag and m["pid"] == "4321"


def test_long_host_names_with_the_same_start_get_different_tags(monkeypatch) -> None:
    monkeypatch.setattr(tempfiles.socket, "gethostname", lambda: "render-node-of-the-studio-01")
    a = tempfiles.host_tag()
    monkeypatch.setattr(tempfiles.socket, "gethostname", lambda: "render-node-of-the-studio-02")
    assert tempfiles.host_tag() != a


def test_a_container_adds_its_pid_namespace_to_the_host_tag(monkeypatch) -> None:
    """A restarted container keeps its hostname and ComfyUI's pid: its new pid namespace must make
    the old container's files another host's, not files of a live pid kept forever."""
    monkeypatch.setattr(tempfiles.socket, "gethostname", lambda: "comfy")
    monkeypatch.setattr(tempfiles, "_pid_namespace", lambda: tempfiles._INIT_PID_NS)
    assert tempfiles.host_tag() == "comfy"
    monkeypatch.setattr(tempfiles, "_pid_namespace", lambda: 4026532999)
    assert tempfiles.host_tag() == "comfy.ns4026532999"
    monkeypatch.setattr(tempfiles, "_pid_namespace", lambda: None)  # not Linux
    assert tempfiles.host_tag() == "comfy"


def test_file_of_a_dead_writer_on_this_host_is_removed_by_the_next_save(tmp_path, caplog) -> None:
    pid = _dead_pid()
    stale = _touch(tmp_path, _ours(pid), size=5000)
    with caplog.at_level(logging.INFO, logger="lora_extract"):
        _save(tmp_path)
    if os.path.exists(stale):
        _skip_if_reused(pid)
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors"]
    msg = [r.getMessage() for r in caplog.records if "removed stale temporary file" in r.getMessage()]
    assert len(msg) == 1 and os.path.basename(stale) in msg[0] and "5000 bytes" in msg[0]
    assert f"process {pid}" in msg[0]


def test_files_of_live_writers_are_kept_however_old(tmp_path, live_child) -> None:
    names = [_ours(os.getpid(), rand="ownpid01"), _ours(live_child, rand="child001")]
    for n in names:
        _touch(tmp_path, n, age_s=30 * DAY)
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([*names, "lora.safetensors"])


def test_a_pid_of_another_user_counts_as_alive(tmp_path, monkeypatch) -> None:
    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfiles.os, "kill", denied)
    name = _ours(999_999, rand="otheruse")
    _touch(tmp_path, name, age_s=30 * DAY)
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([name, "lora.safetensors"])


def test_other_hosts_files_are_removed_only_when_old(tmp_path) -> None:
    pid = _dead_pid()  # dead here, which says nothing about the other host
    fresh = _ours(pid, host=OTHER_HOST, rand="fresh001")
    hour_old = _ours(pid, host=OTHER_HOST, rand="hourold1")
    old = _ours(pid, host=OTHER_HOST, rand="olderone")
    _touch(tmp_path, fresh)
    _touch(tmp_path, hour_old, age_s=3600)
    _touch(tmp_path, old, age_s=DAY + 600)
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([fresh, hour_old, "lora.safetensors"])


def test_files_of_earlier_versions_are_removed_only_when_old(tmp_path) -> None:
    _touch(tmp_path, ".tmp-fresh123.safetensors.part")
    _touch(tmp_path, ".tmp-old_1234.safetensors.part", age_s=DAY + 600)
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".tmp-fresh123.safetensors.part", "lora.safetensors"]


def test_names_that_are_not_exactly_ours_are_never_touched(tmp_path) -> None:
    pid = _dead_pid()
    kept = [
        ".hidden",
        ".tmp-abcdefgh",                                  # someone else's mkstemp(prefix=".tmp-")
        ".tmp-abcdefgh.json",
        ".tmp-abcdefghijk.safetensors.part",              # not mkstemp's 8 characters
        ".tmp-model.safetensors.part",                    # e.g. a paused download
        "foo.safetensors.part",
        _ours(pid)[1:],                                   # not hidden
        _ours(pid, suffix=".safetensors"),                # no .part
        _ours(pid, suffix=".part.bak"),
        f".tmp-lora-extract-{OTHER_HOST}-abcd1234.safetensors.part",   # no pid
        f".tmp-lora-extract-{OTHER_HOST}-x{pid}-abcd1234.safetensors.part",
        _ours(pid, rand="ab-cd"),
        ".TMP-LORA-EXTRACT" + _ours(pid)[len(".tmp-lora-extract"):],
    ]
    for n in kept:
        _touch(tmp_path, n, age_s=30 * DAY)
    os.mkdir(tmp_path / _ours(pid, rand="adirectory"))
    os.symlink(tmp_path / ".hidden", tmp_path / _ours(pid, rand="asymlink"))
    old = os.path.getmtime(tmp_path / ".hidden")
    os.utime(tmp_path / _ours(pid, rand="asymlink"), (old, old), follow_symlinks=False)
    _save(tmp_path)
    left = set(os.listdir(tmp_path))
    assert left == {*kept, _ours(pid, rand="adirectory"), _ours(pid, rand="asymlink"), "lora.safetensors"}


def test_a_failed_removal_does_not_stop_the_save(tmp_path, monkeypatch, caplog) -> None:
    pid = _dead_pid()
    stale = _touch(tmp_path, _ours(pid))
    real_unlink = os.unlink

    def refuse(path, *a, **k):
        if os.fspath(path) == stale:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(tempfiles.os, "unlink", refuse)
    with caplog.at_level(logging.DEBUG, logger="lora_extract"):
        _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(stale), "lora.safetensors"])
    if tempfiles._pid_alive(pid) is False:
        assert any("could not remove stale temporary file" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)


def test_a_file_that_vanishes_during_the_sweep_is_skipped(tmp_path, monkeypatch) -> None:
    pid = _dead_pid()
    stale = _touch(tmp_path, _ours(pid))
    real_lstat, real_unlink = os.lstat, os.unlink

    def vanish(path, *a, **k):
        if os.fspath(path) == stale:
            real_unlink(stale)  # another sweep got there first
        return real_lstat(path, *a, **k)

    monkeypatch.setattr(tempfiles.os, "lstat", vanish)
    _save(tmp_path)
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_an_unlistable_folder_does_not_stop_the_save(tmp_path, monkeypatch) -> None:
    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(tempfiles.os, "scandir", unreadable)
    _save(tmp_path)
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_without_a_pid_check_only_the_age_decides_and_windows_never_gets_os_kill(tmp_path, monkeypatch) -> None:
    """On Windows os.kill terminates the process: liveness goes through the Win32 API, and where
    that cannot answer (here: not on Windows), a file of this host is treated like another host's."""
    def no_kill(pid, sig):
        raise AssertionError("os.kill must not be called on Windows")

    monkeypatch.setattr(tempfiles, "_ON_WINDOWS", True)
    monkeypatch.setattr(tempfiles.os, "kill", no_kill)
    fresh, old = _ours(999_998, rand="freshwin"), _ours(999_998, rand="oldwin01")
    _touch(tmp_path, fresh)
    _touch(tmp_path, old, age_s=DAY + 600)
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([fresh, "lora.safetensors"])


def _write_report(folder) -> None:
    tempfiles.write_text_atomic(os.path.join(folder, "report.json"), "{}")


def _write_chart(folder) -> None:
    from PIL import Image

    from lora_extract.cli.validate import _save_chart_atomic

    _save_chart_atomic(Image.new("RGB", (4, 4)), os.path.join(folder, "chart.png"))


def _write_norms(folder) -> None:
    from lora_extract.resize.norm_cache import _write_json_atomic

    _write_json_atomic(os.path.join(folder, "base.safetensors.lora_norms.json"), {"format": 1})


@pytest.mark.parametrize("write", [_write_report, _write_chart, _write_norms])
def test_the_other_atomic_writers_use_the_same_names_and_sweep(tmp_path, monkeypatch, write) -> None:
    pid = _dead_pid()
    stale = _touch(tmp_path, _ours(pid))
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *a, **k):
        seen.append(os.path.basename(src))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    write(str(tmp_path))
    if os.path.exists(stale):
        _skip_if_reused(pid)
    assert len(os.listdir(tmp_path)) == 1 and not os.listdir(tmp_path)[0].startswith(".")
    assert len(seen) == 1 and seen[0].startswith(tempfiles.temp_prefix()) and seen[0].endswith(".part")


def _part_bytes(folder) -> int:
    sizes = []
    for n in os.listdir(folder):
        if n.endswith(".part"):
            try:
                sizes.append(os.path.getsize(os.path.join(folder, n)))
            except FileNotFoundError:
                pass
    return max(sizes, default=0)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_file_left_by_sigkill_mid_write_is_removed_by_the_next_save(tmp_path) -> None:
    """A real hard kill: the child's ``.part`` stays, no final file appears, and the next save
    into the folder (by another process) removes the ``.part``."""
    import signal

    script = f"""
import time, torch
import lora_extract.extract.writer as w
real, n = w._tensor_bytes, 0
def stall(t):
    global n
    n += 1
    if n == 2:
        time.sleep(600)  # the first tensor is written; hang until killed
    return real(t)
w._tensor_bytes = stall
w.save_safetensors_atomic({{"a": torch.ones(1 << 20), "b": torch.ones(1 << 20)}}, {str(tmp_path / "child.safetensors")!r})
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _part_bytes(tmp_path) < 4 << 20:  # the first tensor (4 MiB) is on disk
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the child never wrote its first tensor"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(tempfiles.temp_prefix(pid=proc.pid)), left
    assert left[0].endswith(".safetensors.part") and os.path.getsize(tmp_path / left[0]) >= 4 << 20

    _save(tmp_path, "next.safetensors")
    if os.path.exists(tmp_path / left[0]):
        _skip_if_reused(proc.pid)
    assert sorted(os.listdir(tmp_path)) == ["next.safetensors"]
    assert not os.path.exists(tmp_path / "child.safetensors")


def test_text_writes_are_all_or_nothing(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.json"
    tempfiles.write_text_atomic(str(target), "old")
    assert target.read_text() == "old"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tempfiles.os, "replace", full_disk)
    with pytest.raises(OSError):
        tempfiles.write_text_atomic(str(target), "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
