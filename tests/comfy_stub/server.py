"""Stub of ComfyUI's ``server`` module: a ``PromptServer`` that records what it would send.

The real ``PromptServer.send_sync`` queues ``(event, data, sid)`` for the websocket and
``send_progress_text(text, node_id)`` packs the node id and the UTF-8 text into one binary
``TEXT`` message (``BinaryEventTypes.TEXT``); the frontend shows it on that node. The stub keeps
the same signatures and message layout, and appends every message to ``messages`` instead.

Stub-only additions: ``messages``, ``progress_texts(node_id)`` and ``PromptServer._reset()``.
"""

from __future__ import annotations

import struct
from typing import Any


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class PromptServer:
    """Records messages; ``PromptServer.instance`` is the one the nodes reach, as in ComfyUI."""

    instance: PromptServer | None = None

    def __init__(self) -> None:
        PromptServer.instance = self
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.messages: list[tuple[Any, Any, str | None]] = []

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data, sid))

    def send_progress_text(self, text: str | bytes | bytearray, node_id: str, sid: str | None = None) -> None:
        # Same layout as the real server: 4-byte big-endian id length, id, text.
        if isinstance(text, str):
            text = text.encode("utf-8")
        node_id_bytes = str(node_id).encode("utf-8")
        message = struct.pack(">I", len(node_id_bytes)) + node_id_bytes + bytes(text)
        self.send_sync(BinaryEventTypes.TEXT, message, sid)

    # --- stub-only ----------------------------------------------------------------------------

    def progress_texts(self, node_id: str | None = None) -> list[tuple[str, str]]:
        """Every ``send_progress_text`` as ``(node_id, text)``, decoded from the binary message;
        only those for ``node_id`` when given."""
        out = []
        for event, data, _sid in self.messages:
            if event != BinaryEventTypes.TEXT:
                continue
            (n,) = struct.unpack(">I", data[:4])
            nid, text = data[4:4 + n].decode("utf-8"), data[4 + n:].decode("utf-8")
            if node_id is None or nid == str(node_id):
                out.append((nid, text))
        return out

    def progress_events(self) -> list[dict[str, Any]]:
        """The ``progress`` messages (``value``, ``max``, ``prompt_id``, ``node``)."""
        return [data for event, data, _sid in self.messages if event == "progress"]

    @classmethod
    def _reset(cls) -> PromptServer:
        """A fresh recording server as ``PromptServer.instance``."""
        return cls()
