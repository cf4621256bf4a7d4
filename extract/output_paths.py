"""Output names that stay inside the chosen folder and never replace an existing file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from .errors import ExtractionInputError

_COUNTER = re.compile(r"_(\d{5,})_\.safetensors$")


def resolve_prefix(root: str, prefix: str) -> tuple[str, str]:
    """Split ``prefix`` (e.g. ``loras/my_lora``) into (folder inside ``root``, file stem).

    Refuses NUL bytes, absolute paths and anything that resolves outside ``root``.
    """
    if "\x00" in prefix:
        raise ExtractionInputError("filename_prefix contains a NUL byte; use a plain name.")
    if not prefix.strip() or prefix.endswith(("/", "\\")):
        raise ExtractionInputError(
            f"filename_prefix {prefix!r} has no file name; use e.g. 'loras/my_lora'.")
    norm = prefix.replace("\\", "/")
    if os.path.isabs(norm) or re.match(r"^[A-Za-z]:", norm):
        raise ExtractionInputError(
            f"filename_prefix {prefix!r} is an absolute path; give a name relative to the "
            "output folder, e.g. 'loras/my_lora'.")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, norm))
    if os.path.commonpath([root_real, full]) != root_real or full == root_real:
        raise ExtractionInputError(
            f"filename_prefix {prefix!r} leaves the output folder {root}; remove '..' parts.")
    return os.path.dirname(full), os.path.basename(full)


def next_free_path(folder: str, stem: str, name_for: Callable[[int], str]) -> str:
    """The first ``name_for(counter)`` in ``folder`` past every counter already used for ``stem``."""
    highest = 0
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            if entry.startswith(stem + "_"):
                m = _COUNTER.search(entry)
                if m:
                    highest = max(highest, int(m.group(1)))
    counter = highest + 1
    while os.path.exists(os.path.join(folder, name_for(counter))):
        counter += 1
    return os.path.join(folder, name_for(counter))
