"""The public op on the torch reference path (the CPU default): values, gradients, dispatch and validation."""
import pytest
import torch
from kernel_cases import random_case

from sparse_dc.kernels import BlockLayout, BlockSparseError, block_sparse_linear, dense_grad_block_scores
from sparse_dc.kernels.ops import resolve_backend


@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_masked_dense_with_grads(with_bias):
    layout, values, dense = random_case(96, 64, 32, 0.5, dtype=torch.float64)
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(96, dtype=torch.float64, requires_grad=True) if with_bias else None
    values = values.clone().requires_grad_()
    y = block_sparse_linear(x, values, layout, bias)
    assert y.shape == (2, 5, 96)
    dense = dense.clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x, dense, bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    gx_ref, gd_ref = torch.autograd.grad(y_ref, (x, dense), g)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, layout.values_from_dense(gd_ref))


def test_auto_dispatch_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("SPARSE_DC_KERNEL_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("SPARSE_DC_KERNEL_BACKEND", "triton")
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("SPARSE_DC_KERNEL_BACKEND", "fast")
    with pytest.raises(BlockSparseError, match="SPARSE_DC_KERNEL_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(BlockSparseError, match="backend in"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BlockSparseError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_reference_probe_matches_dense_gradient_norms(monkeypatch):
    monkeypatch.setattr("sparse_dc.kernels.reference._PROBE_CHUNK_ELEMENTS", 2 * 32 * 64)  # force chunking
    layout, _, _ = random_case(96, 64, 32, 0.5)
    x, dy = torch.randn(3, 7, 64), torch.randn(3, 7, 96)
    scores = dense_grad_block_scores(x, dy, layout, backend="reference")
    dw = dy.reshape(-1, 96).t() @ x.reshape(-1, 64)
    expect = dw.reshape(3, 32, 2, 32).square().sum(dim=(1, 3)).sqrt()
    assert scores.dtype == torch.float32 and scores.shape == (3, 2)
    torch.testing.assert_close(scores, expect)


def test_validation_errors():
    layout, values, _ = random_case(64, 96, 32, 0.5)
    x = torch.randn(4, 96)
    with pytest.raises(BlockSparseError, match=r"x of shape \[..., K_in=96\]"):
        block_sparse_linear(torch.randn(4, 64), values, layout)
    with pytest.raises(BlockSparseError, match="x of the values' dtype"):
        block_sparse_linear(x.double(), values, layout)
    with pytest.raises(BlockSparseError, match=r"bias of shape \(64,\)"):
        block_sparse_linear(x, values, layout, torch.zeros(96))
    with pytest.raises(BlockSparseError, match="bias of the values' dtype"):
        block_sparse_linear(x, values, layout, torch.zeros(64, dtype=torch.float16))
    with pytest.raises(BlockSparseError, match=r"values of shape \(nnz, B, B\)"):
        block_sparse_linear(x, values[1:], layout)
    with pytest.raises(BlockSparseError, match="layout's device"):
        block_sparse_linear(x, values.to("meta"), layout)
    with pytest.raises(BlockSparseError, match="x on the values' device"):
        block_sparse_linear(x.to("meta"), values, layout)
    with pytest.raises(BlockSparseError, match="layout to be a BlockLayout"):
        block_sparse_linear(x, values, None)
    with pytest.raises(BlockSparseError, match="dy of shape"):
        dense_grad_block_scores(x, torch.randn(4, 96), layout)
    with pytest.raises(ValueError):  # BlockSparseError is a ValueError (and a SparseDCError)
        BlockLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 24)


def test_autocast_casts_operands():
    layout, values, dense = random_case(64, 64, 32, 0.5)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x, values, layout)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ dense.t(), atol=0.1, rtol=0.02)
