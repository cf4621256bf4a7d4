"""Memory management for extraction: background prefetch (V1) and the V2 block-swap manager.

Pure torch; never imports ComfyUI. The V2 entry point is ``memory.manager.extract_lora_v2``
(not re-exported here: ``extract.pipeline`` imports ``memory.prefetch``, and the manager
imports the pipeline). Policy: ``blocks`` and ``planner``; mechanics: ``streamer``,
``streams`` (CUDA stream/event order), ``buffers``, ``cache``, ``monitor``.
"""

from .prefetch import Prefetcher

__all__ = ["Prefetcher"]
