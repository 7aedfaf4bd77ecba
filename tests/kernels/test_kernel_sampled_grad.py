"""sampled_block_grad: dYᵀX at a list of blocks, accumulated in fp32 over calls (exact RigL growth over
micro-batches), on both backends (Triton through the CPU interpreter) against dense float64 torch."""
import pytest
import torch
from kernel_cases import random_mask

from sparse_dc.kernels import BlockSparseError, sampled_block_grad, triton_ops

# Relative to max|ref|: the interpreter's fp32->bf16 cast truncates (platform-notes.md); the inputs are exact bf16
# values, so only the accumulation order differs from the float64 oracle.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def dense_blocks(x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """float64 [n, B, B]: the listed blocks of the dense dyᵀ·x."""
    dw = dy.double().reshape(-1, dy.shape[-1]).t() @ x.double().reshape(-1, x.shape[-1])
    nbr, nbc = dw.shape[0] // b, dw.shape[1] // b
    return dw.reshape(nbr, b, nbc, b).permute(0, 2, 1, 3)[rows.long(), cols.long()]


def dead_blocks(nbr: int, nbc: int, seed: int = 0, shuffle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int32 of the dead blocks of a half-dense random mask, row-major or in a random order."""
    rows, cols = (~random_mask(nbr, nbc, 0.5, seed)).nonzero(as_tuple=True)
    if shuffle:
        perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))
        rows, cols = rows[perm], cols[perm]
    return rows.int(), cols.int()


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max error {err:.3g} > {tol:.0e} x {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_calls_accumulate_the_summed_gradient(backend, dtype):
    b, n_out, k_in = 32, 64, 96
    rows, cols = dead_blocks(n_out // b, k_in // b, shuffle=True)  # any order, not only row-major
    g = torch.Generator().manual_seed(1)
    # micro-batch 1: M = 70 (not a multiple of the 64-row tile), 3-D; micro-batch 2: M = 33
    x1, dy1 = torch.randn(2, 35, k_in, generator=g).to(dtype), torch.randn(2, 35, n_out, generator=g).to(dtype)
    x2, dy2 = torch.randn(33, k_in, generator=g).to(dtype), torch.randn(33, n_out, generator=g).to(dtype)
    acc = torch.zeros(rows.numel(), b, b)
    assert sampled_block_grad(x1, dy1, rows, cols, b, out=acc, backend=backend) is acc
    assert_close_rel(acc, dense_blocks(x1, dy1, rows, cols, b), TOL[dtype])
    sampled_block_grad(x2, dy2, rows, cols, b, out=acc, backend=backend)
    expect = dense_blocks(x1, dy1, rows, cols, b) + dense_blocks(x2, dy2, rows, cols, b)
    assert_close_rel(acc, expect, TOL[dtype])


def test_triton_m_split_accumulates_like_one_program():
    # GPUs split M when few blocks are listed: partials are combined then added, never raced
    rows, cols = dead_blocks(2, 3, seed=2)
    x, dy = torch.randn(300, 96), torch.randn(300, 64)
    acc = torch.ones(rows.numel(), 32, 32)
    triton_ops.sampled_block_grad(x, dy, rows, cols, acc, split_m=3)
    assert_close_rel(acc, 1 + dense_blocks(x, dy, rows, cols, 32), TOL[torch.float32])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_list_and_empty_batch(backend):
    empty = torch.zeros(0, dtype=torch.int32)
    got = sampled_block_grad(torch.randn(5, 64), torch.randn(5, 32), empty, empty, 16, backend=backend)
    assert got.shape == (0, 16, 16) and got.dtype == torch.float32
    rows, cols = dead_blocks(2, 4)
    acc = torch.full((rows.numel(), 16, 16), 2.0)
    sampled_block_grad(torch.randn(0, 64), torch.randn(0, 32), rows, cols, 16, out=acc, backend=backend)
    assert torch.equal(acc, torch.full_like(acc, 2.0))  # M = 0 adds nothing


def test_new_output_when_out_is_omitted_b16():
    rows, cols = dead_blocks(4, 6, seed=3)
    x, dy = torch.randn(20, 96), torch.randn(20, 64)
    got = sampled_block_grad(x, dy, rows.long(), cols.long(), 16, backend="triton")  # int64 indices accepted
    assert_close_rel(got, dense_blocks(x, dy, rows, cols, 16), TOL[torch.float32])


def test_validation_errors():
    x, dy = torch.randn(4, 96), torch.randn(4, 64)
    rows, cols = dead_blocks(2, 3)
    with pytest.raises(BlockSparseError, match="block_size in"):
        sampled_block_grad(x, dy, rows, cols, 24)
    with pytest.raises(BlockSparseError, match="dividing N_out and K_in"):
        sampled_block_grad(torch.randn(4, 80), torch.randn(4, 64), rows, cols, 32)
    with pytest.raises(BlockSparseError, match="dy of shape"):
        sampled_block_grad(x, torch.randn(5, 64), rows, cols, 32)
    with pytest.raises(BlockSparseError, match="one floating dtype"):
        sampled_block_grad(x, dy.double(), rows, cols, 32)
    with pytest.raises(BlockSparseError, match="cols of the length of rows"):
        sampled_block_grad(x, dy, rows, cols[1:], 32)
    with pytest.raises(BlockSparseError, match=r"rows in \[0, 2\) and cols in \[0, 3\)"):
        sampled_block_grad(x, dy, rows + 1, cols, 32)
    with pytest.raises(BlockSparseError, match="rows to be a 1-D int32/int64 tensor"):
        sampled_block_grad(x, dy, rows.float(), cols, 32)
    with pytest.raises(BlockSparseError, match="out to be a contiguous float32 tensor"):
        sampled_block_grad(x, dy, rows, cols, 32, out=torch.zeros(rows.numel(), 32, 32, dtype=torch.bfloat16))
