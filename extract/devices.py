"""Checking a device name before any work: one clear error instead of a torch assertion."""

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
