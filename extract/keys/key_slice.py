"""A weight read from a file stored under another naming: a stored tensor, or one row block of
it (fused q/k/v split into ``chunks`` equal blocks), possibly transposed (OpenCLIP's
``text_projection`` is ``x @ P``; a Linear stores ``P`` transposed).

Shared by the text-encoder views of checkpoints (``extract/te_sources.py``) and resize's map from
LoRA prefixes to base weights (``resize/key_map.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeySlice:
    key: str
    chunk: int = 0
    chunks: int = 1
    transpose: bool = False

    def block(self, t: torch.Tensor) -> torch.Tensor:
        """This slice's rows of the stored tensor (a view; the whole tensor when unsplit)."""
        if self.chunks == 1:
            return t
        n = t.shape[0] // self.chunks
        return t[self.chunk * n:(self.chunk + 1) * n]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The weight this slice names: its rows, transposed if asked (a view)."""
        t = self.block(t)
        return t.transpose(0, 1) if self.transpose else t
