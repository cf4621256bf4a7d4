"""Atomic safetensors output: the file appears under its final name only when complete.

We serialise ourselves (header + raw bytes, streamed tensor by tensor) instead of building the
whole file in memory, write to a hidden temporary name in the destination folder, fsync, and
then hard-link it to the final name, which fails instead of overwriting if that name exists.
Any failure (disk full, interrupt, exception in the writer) removes the temporary file. A hard
kill cannot; its file carries the writer's host and pid, and the next save into that folder
removes it (see ``tempfiles``).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping

import torch

from .errors import ExtractionInputError
from .sources import SAFETENSORS_DTYPES
from .tempfiles import create_temp_file, give_default_permissions

# The reader's table, inverted: a file we write is always one we can read back.
_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # A byte view works for every dtype, including bf16/fp8 that numpy does not know.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    # Tensors in key order, not in the caller's: a file's bytes must not depend on the order a
    # source lists its weights (a checkpoint file and the module ComfyUI builds from it list
    # them differently), so the command line and the nodes write the same file.
    items = sorted(tensors.items())
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key, t in items:
        if t.dtype not in _DTYPE_NAMES:
            raise ExtractionInputError(f"cannot save {key!r}: dtype {t.dtype} is not supported.")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for _key, t in items:
        f.write(_tensor_bytes(t))


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str,
                            metadata: Mapping[str, str] | None = None, *,
                            overwrite: bool = False) -> int:
    """Write ``tensors`` to ``path`` atomically; return the file size in bytes.

    Refuses to replace an existing file unless ``overwrite`` is set.
    """
    if "\x00" in os.fspath(path):
        raise ExtractionInputError(f"output path {path!r} contains a NUL byte; use a plain file name.")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, path, e) from e
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another name.")
    try:
        fd, tmp = create_temp_file(folder, ".safetensors.part")
    except OSError as e:
        raise _unwritable(folder, path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            _write_safetensors(f, tensors, metadata or {})
            f.flush()
            os.fsync(f.fileno())
        # The permissions of any file the user creates, like the reports written beside it.
        give_default_permissions(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_or_rename(tmp, path)
    except BaseException as e:
        # BaseException: an interrupt or Ctrl-C must not leave a temporary file behind either.
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError):
            # Disk full, quota, I/O error, folder removed: say where, and that nothing was left.
            raise _unwritable(folder, path, e) from e
        raise
    return os.path.getsize(path)


# errno values of file systems that have no hard links (exFAT/FAT drives, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _link_or_rename(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path`` without ever replacing a file that is already there."""
    try:
        os.link(tmp, path)  # atomic, and never replaces a file that appeared meanwhile
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: check again and rename (replacing is only possible in the
        # instant between the check and the rename).
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; choose another name.") from e
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _unwritable(folder: str, path: str, e: OSError) -> ExtractionInputError:
    reason = e.strerror or str(e)
    hint = ("free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that the folder exists and is writable")
    return ExtractionInputError(
        f"cannot write {os.path.basename(path)!r} to folder {folder}: {reason} "
        f"(errno {e.errno}). No file was written; {hint}, or choose another output folder.")
