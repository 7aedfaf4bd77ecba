"""Pure-torch reference path: the CPU implementation of every op and the oracle the Triton kernels are tested
against. It builds the dense masked weight (zeros at inactive blocks) and lets torch do the matmuls, so its
gradients come from torch autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import BlockLayout

# The dense-gradient probe works on block-row chunks of dW of at most this many elements (~256 MiB in fp32).
_PROBE_CHUNK_ELEMENTS = 1 << 26


def linear(x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + bias with W = layout.to_dense(values); x [..., K_in] -> [..., N_out]."""
    return F.linear(x, layout.to_dense(values), bias)


def grad_input(dy: torch.Tensor, values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """dX = dY · W: dy [M, N_out] -> [M, K_in]."""
    return dy @ layout.to_dense(values)


def grad_values(dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """dW = dYᵀ · X sampled at live blocks: dy [M, N_out], x [M, K_in] -> [nnz, B, B] in slot order."""
    return layout.values_from_dense(dy.t() @ x)


def block_scores(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """float32 [nbr, nbc]: Frobenius norm of (dyᵀ·x) per block, for every block. x [M, K_in], dy [M, N_out].
    Works on chunks of block rows so that the dense dW is never materialised whole."""
    nbr, nbc = layout.block_shape
    b = layout.block_size
    k_in = layout.shape[1]
    x32, dy32 = x.float(), dy.float()
    rows_per_chunk = max(1, _PROBE_CHUNK_ELEMENTS // (b * k_in))
    scores = torch.empty(nbr, nbc, dtype=torch.float32, device=x.device)
    for r0 in range(0, nbr, rows_per_chunk):
        r1 = min(nbr, r0 + rows_per_chunk)
        g = dy32[:, r0 * b:r1 * b].t() @ x32  # [(r1-r0)*B, K_in]
        scores[r0:r1] = g.reshape(r1 - r0, b, nbc, b).square().sum(dim=(1, 3)).sqrt()
    return scores
