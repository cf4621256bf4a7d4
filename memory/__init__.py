"""Memory management for extraction: background prefetch (and, later, the V2 block-swap manager).

Pure torch; never imports ComfyUI.
"""

from .prefetch import Prefetcher

__all__ = ["Prefetcher"]
