"""The Triton kernels on a CUDA GPU at real sizes (skipped without one): vs. dense masked torch."""
import pytest
import torch
from kernel_cases import random_case

from sparse_dc.kernels import (BlockLayout, block_sparse_linear, dense_grad_block_scores, reference,
                               sampled_block_grad, triton_ops)

pytestmark = pytest.mark.gpu


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b", [64, 128])
@pytest.mark.parametrize("k_in,n_out", [(2048, 5632), (5632, 2048)])
def test_forward_and_grads_at_llama_shapes(dtype, tol, b, k_in, n_out):
    layout, values, _ = random_case(n_out, k_in, b, 0.25, dtype=torch.float32, device="cuda")
    values = (values / k_in ** 0.5).to(dtype).requires_grad_()
    x = torch.randn(2, 2049, k_in, device="cuda", dtype=dtype, requires_grad=True)  # M = 4098: ragged tile
    bias = torch.randn(n_out, device="cuda", dtype=dtype, requires_grad=True)
    y = block_sparse_linear(x, values, layout, bias)  # auto -> Triton on CUDA
    dy = torch.randn_like(y)
    y.backward(dy)
    w = layout.to_dense(values.detach().float())
    x32, dy32 = x.detach().float().reshape(-1, k_in), dy.float().reshape(-1, n_out)
    assert rel_err(y.reshape(-1, n_out), x32 @ w.t() + bias.detach().float()) < tol
    assert rel_err(x.grad.reshape(-1, k_in), dy32 @ w) < tol
    assert rel_err(values.grad, layout.values_from_dense(dy32.t() @ x32)) < tol
    assert rel_err(bias.grad, dy32.sum(0)) < tol


def test_dw_split_and_probe_at_low_density():
    layout, _, _ = random_case(4096, 4096, 128, 1 / 256, device="cuda")  # 4 live blocks: M is split
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    assert triton_ops._split_m(layout.nnz, 16384, 64, x.device) > 1
    got = triton_ops.sdd(dy, x, layout)
    assert rel_err(got, reference.grad_values(dy.float(), x.float(), layout)) < 1e-2
    scores = dense_grad_block_scores(x[:2048], dy[:2048], layout)
    assert rel_err(scores, reference.block_scores(x[:2048], dy[:2048], layout)) < 1e-2


@pytest.mark.parametrize("density", [0.5, 1 - 1 / 256])  # 256 blocks listed; 2 listed (M split)
def test_sampled_block_grad_accumulates_at_llama_shapes(density):
    layout, _, _ = random_case(4096, 2048, 128, density, device="cuda")
    rows, cols = (~layout.block_mask()).nonzero(as_tuple=True)  # the dead blocks, as RigL lists them
    acc = torch.zeros(rows.numel(), 128, 128, device="cuda")
    expect = torch.zeros_like(acc)
    for seed in (0, 1):  # two micro-batches, M = 4097: a ragged tile
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(4097, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        dy = torch.randn(4097, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
        sampled_block_grad(x, dy, rows, cols, 128, out=acc)
        reference.sampled_block_grad(x, dy, rows, cols, expect)
    assert rel_err(acc, expect) < 1e-2


def test_layout_update_on_device():
    layout, values, _ = random_case(2048, 2048, 64, 0.5, device="cuda")
    mask = layout.block_mask()
    new_mask = mask.roll(1, dims=1)
    new_layout, grown = layout.with_mask(new_mask)
    assert grown.is_cuda and torch.equal(new_layout.block_mask(), new_mask)
    rebuilt = BlockLayout.from_state(new_layout.shape, 64, **new_layout.state_tensors())
    x = torch.randn(100, 2048, device="cuda")
    torch.testing.assert_close(block_sparse_linear(x, values, rebuilt),
                               block_sparse_linear(x, values, rebuilt, backend="reference"), rtol=1e-4, atol=1e-4)
