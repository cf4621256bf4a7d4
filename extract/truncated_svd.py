"""The result of a truncated SVD, shared by the exact and randomized routes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class TruncatedSVD:
    """Top-k singular triplets: ``A ~= U @ diag(S) @ Vh``; S descending."""

    U: torch.Tensor   # [m, k]
    S: torch.Tensor   # [k]
    Vh: torch.Tensor  # [k, n]

    def truncate(self, k: int) -> TruncatedSVD:
        return replace(self, U=self.U[:, :k], S=self.S[:k], Vh=self.Vh[:k, :])


def split_transposed(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, transposed: bool) -> TruncatedSVD:
    # Undo the transposition used to factorize a wide matrix: A^T = U S Vh  =>  A = Vh^T S U^T.
    if transposed:
        return TruncatedSVD(vh.mT, s, u.mT)
    return TruncatedSVD(u, s, vh)
