"""Llama model: shapes, causality, presets, parameter accounting (built vs analytic vs hand formula), FLOPs."""
import math

import pytest
import torch

from sparse_dc.config.base import ConfigError, load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError
from sparse_dc.model import (PRESETS, ModelConfig, build_model, count_params, flops_per_token, model_shape,
                             param_counts)
from sparse_dc.model.cli import main as model_cli
from sparse_dc.sparsity import SparseLinear, SparsityConfig


def _dense_formula(d: int, f: int, layers: int, vocab: int) -> int:
    # per block: q, k, v, o (4 d^2) + gate, up, down (3 d f) + 2 RMSNorm weights; + final norm, embedding, head
    return layers * (4 * d * d + 3 * d * f + 2 * d) + d + 2 * vocab * d


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), SparsityConfig(), vocab_size=50)
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 50)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    # positions before the change see the same prefix, so their logits are identical (causal attention)
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_rope_makes_attention_position_dependent():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), SparsityConfig(), vocab_size=50)
    a = model(torch.tensor([[3, 3, 3, 5]]))
    b = model(torch.tensor([[3, 3, 5, 5]]))
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_sequence_longer_than_rope_cache_rejected():
    model = build_model(ModelConfig(max_seq_len=8), SparsityConfig(), vocab_size=20)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", ["20m", "120m", "3b84"])
def test_preset_counts_match_hand_formula(name):
    shape = PRESETS[name]
    counts = param_counts(ModelConfig(preset=name), SparsityConfig(), vocab_size=32000)
    expected = _dense_formula(shape.hidden_size, shape.intermediate_size, shape.n_layers, 32000)
    assert counts.dense == counts.active == expected
    assert counts.dense_non_embedding == expected - 2 * 32000 * shape.hidden_size
    assert counts.embedding == counts.head == 32000 * shape.hidden_size


@pytest.mark.parametrize("name,paper", [("60m", 8.0e7), ("120m", 1.45e8), ("480m", 5.21e8)])
def test_law_counts_follow_the_papers_convention(name, paper):
    """The ledger's N (law_dense) is within 3% of the paper's published count; the raw total is far off. A sparse
    run's N is the paper's N_dense x S (the head scaled too, although it stays dense); what the run physically
    holds has its own count."""
    counts = param_counts(ModelConfig(preset=name), SparsityConfig(), vocab_size=32000)
    assert counts.law_dense == counts.dense - counts.embedding
    assert abs(counts.law_dense / paper - 1) < 0.03
    assert counts.dense / paper - 1 > 0.07  # two vocab x d matrices: 7% (480m) to 19% (60m) too many
    half = param_counts(ModelConfig(preset=name), SparsityConfig(density=0.5, block_size=64), vocab_size=32000)
    assert half.live_fraction == 0.5 and half.law_active == round(0.5 * half.law_dense)
    assert abs(half.law_active / (0.5 * paper) - 1) < 0.03
    assert half.law_active_physical == half.active_non_embedding + half.head > half.law_active


@pytest.mark.parametrize("block_size,distribution", [(1, "uniform"), (32, "erk"), (16, "am_ratio")])
def test_built_model_counts_equal_analytic_counts(block_size, distribution):
    model_cfg = ModelConfig(n_layers=2)
    sparsity = SparsityConfig(density=0.25, block_size=block_size, distribution=distribution, am_ratio=0.5)
    model = build_model(model_cfg, sparsity, vocab_size=40)
    built = count_params(model)
    assert built == param_counts(model_cfg, sparsity, vocab_size=40)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14
    live = sum(m.active_numel for m in sparse)
    total = sum(m.dense_numel for m in sparse)
    assert live == round(0.25 * total / block_size ** 2) * block_size ** 2  # global density exact
    assert built.dense - built.active == total - live
    # block-sparse: the only parameter is values [nnz, B, B] -> trainable numel scales with density
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == (built.active if block_size > 1 else built.dense)


def test_ffn_rounding_for_block_sparse_presets():
    m = ModelConfig(preset="20m")
    assert model_shape(m, SparsityConfig(density=0.5, block_size=16)).intermediate_size == 688
    assert model_shape(m, SparsityConfig(density=0.5, block_size=64)).intermediate_size == 704
    assert model_shape(m, SparsityConfig(density=0.5, block_size=128)).intermediate_size == 768
    assert model_shape(m, SparsityConfig(density=1.0, block_size=128)).intermediate_size == 688  # dense: no rounding
    assert model_shape(ModelConfig(preset="480m"), SparsityConfig(density=0.5, block_size=128)).intermediate_size \
        == 4224


def test_flops_per_token_formula():
    m, s = ModelConfig(preset="20m"), SparsityConfig(density=0.5, block_size=64)
    counts, shape = param_counts(m, s, 32000), model_shape(m, s)
    attn = 12 * shape.n_layers * shape.hidden_size * 256
    assert flops_per_token(counts, shape, 256) == 6 * (counts.active_non_embedding + counts.head) + attn
    assert flops_per_token(counts, shape, 256, active=False) == 6 * (counts.dense_non_embedding + counts.head) + attn


def test_vocab_resolution():
    with pytest.raises(SparseDCError, match="vocab_size"):
        build_model(ModelConfig(), SparsityConfig(), None)
    with pytest.raises(SparseDCError, match="at least the tokenizer's"):
        build_model(ModelConfig(vocab_size=10), SparsityConfig(), 20)
    assert build_model(ModelConfig(vocab_size=30), SparsityConfig(), 20).vocab_size == 30


@pytest.mark.parametrize("override,message", [
    ("sparsity.density=0", "sparsity.density=0.0: expected a number in (0, 1]"),
    ("sparsity.density=1.5", "sparsity.density=1.5"),
    ("sparsity.block_size=48", "sparsity.block_size=48: expected one of 1, 16, 32, 64, 128"),
    ("sparsity.method=magic", "sparsity.method='magic': expected one of 'static', 'set', 'rigl'"),
    ("sparsity.targets=[q,emb]", "sparsity.targets"),
    ("model.preset=big", "model.preset='big'"),
    ("model.n_heads=5", "model.hidden_size=64: expected a multiple of n_heads=5"),
])
def test_bad_config_rejected_with_field_name(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, [override])
    assert message in str(err.value)


def test_block_size_must_divide_hidden():
    with pytest.raises(ConfigError, match=r"sparsity.block_size=128: expected a divisor of model hidden_size=64"):
        load_config(RunConfig, None, ["sparsity.density=0.5", "sparsity.block_size=128"])
    cfg = load_config(RunConfig, None, ["sparsity.density=0.5", "sparsity.block_size=32", "model.preset=20m"])
    assert cfg.model.preset == "20m" and cfg.sparsity.block_size == 32


def test_model_cli_prints_table(capsys):
    assert model_cli(["--preset", "20m", "--block-size", "64", "--density", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "704*" in out and "rounded up to a multiple of block size 64" in out


@pytest.mark.parametrize("init", ["normal", "scaled_residual"])
def test_init_and_norm_eps_options(init):
    """init=normal (the paper's Hugging Face Llama): every weight matrix N(0, init_std); scaled_residual: o and down
    at init_std / sqrt(2 x n_layers). The RMSNorm epsilon is the configured one."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", n_layers=8, init=init, norm_eps=1e-6)
    model = build_model(cfg, SparsityConfig(), vocab_size=512)
    residual = 0.02 / math.sqrt(2 * 8) if init == "scaled_residual" else 0.02
    for name, p in model.named_parameters():
        if p.dim() == 2:
            want = residual if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0.02
            assert float(p.detach().std()) == pytest.approx(want, rel=0.05), name
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) == 17 and all(m.eps == 1e-6 for m in norms)
