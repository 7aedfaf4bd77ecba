"""Build a (sparse) Llama from the model and sparsity configs, and count its parameters without building it.

Only `build_model` needs torch (imported there): shapes, counts and the density check serve config validation and
`sparse-dc model`, which must stay fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sparse_dc.config.base import ConfigError
from sparse_dc.errors import SparseDCError
from sparse_dc.model.config import ModelConfig, ModelShape, projection_shapes
from sparse_dc.model.params import ParamCounts, tally
from sparse_dc.sparsity.config import SparsityConfig, check_block_divides
from sparse_dc.sparsity.distribution import LayerSpec, allocate

if TYPE_CHECKING:
    from sparse_dc.model.llama import Llama

# A run whose live fraction differs from sparsity.density by more than this (relative) is refused: the ledger's
# density and the law's S would describe a model that was not trained.
DENSITY_TOLERANCE = 0.05


def resolve_vocab(model_cfg: ModelConfig, vocab_size: int | None) -> int:
    """model.vocab_size if set (it must hold the data's tokenizer), else the data's vocabulary size."""
    if model_cfg.vocab_size is None:
        if vocab_size is None:
            raise SparseDCError("model.vocab_size=None: expected a vocabulary size from the data's tokenizer or "
                                "in the config")
        return vocab_size
    if vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise SparseDCError(f"model.vocab_size={model_cfg.vocab_size}: expected at least the tokenizer's "
                            f"vocabulary size {vocab_size}")
    return model_cfg.vocab_size


def model_shape(model_cfg: ModelConfig, sparsity_cfg: SparsityConfig) -> ModelShape:
    """The built shape: block-sparse runs round the SwiGLU width up to a multiple of B (688 -> 704 at B = 32/64,
    768 at B = 128); hidden_size must be a multiple of B."""
    block = sparsity_cfg.block_size if sparsity_cfg.sparse else 1
    shape = model_cfg.shape(block)
    check_block_divides(block, shape.hidden_size)
    return shape


def sparse_layers(shape: ModelShape, sparsity_cfg: SparsityConfig) -> list[LayerSpec]:
    """The projections that are sparse, in model order (empty for a dense run)."""
    if not sparsity_cfg.sparse:
        return []
    return [LayerSpec(name, kind, n_out, n_in) for name, kind, n_in, n_out in projection_shapes(shape)
            if kind in sparsity_cfg.targets]


def achieved_density(model_cfg: ModelConfig, sparsity_cfg: SparsityConfig) -> float:
    """The live fraction of the sparse projections a build trains: `sparsity.density` up to rounding to whole
    units, except where every projection keeping at least one unit (B x B block) forces more."""
    specs = sparse_layers(model_shape(model_cfg, sparsity_cfg), sparsity_cfg)
    if not specs:
        return 1.0
    return sum(allocate(specs, sparsity_cfg).values()) / sum(s.units(sparsity_cfg.block_size) for s in specs)


def check_achievable_density(model_cfg: ModelConfig, sparsity_cfg: SparsityConfig) -> None:
    """ConfigError unless the build trains within DENSITY_TOLERANCE of the requested density."""
    achieved, wanted = achieved_density(model_cfg, sparsity_cfg), sparsity_cfg.density
    if abs(achieved / wanted - 1) > DENSITY_TOLERANCE:
        b, shape = sparsity_cfg.block_size, model_shape(model_cfg, sparsity_cfg)
        n = len(sparse_layers(shape, sparsity_cfg))
        raise ConfigError(
            f"sparsity.density={wanted}: not achievable with {b}x{b} blocks at hidden size {shape.hidden_size} "
            f"(each of the {n} sparse projections keeps at least one block), which would train at density "
            f"{achieved:.4g}; expected a density within {DENSITY_TOLERANCE:.0%} of the trained one (lower "
            f"sparsity.block_size, a wider model, or sparsity.density={achieved:.4g})")


def build_model(model_cfg: ModelConfig, sparsity_cfg: SparsityConfig, vocab_size: int | None = None) -> Llama:
    """A Llama whose targeted projections are SparseLinear with the configured initial topology (seeded by
    sparsity.seed, identical on every rank; sparse_dc.sparsity.paths draws it). Dense weights draw from torch's
    global RNG: seed it first."""
    from sparse_dc.model.llama import Llama, dense_linear
    from sparse_dc.sparsity.layer import sparse_linear  # imports the kernels only when a model is built
    from sparse_dc.sparsity.paths import initial_masks

    shape = model_shape(model_cfg, sparsity_cfg)
    specs = sparse_layers(shape, sparsity_cfg)
    counts = allocate(specs, sparsity_cfg) if specs else {}
    masks = initial_masks(specs, counts, shape.n_heads, shape.hidden_size, sparsity_cfg)

    def factory(name: str, in_features: int, out_features: int, std: float):
        if name not in masks:
            return dense_linear(name, in_features, out_features, std)
        return sparse_linear(in_features, out_features, sparsity_cfg.block_size, masks[name], std)

    return Llama(model_cfg, shape, resolve_vocab(model_cfg, vocab_size), factory)


def param_counts(model_cfg: ModelConfig, sparsity_cfg: SparsityConfig, vocab_size: int | None = None
                 ) -> ParamCounts:
    """What count_params(build_model(...)) returns, computed from the shapes alone (for planning big models)."""
    shape = model_shape(model_cfg, sparsity_cfg)
    vocab, d, b = resolve_vocab(model_cfg, vocab_size), shape.hidden_size, sparsity_cfg.block_size
    specs = sparse_layers(shape, sparsity_cfg)
    live = allocate(specs, sparsity_cfg) if specs else {}
    entries = [("embed.weight", vocab * d, vocab * d), ("head.weight", vocab * d, vocab * d), ("norm.weight", d, d)]
    for name, _, n_in, n_out in projection_shapes(shape):
        active = live[name] * b * b if name in live else n_in * n_out
        entries.append((name, n_in * n_out, active))
    entries += [(f"layers.{i}.{norm}.weight", d, d) for i in range(shape.n_layers) for norm in ("attn_norm",
                                                                                                  "mlp_norm")]
    return tally(entries, set(live))
