"""Hidden temporary files for atomic writes, named after their writer, and the sweep of stale ones.

Every atomic writer of the pack writes to ``.tmp-lora-extract-<host>-<pid>-<random><suffix>`` in
the destination folder and renames or links it when complete. An exception removes that file,
but a hard kill (SIGKILL, the OOM killer, power loss) cannot, and the file can be gigabytes. So
before each write we sweep the folder for files that only a dead writer can have left:

* ours, same host, pid no longer running: removed at once (pid checked, never our own);
* ours from another host (a network share) or whose pid we cannot check: removed once untouched
  for ``STALE_AFTER_S``, because we cannot see whether that writer still runs;
* ``.tmp-XXXXXXXX.safetensors.part`` from versions before this naming: same age rule.

Anything else, including every name that does not match these patterns exactly, is left alone.
A sweep never fails the write that triggered it: problems are logged and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-lora-extract-"

# 24 hours. A save writes continuously and ends within minutes even for multi-GB files on a slow
# share, so its file's mtime is never that old while a writer is alive; the margin also covers
# clocks of machines sharing a folder that disagree by hours (wrong time zone, no NTP).
STALE_AFTER_S = 24 * 3600

# Our names. The pid and mkstemp's random part never contain "-" or ".", so the two last
# "-" separated fields before the suffix are always pid and random, whatever the host contains.
_OURS = re.compile(r"\.tmp-lora-extract-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>[0-9]{1,10})-"
                   r"[a-z0-9_]+(?:\.[A-Za-z0-9]+)*\.part")
# Earlier versions: mkstemp(prefix=".tmp-", suffix=".safetensors.part"), 8 random characters.
# Matched exactly so that other tools' partial files (a paused download) are never touched.
_LEGACY = re.compile(r"\.tmp-[a-z0-9_]{8}\.safetensors\.part")

_HOST_MAX = 24
# The initial pid namespace has this fixed inode (PROC_PID_INIT_INO in the Linux kernel).
_INIT_PID_NS = 0xEFFFFFFC
_ON_WINDOWS = sys.platform == "win32"


def host_tag() -> str:
    """This machine (and pid namespace) as a short file-name-safe word.

    Pids are only comparable within one pid namespace: a restarted container keeps its hostname
    and often gets the same pid for ComfyUI, so containers add their namespace to the tag.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown"
    if len(name) > _HOST_MAX:
        # Keep a readable start, and a digest so two long names with the same start differ.
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
        name = f"{name[:_HOST_MAX - 9]}_{digest}"
    ns = _pid_namespace()
    if ns is not None and ns != _INIT_PID_NS:
        name += f".ns{ns}"
    return name


def _pid_namespace() -> int | None:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except (OSError, AttributeError):
        return None
    m = re.fullmatch(r"pid:\[([0-9]+)\]", link)
    return int(m.group(1)) if m else None


def temp_prefix(host: str | None = None, pid: int | None = None) -> str:
    """The name start of a temporary file written by ``pid`` on ``host`` (default: this process)."""
    return f"{TEMP_PREFIX}{host_tag() if host is None else host}-{os.getpid() if pid is None else pid}-"


def create_temp_file(folder: str, suffix: str) -> tuple[int, str]:
    """Sweep ``folder`` for stale temporary files, then create ours there (O_EXCL, mode 0600).

    ``suffix`` must end in ``.part``, so that the sweep recognises the file. Returns
    ``(fd, path)`` as ``tempfile.mkstemp``; raises OSError only from creating the file.
    """
    if not suffix.endswith(".part"):
        raise ValueError(f"temporary file suffix {suffix!r} must end in '.part'")
    sweep_stale_temp_files(folder)
    return tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix, dir=folder)


def sweep_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary files that killed writers left in ``folder``; return their paths."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.startswith(".tmp-")]
    except OSError as e:
        log.debug("not sweeping %s for stale temporary files: %s", folder, e)
        return []
    host, now, removed = host_tag(), time.time(), []
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError as e:  # gone meanwhile (another sweep, the writer finished), or unreadable
            log.debug("skipping %s: %s", path, e)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # we only ever write plain files; a link or folder is somebody else's
        reason = _why_stale(name, host, now - st.st_mtime)
        if reason is not None and _remove(path, st.st_size, reason):
            removed.append(path)
    return removed


def _why_stale(name: str, host: str, age_s: float) -> str | None:
    """Why the file ``name``, last written ``age_s`` ago, is abandoned; None to keep it."""
    old = age_s > STALE_AFTER_S
    m = _OURS.fullmatch(name)
    if m is None:
        if old and _LEGACY.fullmatch(name):
            return "left by an earlier version, untouched for over a day"
        return None
    if m["host"] != host:
        # Another machine's pids mean nothing here: only the age tells.
        return f"left on host {m['host']}, untouched for over a day" if old else None
    pid = int(m["pid"])
    if pid == os.getpid():
        return None  # another thread of this process may be writing it right now
    alive = _pid_alive(pid)
    if alive is False:
        return f"its writer, process {pid}, is gone"
    if alive is None and old:
        return f"process {pid} cannot be checked and the file is untouched for over a day"
    return None


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine; None when that cannot be told."""
    if pid <= 0:
        return None  # kill(0 or -n) would address process groups, and no writer has such a pid
    if _ON_WINDOWS:
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # runs, under another user
    except (OSError, OverflowError):
        return None
    return True


def _pid_alive_windows(pid: int) -> bool | None:
    # Never os.kill here: on Windows it terminates the process, whatever the signal number.
    try:
        import ctypes
        from ctypes import wintypes

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        k32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
        k32.CloseHandle.argtypes = (wintypes.HANDLE,)
        handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            err = ctypes.get_last_error()  # type: ignore[attr-defined]
            return {87: False, 5: True}.get(err)  # INVALID_PARAMETER: no such pid; ACCESS_DENIED
        try:
            code = wintypes.DWORD()
            if not k32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return None
            return code.value == 259  # STILL_ACTIVE
        finally:
            k32.CloseHandle(handle)
    except (OSError, AttributeError, ValueError, ImportError) as e:
        log.debug("cannot check process %s: %s", pid, e)
        return None


def _remove(path: str, size: int, reason: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        log.debug("stale temporary file %s already removed (another sweep?)", path)
        return False
    except OSError as e:
        log.warning("could not remove stale temporary file %s (%s): %s", path, _size_text(size), e)
        return False
    log.info("removed stale temporary file %s (%s; %s)", path, _size_text(size), reason)
    return True


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}, {n} bytes"
    return f"{n} bytes"


def give_default_permissions(path: str) -> None:
    """The mode an ordinary ``open`` would give (0666 less the umask), not mkstemp's 0600.

    Read once per call: the umask can only be read by setting it, so it is set straight back."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def replaced_atomically(path: str, suffix: str = ".part", public: bool = True) -> Iterator[int]:
    """Write ``path`` through a temporary file: yields its fd; on success it replaces ``path``.

    On any exception (a full disk, Ctrl-C) the temporary file is removed and ``path`` is left as
    it was: never a half-written file under the final name. ``public``: give the file the
    permissions an ordinary ``open`` would (mkstemp creates 0600). The caller owns the fd and
    must close it (``os.fdopen(fd, ...)`` as a context manager does).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = create_temp_file(folder, suffix)
    try:
        yield fd
        if public:
            give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str, public: bool = True) -> None:
    """``text`` (UTF-8) to ``path``, all or nothing (see ``replaced_atomically``)."""
    with replaced_atomically(path, ".part", public) as fd, os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
