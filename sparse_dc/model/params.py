"""Parameter accounting and FLOPs: the one place logs, the ledger and the scaling law take N from.

Definitions:
- dense: every parameter of the dense-equivalent model (a sparse layer counts as its full out x in matrix),
  token embedding and untied LM head included (raw size: what memory and checkpoints hold).
- active: the non-zero (trainable, live) parameters: a sparse layer counts only its live entries/blocks.
- *_non_embedding: the same without the token embedding and the LM head (vocab x d each); norms are included.
- live_fraction: live / total units over the sparse layers only (1 for a dense model): the density actually
  trained.
- law_dense / law_active: N exactly as the paper's fit counts it (its notebook: N_active = N_dense x S).
  law_dense is everything except the input token-embedding table (a lookup, no FLOPs), so ONE vocab x d matrix
  (the head) is in: the paper's published counts (60m 8.0e7, 120m 1.45e8, 480m 5.21e8, reference/model-sizes.md)
  are this number for its shapes, and the law toolkit's MODEL_SIZES use it. law_active = law_dense x
  live_fraction: the head and the norms are scaled by the density too, although they stay dense (the paper's
  convention). The ledger's `dense_params`/`active_params` are these, so a ledger is fitted against (or anchored
  at) the paper's coefficients with the N they were fitted with.
- law_active_physical: the live parameters but the input embedding (the head and norms counted in full): what a
  sparse run actually holds and multiplies (the ledger's `active_params_physical`).
A module takes part as a sparse layer by exposing `dense_numel` and `active_numel` (SparseLinear does).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sparse_dc.model.config import ModelShape

if TYPE_CHECKING:  # counting shapes needs no torch (`sparse-dc model`, config validation)
    from torch import nn

_EMBEDDING_PARAMS = ("embed.weight", "head.weight")


@dataclass(frozen=True)
class ParamCounts:
    dense: int
    """Dense-equivalent parameters, embedding and head included (the ledger's `dense_params_total`)."""
    active: int
    """Non-zero parameters, embedding and head included (the ledger's `active_params_total`)."""
    dense_non_embedding: int
    active_non_embedding: int
    embedding: int
    """Token-embedding parameters (vocab x d)."""
    head: int
    """LM-head parameters (vocab x d, untied)."""
    sparse_dense: int = 0
    """Dense-equivalent parameters of the sparse layers (0 for a dense model)."""
    sparse_active: int = 0
    """Live parameters of the sparse layers."""

    @property
    def live_fraction(self) -> float:
        """Live / total units over the sparse layers: the density actually trained (1.0 for a dense model)."""
        return self.sparse_active / self.sparse_dense if self.sparse_dense else 1.0

    @property
    def law_dense(self) -> int:
        """Dense-equivalent N of the scaling law: all but the input embedding (the ledger's `dense_params`)."""
        return self.dense - self.embedding

    @property
    def law_active(self) -> int:
        """Active N of the scaling law: law_dense x live_fraction, the paper's convention (the ledger's
        `active_params`)."""
        return round(self.law_dense * self.live_fraction)

    @property
    def law_active_physical(self) -> int:
        """Live parameters but the input embedding (the ledger's `active_params_physical`)."""
        return self.active - self.embedding  # the embedding table is never sparse

    @property
    def density(self) -> float:
        """Active / dense over the non-embedding parameters (the sparse layers plus the small dense norms)."""
        return self.active_non_embedding / self.dense_non_embedding

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "law_dense": self.law_dense, "law_active": self.law_active,
                "law_active_physical": self.law_active_physical, "live_fraction": self.live_fraction}


def tally(entries: list[tuple[str, int, int]], sparse: frozenset[str] | set[str] = frozenset()) -> ParamCounts:
    """Sum (name, dense numel, active numel) entries into ParamCounts; names in _EMBEDDING_PARAMS are embeddings,
    names in `sparse` the sparse layers."""
    dense = sum(e[1] for e in entries)
    active = sum(e[2] for e in entries)
    by_name = {name: numel for name, numel, _ in entries}
    embedding, head = by_name.get("embed.weight", 0), by_name.get("head.weight", 0)
    emb_active = sum(e[2] for e in entries if e[0] in _EMBEDDING_PARAMS)
    return ParamCounts(dense=dense, active=active, dense_non_embedding=dense - embedding - head,
                       active_non_embedding=active - emb_active, embedding=embedding, head=head,
                       sparse_dense=sum(e[1] for e in entries if e[0] in sparse),
                       sparse_active=sum(e[2] for e in entries if e[0] in sparse))


def _numel(p: nn.Parameter) -> int:
    # ZeRO-3 replaces a partitioned parameter's data by an empty placeholder; ds_numel keeps the full size
    return int(getattr(p, "ds_numel", p.numel()))


def count_params(model: nn.Module) -> ParamCounts:
    """Count a built model (works on meta tensors and under ZeRO-3 partitioning)."""
    entries: list[tuple[str, int, int]] = []
    sparse_prefixes = []
    for name, module in model.named_modules():
        if hasattr(module, "active_numel") and hasattr(module, "dense_numel"):
            entries.append((name, int(module.dense_numel), int(module.active_numel)))
            sparse_prefixes.append(name + ".")
    sparse = {name for name, _, _ in entries}
    for name, p in model.named_parameters():
        if not any(name.startswith(prefix) for prefix in sparse_prefixes):
            entries.append((name, _numel(p), _numel(p)))
    return tally(entries, sparse)


def flops_per_token(counts: ParamCounts, shape: ModelShape, seq_len: int, active: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), PaLM appendix B / nanoGPT estimate_mfu:
    6 x (matmul parameters: non-embedding + LM head) + 12 x n_layers x d x seq_len for attention scores
    (causal masking not discounted). `active=True` counts only live sparse weights (the block-sparse kernels'
    work); `active=False` counts dense-equivalent work (what an unstructured B = 1 run actually executes)."""
    matmul = (counts.active_non_embedding if active else counts.dense_non_embedding) + counts.head
    return 6.0 * matmul + 12.0 * shape.n_layers * shape.hidden_size * seq_len
