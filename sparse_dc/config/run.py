"""The root config tree: one dataclass per pipeline stage, loaded from YAML with dotted CLI overrides.

    name: my-run
    data:     {dir: ..., unique_tokens: 100M, seq_len: 256, epochs: 4}
    model:    ...   (sparse_dc/model/config.py)
    sparsity: ...   (sparse_dc/sparsity/config.py)
    train:    ...   (sparse_dc/train/config.py)

Later stages add their sections here; every command validates the whole tree once at start.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparse_dc.config.base import Config, ConfigError
from sparse_dc.data.config import DataConfig
from sparse_dc.model.config import ModelConfig
from sparse_dc.sparsity.config import SparsityConfig
from sparse_dc.train.config import TrainConfig


@dataclass(kw_only=True)
class RunConfig(Config):
    name: str = "run"
    """Run name: the folder under `output_dir` and the ledger row's `name`."""
    output_dir: str = "runs"
    """Where run folders (checkpoints, metrics.jsonl, tensorboard) are created."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, path: str = "") -> None:
        self.check(bool(self.name) and "/" not in self.name, path, "name", "a non-empty name without '/'")
        super().validate(path)
        from sparse_dc.model.build import check_achievable_density, model_shape

        if self.sparsity.sparse:
            model_shape(self.model, self.sparsity)  # the block size divides the width
            check_achievable_density(self.model, self.sparsity)
        # the model reads seq_len - 1 input positions of each sequence (the last token is only a target)
        if self.data.seq_len - 1 > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len}: expected at most model.max_seq_len + 1 = "
                              f"{self.model.max_seq_len + 1} (raise model.max_seq_len to train longer sequences)")
