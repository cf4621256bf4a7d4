"""Stub of ``comfy.utils``: attribute paths, torch file I/O and the progress bar.

Stub-only additions (leading underscore): ``_progress_log`` records every progress update as
``(node_id, value, total)``; ``_reset()`` restores the module's import-time state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# --- attribute paths ---------------------------------------------------------------------------


def get_attr(obj: Any, attr: str) -> Any:
    """Follow a dotted attribute path (``"diffusion_model.blocks.0.weight"``) from ``obj``."""
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj: Any, attr: str, value: Any) -> Any:
    """Set the attribute at a dotted path and return the value it replaced."""
    *parents, last = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    previous = getattr(obj, last)
    setattr(obj, last, value)
    return previous


def set_attr_param(obj: Any, attr: str, value: torch.Tensor) -> Any:
    """Replace the parameter at ``attr`` with a new frozen ``Parameter`` wrapping ``value``."""
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj: Any, attr: str, value: torch.Tensor) -> None:
    """Copy ``value`` into the existing parameter at ``attr`` (storage kept, no replacement)."""
    get_attr(obj, attr).data.copy_(value)


# --- files -------------------------------------------------------------------------------------


def load_torch_file(
    ckpt: str,
    safe_load: bool = False,
    device: torch.device | None = None,
    return_metadata: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Load a ``.safetensors``/``.sft`` file or a torch pickle as a state dict.

    Like the real loader, a pickle holding ``{"state_dict": sd}`` or a single nested dict is
    unwrapped. The stub always loads pickles with ``weights_only=True`` (the real one does too on
    torch >= 2.4, which is all it supports safely); ``safe_load`` is accepted for signature parity.
    """
    del safe_load
    if device is None:
        device = torch.device("cpu")
    metadata = None
    if ckpt.lower().endswith((".safetensors", ".sft")):
        import safetensors

        with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            if return_metadata:
                metadata = f.metadata()
    else:
        loaded = torch.load(ckpt, map_location=device, weights_only=True)
        if "state_dict" in loaded:
            sd = loaded["state_dict"]
        elif len(loaded) == 1 and isinstance(next(iter(loaded.values())), dict):
            sd = next(iter(loaded.values()))
        else:
            sd = loaded
    return (sd, metadata) if return_metadata else sd


def save_torch_file(sd: dict[str, torch.Tensor], ckpt: str, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors (always, whatever the extension), like the real one."""
    import safetensors.torch

    if metadata is not None:
        safetensors.torch.save_file(sd, ckpt, metadata=metadata)
    else:
        safetensors.torch.save_file(sd, ckpt)


def calculate_parameters(sd: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Number of elements in the tensors whose key starts with ``prefix``."""
    return sum(t.nelement() for k, t in sd.items() if k.startswith(prefix))


# --- progress bar ------------------------------------------------------------------------------

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK: Callable[..., Any] | None = None

# Stub-only: every update of every bar, as (node_id, value, total).
_progress_log: list[tuple[Any, float, float]] = []


def set_progress_bar_enabled(enabled: bool) -> None:
    """Toggle the console bar (kept for parity; the stub draws nothing)."""
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function: Callable[..., Any] | None) -> None:
    """Install the hook that every ProgressBar created *afterwards* reports to.

    The real server installs ``hook(value, total, preview, node_id=...)`` here.
    """
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    """Progress reporter; same semantics as ComfyUI's.

    The hook is captured at construction, as in the real class, so a hook set later is not seen
    by existing bars. ``update_absolute`` clamps the value to ``total``.
    """

    def __init__(self, total: float, node_id: Any = None) -> None:
        self.total = total
        self.current: float = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id
        self.updates: list[tuple[float, float]] = []  # stub-only record of (value, total)

    def update_absolute(self, value: float, total: float | None = None, preview: Any = None) -> None:
        """Set progress to ``value`` (clamped to ``total``), optionally changing ``total``."""
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        self.updates.append((self.current, self.total))
        _progress_log.append((self.node_id, self.current, self.total))
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value: float) -> None:
        """Advance progress by ``value``."""
        self.update_absolute(self.current + value)


def _reset() -> None:
    """Stub-only: forget the hook and the recorded updates."""
    global PROGRESS_BAR_HOOK, PROGRESS_BAR_ENABLED
    PROGRESS_BAR_HOOK = None
    PROGRESS_BAR_ENABLED = True
    _progress_log.clear()

