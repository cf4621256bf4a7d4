"""Device names the user may give (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked
against what this torch can use, so a bad one is one clear error before any layer is read
(instead of a torch assertion in the middle of a run)."""

from __future__ import annotations

import torch

from .errors import ExtractionInputError


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; an unknown name, or CUDA where torch has none, is an input
    error (the command line prints it as one line)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ExtractionInputError(
            f"device {device!r} is not a torch device; use cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractionInputError(f"device {device!r}: CUDA is not available to this torch; use cpu.")
    return dev


AUTO = "auto"
DEVICE_HELP = ("auto (CUDA when this torch can use it, else cpu), cpu, cuda, cuda:N or mps; "
               "default auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> str:
    """The concrete device ``name`` stands for (``auto`` resolved), as a string.

    Raises ``ExtractionInputError`` (one line: the value and the fix) for a name torch does not
    parse, a CUDA device this torch cannot use or that does not exist, and MPS where torch has
    none. The result is what ends up in the file's metadata, so ``auto`` never appears there.
    """
    spec = (name or "").strip().lower()
    if spec == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ExtractionInputError(
            f"device {name!r} is not a torch device; use {DEVICE_HELP}.") from e
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionInputError(
                f"device {name!r}: CUDA is not available to this torch ({torch.__version__}); "
                "use --device cpu (or auto).")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ExtractionInputError(
                f"device {name!r}: this machine has {count} CUDA device(s), numbered 0..{count - 1}.")
        return str(dev)
    if dev.type == "mps":
        if not _mps_available():
            raise ExtractionInputError(
                f"device {name!r}: MPS is not available to this torch; use --device cpu (or auto).")
        return "mps"
    raise ExtractionInputError(
        f"device {name!r}: {dev.type} is not supported for extraction; use {DEVICE_HELP}.")
