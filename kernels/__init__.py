"""Block-sparse matmul kernels (Triton) and their torch reference path; installed as `sparse_dc.kernels`.

    layout = BlockLayout.from_block_mask(mask, block_size)     # mask: bool [N_out//B, K_in//B]
    values = layout.values_from_dense(weight)                  # [nnz, B, B]
    y = block_sparse_linear(x, values, layout, bias)           # x [..., K_in] -> [..., N_out]
    scores = dense_grad_block_scores(x, dy, layout)            # float32 [nbr, nbc], RigL growth
    sampled_block_grad(x, dy, rows, cols, B, out=acc)          # acc [n, B, B] fp32 += dyᵀx at listed blocks

Backends: see `sparse_dc.kernels.ops` (Triton on CUDA, torch reference on CPU, `backend=` to force).
"""
from .errors import BlockSparseError
from .layout import SUPPORTED_BLOCK_SIZES, BlockLayout
from .ops import BACKEND_ENV, BACKENDS, block_sparse_linear, dense_grad_block_scores, sampled_block_grad

__all__ = ["BACKEND_ENV", "BACKENDS", "SUPPORTED_BLOCK_SIZES", "BlockLayout", "BlockSparseError",
           "block_sparse_linear", "dense_grad_block_scores", "sampled_block_grad"]
