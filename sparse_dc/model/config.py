"""Config of the model stage: a Llama shape chosen from a preset registry, with optional per-field overrides.

    model: {preset: 120m}                  # the paper's 120m shape
    model: {preset: tiny, n_layers: 3}     # a preset with one field overridden

Presets are the paper's sizes (reference/model-sizes.md: vocab 32000, max sequence 1024) plus `tiny` for tests.
The vocabulary normally comes from the data's tokenizer at build time (`vocab_size: null`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sparse_dc.config.base import Config, ConfigError


@dataclass(frozen=True)
class ModelShape:
    """A preset's shape: hidden width, SwiGLU intermediate width, attention heads, transformer blocks."""

    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_layers: int


# (kind, in_features, out_features) of a block's projections as functions of the shape; the kinds are the names
# SparsityConfig.targets accepts.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")


def projection_shapes(shape: ModelShape) -> Iterator[tuple[str, str, int, int]]:
    """Yield (module name, kind, in_features, out_features) for every block projection, in model order."""
    d, f = shape.hidden_size, shape.intermediate_size
    dims = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    for layer in range(shape.n_layers):
        for kind in PROJECTIONS:
            group = "attn" if kind in ATTENTION_PROJECTIONS else "mlp"
            yield f"layers.{layer}.{group}.{kind}", kind, *dims[kind]


# The paper's Llama sizes (name -> shape); names are its nominal parameter counts.
PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 128, 4, 2),  # tests: ~2e4 non-embedding params, multiples of 32 and 64
    "20m": ModelShape(256, 688, 4, 4),
    "40m": ModelShape(512, 1024, 8, 8),
    "60m": ModelShape(640, 1920, 10, 11),
    "120m": ModelShape(768, 2560, 12, 15),
    "240m": ModelShape(896, 3584, 14, 18),
    "480m": ModelShape(1280, 4224, 20, 21),
    "960m": ModelShape(1792, 5120, 28, 24),
    "1b92": ModelShape(2304, 6144, 36, 30),
    "3b84": ModelShape(3072, 8192, 32, 34),
}


@dataclass(kw_only=True)
class ModelConfig(Config):
    preset: str = "tiny"
    """Shape preset: one of PRESETS (tiny, 20m, 40m, 60m, 120m, 240m, 480m, 960m, 1b92, 3b84)."""
    hidden_size: int | None = None
    """Model width d; null = the preset's."""
    intermediate_size: int | None = None
    """SwiGLU width; null = the preset's. Block-sparse runs round it up to a multiple of the block size."""
    n_heads: int | None = None
    """Attention heads (head dim = hidden_size / n_heads); null = the preset's."""
    n_layers: int | None = None
    """Transformer blocks; null = the preset's."""
    vocab_size: int | None = None
    """Vocabulary size; null = take it from the prepared data's tokenizer at build time."""
    max_seq_len: int = 1024
    """Longest sequence the rotary cache covers (the paper's models: 1024; its runs used 256)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix (embedding, projections, LM head); norms start at 1."""
    init: Literal["scaled_residual", "normal"] = "scaled_residual"
    """scaled_residual: the projections that write into the residual stream (o, down) use init_std /
    sqrt(2 * n_layers) (GPT-2); normal: every weight matrix N(0, init_std) (Hugging Face Llama's init, the
    paper's code)."""

    def validate(self, path: str = "") -> None:
        self.check(self.preset in PRESETS, path, "preset", f"one of {', '.join(PRESETS)}")
        for name in ("hidden_size", "intermediate_size", "n_heads", "n_layers", "vocab_size"):
            value = getattr(self, name)
            self.check(value is None or value >= 1, path, name, "null or an integer >= 1")
        shape = self.shape()
        if shape.hidden_size % shape.n_heads or (shape.hidden_size // shape.n_heads) % 2:
            where = f"{path}.hidden_size" if path else "hidden_size"
            raise ConfigError(f"{where}={shape.hidden_size}: expected a multiple of n_heads={shape.n_heads} "
                              "with an even head dim (RoPE rotates pairs)")
        self.check(self.max_seq_len >= 1, path, "max_seq_len", "an integer >= 1")
        self.check(self.rope_theta > 0, path, "rope_theta", "a number > 0")
        self.check(self.norm_eps > 0, path, "norm_eps", "a number > 0")
        self.check(self.init_std > 0, path, "init_std", "a number > 0")
        super().validate(path)

    def shape(self, block_size: int = 1) -> ModelShape:
        """The preset's shape with this config's overrides; intermediate_size rounded up to a multiple of
        `block_size` (the kernels need B to divide both dims; the extra SwiGLU columns are ordinary weights)."""
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: expected one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        values = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(base, f.name)
                  for f in dataclasses.fields(ModelShape)}
        values["intermediate_size"] = -(-values["intermediate_size"] // block_size) * block_size
        return ModelShape(**values)
