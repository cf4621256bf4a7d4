"""Exact SVD of a LoRA layer's ``up @ down`` without forming the product.

With ``up = Q_u R_u`` and ``down^T = Q_d R_d`` (reduced QR), ``up @ down = Q_u (R_u R_d^T) Q_d^T``;
the r x r core ``R_u R_d^T = U_c S V_c^T`` gives the SVD ``U = Q_u U_c``, ``S``,
``V^T = V_c^T Q_d^T`` exactly. Cost O((out + in) r^2) instead of O(out * in * min(out, in)).
Convolutions are the same matrix with the kernel dims flattened into ``in``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecomposedLayer:
    """A LoRA layer as ``U diag(S) Vh``, S including the alpha / rank scale (and merge weights)."""

    prefix: str
    U: torch.Tensor                  # [out, k]
    S: torch.Tensor                  # [k], descending
    Vh: torch.Tensor                 # [k, in_flat]
    down_tail: tuple[int, ...]       # down's trailing shape (in, kh, kw) to restore on output
    up_tail: tuple[int, ...]         # up's trailing dims after the rank (1, 1 for LoCon)
    output_scale: float              # alpha / rank to write, so the output keeps the input's scale
    source_rank: int
    base_key: str = ""
    base_fro: float | None = None
    base_spn: float | None = None
    subspace: torch.Tensor | None = None   # |u_i^T W_base v_i| per dimension

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.Vh.shape[1]

    def params_per_rank(self) -> int:
        """Parameters one kept dimension costs: a row of down plus a column of up."""
        return self.out_features + self.in_features


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ``up.flatten(1) @ down.flatten(1)`` via two QRs and an r x r SVD."""
    b = up.reshape(up.shape[0], -1)
    a = down.reshape(down.shape[0], -1)
    q_u, r_u = torch.linalg.qr(b)            # [out, k1], [k1, r]
    q_d, r_d = torch.linalg.qr(a.T)          # [in, k2], [k2, r]
    core = r_u @ r_d.T                       # [k1, k2]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    return q_u @ u_c, s, vh_c @ q_d.T


def dense_svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slow reference: form ``up @ down`` and take its SVD (benchmarks and tests only)."""
    w = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(down.shape[0], s.numel())
    # copies: views would keep the full-size SVD factors alive
    return u[:, :r].clone(), s[:r].clone(), vh[:r].clone()


def decompose_layer(prefix: str, up: torch.Tensor, down: torch.Tensor, scale: float,
                    output_scale: float, dense: bool = False) -> DecomposedLayer:
    """Decompose one layer; ``scale`` (alpha / rank) is folded into S."""
    fn = dense_svd_of_product if dense else svd_of_product
    u, s, vh = fn(up, down)
    if scale < 0:  # keep singular values non-negative: move the sign into U
        u, scale = -u, -scale
    return DecomposedLayer(prefix=prefix, U=u, S=s * scale, Vh=vh, down_tail=tuple(down.shape[1:]),
                           up_tail=tuple(up.shape[2:]), output_scale=abs(output_scale) or 1.0,
                           source_rank=down.shape[0])


def subspace_scales(layer: DecomposedLayer, base: torch.Tensor) -> torch.Tensor:
    """|<u_i, W v_i>| for every dimension: how much the base acts along the LoRA's directions."""
    w = base.reshape(base.shape[0], -1).to(layer.U.dtype)
    return torch.linalg.vecdot(layer.Vh @ w.T, layer.U.T).abs()
