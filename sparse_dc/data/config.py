"""Config of the data stage: which prepared directory, and the token budget a run trains on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparse_dc.config.base import Config


@dataclass(kw_only=True)
class DataConfig(Config):
    dir: str = "runs/data/builtin"
    """A directory written by `sparse-dc data prepare` (holds manifest.json and the Arrow shards)."""
    unique_tokens: int = 200_000
    """U: unique training tokens, an exact prefix of the prepared (seeded) document order after validation."""
    seq_len: int = 256
    """L: tokens per training sequence (the paper's runs used 256)."""
    packing: Literal["stream", "document"] = "stream"
    """stream: the pool's token stream cut into L-token sequences (documents joined by EOS, every slot a real
    token); document: one document per sequence, truncated or padded to L, padding masked out of the loss (the
    paper's code). Under document packing U and D count slots (sequences x L); the real tokens are recorded too."""
    epochs: float | None = 4.0
    """R: passes over the unique pool (may be fractional). Give exactly one of `epochs` and `total_tokens`."""
    total_tokens: int | None = None
    """D: total training tokens (a multiple of seq_len). Give exactly one of `epochs` and `total_tokens`."""
    val_tokens: int = 32_768
    """Held-out validation tokens, carved out before the unique pool and never trained on."""
    seed: int = 1234
    """Seeds the per-epoch permutations of the unique sequences: epoch e uses (seed, e)."""
    verify: Literal["checksum", "size"] = "checksum"
    """How shards are checked against the manifest at load: full sha256, or byte size + Arrow lengths only."""
    num_workers: int = 0
    """torch DataLoader worker processes per rank (0 reads in the training process)."""

    def validate(self, path: str = "") -> None:
        self.check(self.seq_len >= 2, path, "seq_len", "an integer >= 2")
        self.check(self.unique_tokens >= self.seq_len, path, "unique_tokens",
                   f"at least seq_len={self.seq_len} tokens")
        self.check((self.epochs is None) != (self.total_tokens is None), path, "epochs",
                   "exactly one of data.epochs and data.total_tokens (the other null)")
        if self.epochs is not None:
            self.check(self.epochs > 0, path, "epochs", "a number > 0")
        if self.total_tokens is not None:
            self.check(self.total_tokens >= self.seq_len and self.total_tokens % self.seq_len == 0, path,
                       "total_tokens", f"a positive multiple of seq_len={self.seq_len}")
        self.check(self.val_tokens >= 0, path, "val_tokens", "an integer >= 0")
        self.check(self.num_workers >= 0, path, "num_workers", "an integer >= 0")
        super().validate(path)
