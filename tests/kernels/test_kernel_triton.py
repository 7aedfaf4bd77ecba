"""The Triton kernels (forward, dX, dW, probe) through the CPU interpreter, against dense masked torch."""
import pytest
import torch
from kernel_cases import random_case

from sparse_dc.kernels import BlockLayout, block_sparse_linear, dense_grad_block_scores, reference, triton_ops

# Relative to max|ref|: the interpreter's fp32->bf16 cast truncates (platform-notes.md).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape and got.dtype == dtype
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item() or 1.0
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.0e} x {scale:.3g}"


def run_and_compare(x: torch.Tensor, layout: BlockLayout, values: torch.Tensor, bias=None) -> None:
    """Forward and all gradients of the Triton op vs. float64 autograd of the dense masked op."""
    dtype = values.dtype
    x = x.detach().requires_grad_()
    v = values.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    y = block_sparse_linear(x, v, layout, b, backend="triton")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(g)

    x64 = x.detach().double().requires_grad_()
    w64 = layout.to_dense(values.detach().double()).requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(g.double())
    assert_close_rel(y, y64, dtype)
    assert_close_rel(x.grad, x64.grad, dtype)
    assert_close_rel(v.grad, layout.values_from_dense(w64.grad), dtype)
    if bias is not None:
        assert_close_rel(b.grad, b64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_dense_masked(dtype, with_bias):
    layout, values, _ = random_case(96, 128, 32, 0.5, dtype=dtype)
    x = torch.randn(70, 128).to(dtype)  # 70: not a multiple of the 64-row tile
    bias = torch.randn(96).to(dtype) if with_bias else None
    run_and_compare(x, layout, values, bias)


def test_gradcheck_fp64():
    layout, values, _ = random_case(64, 64, 32, 0.75, dtype=torch.float64)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(64, dtype=torch.float64, requires_grad=True)
    values = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: block_sparse_linear(x, v, layout, b, backend="triton"),
                                    (x, values, bias), fast_mode=True)


def test_empty_block_rows_and_columns():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)  # row 1, column 1 empty
    layout = BlockLayout.from_block_mask(mask, 32)
    values = torch.randn(layout.nnz, 32, 32)
    run_and_compare(torch.randn(33, 128), layout, values, torch.randn(192)[::2])  # strided bias


@pytest.mark.parametrize("mask", [torch.ones(2, 3, dtype=torch.bool),  # fully dense
                                  torch.tensor([[0, 0, 0], [0, 1, 0]], dtype=torch.bool)],  # one live block
                         ids=["dense", "single-block"])
def test_dense_and_single_block_layouts(mask):
    layout = BlockLayout.from_block_mask(mask, 32)
    run_and_compare(torch.randn(40, 96), layout, torch.randn(layout.nnz, 32, 32))


def test_empty_layout_gives_bias_and_zero_grads():
    layout = BlockLayout.from_block_mask(torch.zeros(2, 2, dtype=torch.bool), 32)
    run_and_compare(torch.randn(5, 64), layout, torch.zeros(0, 32, 32), torch.randn(64))


def test_single_row_and_3d_and_noncontiguous_x():
    layout, values, _ = random_case(64, 96, 32, 0.5)
    run_and_compare(torch.randn(1, 96), layout, values)  # M = 1
    run_and_compare(torch.randn(0, 96), layout, values)  # M = 0 (an empty micro-batch)
    run_and_compare(torch.randn(2, 3, 96), layout, values)  # 3-D x
    run_and_compare(torch.randn(96, 20).t(), layout, values)  # non-contiguous (transposed) x


@pytest.mark.parametrize("b", [16, 64, 128])
def test_other_block_sizes(b):
    k_in = max(64, b)
    layout, values, _ = random_case(2 * k_in, k_in, b, 0.5)
    run_and_compare(torch.randn(24, k_in), layout, values)


def test_only_requested_grads_are_computed():
    layout, values, dense = random_case(64, 64, 32, 0.5)
    x = torch.randn(8, 64)
    v = values.clone().requires_grad_()
    block_sparse_linear(x, v, layout, backend="triton").sum().backward()
    assert x.grad is None
    torch.testing.assert_close(v.grad, layout.values_from_dense(torch.ones(8, 64).t() @ x))


@pytest.mark.parametrize("split", [2, 3])
def test_dw_split_over_m(split):
    layout, _, _ = random_case(64, 96, 32, 0.5)
    x, dy = torch.randn(300, 96), torch.randn(300, 64)
    torch.testing.assert_close(triton_ops.sdd(dy, x, layout, split_m=split),
                               reference.grad_values(dy, x, layout), rtol=1e-5, atol=1e-4)


def test_dw_split_heuristic():
    assert triton_ops._split_m(n_programs=2, m=1 << 16, block_m=64, device=torch.device("cpu")) == 4
    assert triton_ops._split_m(n_programs=1000, m=1 << 16, block_m=64, device=torch.device("cpu")) == 1
    assert triton_ops._split_m(n_programs=1, m=100, block_m=64, device=torch.device("cpu")) == 1


@pytest.mark.parametrize("split", [None, 2])
def test_probe_matches_reference(split):
    layout, _, _ = random_case(64, 96, 32, 0.5)
    x, dy = torch.randn(2, 70, 96), torch.randn(2, 70, 64)
    expect = reference.block_scores(x.reshape(-1, 96), dy.reshape(-1, 64), layout)
    if split is None:
        got = dense_grad_block_scores(x, dy, layout, backend="triton")
    else:
        got = triton_ops.block_scores(x.reshape(-1, 96), dy.reshape(-1, 64), layout, split_m=split)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4)


def test_probe_bf16():
    layout, _, _ = random_case(64, 64, 32, 0.5)
    x, dy = torch.randn(40, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    expect = reference.block_scores(x, dy, layout)
    got = dense_grad_block_scores(x, dy, layout, backend="triton")
    assert (got - expect).abs().max() <= 2e-2 * expect.abs().max()


def test_autotune_configs_are_consistent():
    for b in (16, 32, 64, 128):
        for kind in ("dds", "sdd"):
            cfgs = triton_ops.autotune_configs(kind, b)
            assert cfgs
            for cfg in cfgs:
                assert b % cfg.get("BLOCK_K", b) == 0 and cfg["BLOCK_M"] >= 16


def test_tune_picks_fastest_and_caches(monkeypatch):
    # do_bench needs CUDA; the timings are supplied so the selection logic itself is what runs.
    fake_ms = {1: 2.0, 2: 0.5, 3: 1.0}
    calls = []

    def fake_bench(fn, **kwargs):
        return fn()

    def launch(cfg):
        calls.append(cfg["id"])
        if cfg["id"] == 4:
            raise triton_ops.triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return fake_ms[cfg["id"]]

    monkeypatch.setattr(triton_ops.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_ops, "_TUNED", {})
    configs = [{"id": i} for i in (4, 1, 2, 3)]
    assert triton_ops._tune(("k",), configs, launch) == {"id": 2}
    assert triton_ops._tune(("k",), configs, launch) == {"id": 2} and calls == [4, 1, 2, 3]  # cached
