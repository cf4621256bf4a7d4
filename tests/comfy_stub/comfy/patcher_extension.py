"""Stub of ``comfy.patcher_extension``: the callback type names a ModelPatcher knows."""

from __future__ import annotations

from collections.abc import Callable


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"

    @classmethod
    def init_callbacks(cls) -> dict[str, dict[str | None, list[Callable]]]:
        return {}
