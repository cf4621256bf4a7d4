"""One rule for every file a subcommand writes, checked before any work starts.

* never replace an existing file without ``--overwrite``;
* never write onto one of the command's own inputs, even with ``--overwrite`` (``-o`` naming the
  base model would replace it with the LoRA);
* a path that is a folder, a parent that is a file, or a folder we cannot write into is
  refused at once, not after the whole extraction. Missing folders are fine: they are created
  when the file is written (not before, so a failed or cancelled run leaves nothing behind);
* two outputs of one command never share a path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from ..extract.errors import ExtractionInputError


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (links and ``..`` resolved; hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_not_input(path: str, flag: str, inputs: Iterable[tuple[str, str]]) -> None:
    for role, inp in inputs:
        if inp and same_file(path, inp):
            raise ExtractionInputError(
                f"{flag} {path} is the {role} ({inp}): writing there would destroy an input of "
                "this command, --overwrite or not. Pick another name.")


def _check_folder(folder: str, what: str) -> None:
    """``folder`` can be written into, or created: its nearest existing ancestor is a writable
    folder."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        raise ExtractionInputError(
            f"{what}: {folder} is a file, not a folder; pick another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExtractionInputError(
            f"{what}: the folder {folder} is not writable; pick another folder.")


def check_output_file(path: str, flag: str, *, overwrite: bool,
                      inputs: Sequence[tuple[str, str]] = ()) -> None:
    """Refuse ``path`` (given as ``flag``) if writing it would break the rule above.

    ``inputs``: ``(role, path)`` of the command's input files, e.g. ``("base model", a.base)``."""
    if "\x00" in path:
        raise ExtractionInputError(f"{flag}: the path contains a NUL byte; use a plain file name.")
    if os.path.isdir(path):
        raise ExtractionInputError(
            f"{flag} {path} is a folder; give a file name, e.g. "
            f"{os.path.join(path, 'my_lora.safetensors')}.")
    _check_not_input(path, flag, inputs)
    _check_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")
    if os.path.lexists(path) and not overwrite:
        raise ExtractionInputError(
            f"{flag} {path} already exists; pass --overwrite to replace it, or pick another name.")


def check_output_folder(folder: str, flag: str) -> None:
    """An output folder: created later if missing; it must not be a file, and it (or the
    ancestor it will be created in) must be writable."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ExtractionInputError(f"{flag} {folder} is a file, not a folder; give a folder.")
    _check_folder(folder, f"{flag} {folder}")


def check_distinct(outputs: Sequence[tuple[str, str | None]]) -> None:
    """Two outputs of one command (``(flag, path)``) must not be the same file."""
    given = [(flag, p) for flag, p in outputs if p]
    for i, (flag_a, a) in enumerate(given):
        for flag_b, b in given[i + 1:]:
            if os.path.realpath(a) == os.path.realpath(b):
                raise ExtractionInputError(
                    f"{flag_a} and {flag_b} both name {a}; give each its own file.")
