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


def _dense_grad_chunks(x: torch.Tensor, dy: torch.Tensor, b: int):
    """Yield (r0, r1, g): the fp32 blocks of dW = dyᵀ·x in block rows r0..r1-1 as g [r1-r0, nbc, B, B].
    x [M, K_in], dy [M, N_out]. Chunks of block rows keep the dense dW from being materialised whole."""
    k_in = x.shape[1]
    nbr, nbc = dy.shape[1] // b, k_in // b
    x32, dy32 = x.float(), dy.float()
    rows_per_chunk = max(1, _PROBE_CHUNK_ELEMENTS // (b * k_in))
    for r0 in range(0, nbr, rows_per_chunk):
        r1 = min(nbr, r0 + rows_per_chunk)
        g = dy32[:, r0 * b:r1 * b].t() @ x32  # [(r1-r0)*B, K_in]
        yield r0, r1, g.reshape(r1 - r0, b, nbc, b).transpose(1, 2)


def block_scores(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """float32 [nbr, nbc]: Frobenius norm of (dyᵀ·x) per block, for every block. x [M, K_in], dy [M, N_out]."""
    scores = torch.empty(layout.block_shape, dtype=torch.float32, device=x.device)
    for r0, r1, g in _dense_grad_chunks(x, dy, layout.block_size):
        scores[r0:r1] = g.square().sum(dim=(2, 3)).sqrt()
    return scores


def sampled_block_grad(x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """out[e] += (dyᵀ·x) block (rows[e], cols[e]) in fp32: x [M, K_in], dy [M, N_out], rows/cols [n],
    out float32 [n, B, B]. Returns `out`."""
    rows, cols = rows.long(), cols.long()
    for r0, r1, g in _dense_grad_chunks(x, dy, out.shape[-1]):
        sel = ((rows >= r0) & (rows < r1)).nonzero().squeeze(1)
        out.index_add_(0, sel, g[rows[sel] - r0, cols[sel]])
    return out
