"""The TokenBudget loader: exactly U unique tokens, exactly D training tokens, identical at any world size.

Layout of the prepared token stream (documents already in a seeded order, see shards.py):

    [ validation: val_tokens | rest of the doc cut by it | unique pool: U tokens | unused ... ]
                               (dropped, so no document    ^ starts at a document boundary
                                is in both sets)

A directory prepared with a held-out validation set (`prepare --val-input/--val-split`, from another input or
split, as the paper's C4 validation) evaluates on its first val_tokens tokens instead, and the pool starts at
token 0 of the training stream (`val_source` "heldout" in the plan, "prefix" otherwise):

    training stream: [ unique pool: U tokens | unused ... ]     held-out set: [ validation: val_tokens | ... ]

The pool is cut into n = floor(U / L) sequences of L tokens (a tail of U mod L tokens is reported, never seen).
Training sample i is sequence perm_e[i mod n] of epoch e = i // n, where perm_e is a permutation seeded by
(seed, e); there are D / L samples, so the last epoch may be partial. Global batch b is samples [b*G, (b+1)*G) and
rank r of W takes the r-th contiguous slice: the same samples train step b at any world size, and the whole resume
state is one integer (samples consumed).

`packing: document` (sparse_dc/data/documents.py) keeps this whole scheme with documents in place of the pool's
L-token cuts: the pool is the first n = floor(U / L) documents after the validation split, each one padded or
truncated sequence with a loss mask; epoch e visits the n documents in the permutation seeded by (seed, e). U and
D count slots (sequences x L, as the paper counts them); the plan also records the real (unpadded) tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from sparse_dc.data.config import DataConfig, micro_batches_per_step
from sparse_dc.data.documents import DocumentPool, document_bounds, first_document_at
from sparse_dc.data.shards import TokenStream, open_stream, open_validation
from sparse_dc.data.sources import DataError


@dataclass(frozen=True)
class BudgetPlan:
    """The exact accounting of a run's tokens (what `sparse-dc data inspect` prints)."""

    corpus_tokens: int
    val_tokens: int
    train_start: int  # stream offset of the unique pool (first document boundary at or after val_tokens)
    unique_tokens: int  # U
    seq_len: int  # L
    unique_sequences: int  # n = floor(U / L)
    unused_tail_tokens: int  # U - n * L
    total_samples: int  # D / L
    total_tokens: int  # D
    epochs: float  # D / (n * L): passes over the sequences actually seen
    min_repeats: int
    max_repeats: int
    seed: int
    val_source: str = "prefix"  # "prefix": the first val_tokens of the stream; "heldout": the prepared held-out set
    val_from: str = ""  # where the validation tokens come from (the held-out set's source)
    packing: str = "stream"  # stream: L-token cuts of the pool; document: one padded document per sequence
    unique_real_tokens: int = 0  # tokens of the pool that training sees, padding excluded (stream: n x L)
    total_real_tokens: int = 0  # D without padding (stream: D)

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n pool sequences: a fresh generator per (seed, epoch), so any
    epoch is reachable without replaying earlier ones."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_plan(corpus_tokens: int, doc_ends: np.ndarray, unique_tokens: int, seq_len: int, seed: int,
              epochs: float | None = None, total_tokens: int | None = None, val_tokens: int = 0,
              held_out: dict | None = None, packing: str = "stream") -> BudgetPlan:
    """Work out the exact plan, or raise DataError naming the impossible number.

    `held_out`: the manifest's `validation` entry when the directory has a held-out set (validation comes from it
    and the pool starts at 0); None carves the validation set off the front of the stream. `packing`: "stream"
    or "document" (the pool is then the first U / L documents; only their count must exist)."""
    if (epochs is None) == (total_tokens is None):
        raise DataError("expected exactly one of epochs and total_tokens")
    if seq_len > unique_tokens:
        raise DataError(f"seq_len={seq_len} is larger than unique_tokens={unique_tokens}: expected L <= U")
    if held_out is not None:
        if val_tokens > held_out["tokens"]:
            raise DataError(f"val_tokens={val_tokens} exceeds the held-out validation set ({held_out['tokens']} "
                            f"tokens of {held_out['description']}): expected data.val_tokens <= {held_out['tokens']}")
        train_start, val_source, val_from = 0, "heldout", held_out["description"]
        if unique_tokens > corpus_tokens and packing == "stream":
            raise DataError(f"unique_tokens={unique_tokens} exceeds the {corpus_tokens}-token training stream "
                            "(validation is the separate held-out set)")
    else:
        if val_tokens > corpus_tokens:
            raise DataError(f"val_tokens={val_tokens} exceeds the corpus ({corpus_tokens} tokens)")
        # The pool starts at the first document boundary at or after the validation cut.
        boundary = int(np.searchsorted(doc_ends, val_tokens, side="left")) if val_tokens else -1
        train_start = (0 if val_tokens == 0 else int(doc_ends[boundary]) if boundary < len(doc_ends)
                       else corpus_tokens)
        val_source, val_from = "prefix", "the first val_tokens of the training stream"
        available = corpus_tokens - train_start
        if unique_tokens > available and packing == "stream":
            raise DataError(f"unique_tokens={unique_tokens} exceeds the {available} tokens left after the "
                            f"{val_tokens}-token validation split (corpus: {corpus_tokens} tokens)")
    n = unique_tokens // seq_len
    if total_tokens is None:
        samples = max(1, round(epochs * n))
    else:
        if total_tokens % seq_len:
            raise DataError(f"total_tokens={total_tokens} is not a multiple of seq_len={seq_len}: expected e.g. "
                            f"{total_tokens // seq_len * seq_len} or {(total_tokens // seq_len + 1) * seq_len}")
        samples = total_tokens // seq_len
    if samples < 1:
        raise DataError(f"total_tokens={total_tokens}: expected at least one sequence of {seq_len} tokens")
    if packing == "document":
        first = first_document_at(doc_ends, train_start)
        if n > len(doc_ends) - first:
            raise DataError(f"unique_tokens={unique_tokens} with document packing needs {n} documents (U / seq_len="
                            f"{seq_len} slots each); {len(doc_ends) - first} are left after the {val_tokens}-token "
                            "validation split")
        lengths = np.minimum(document_bounds(doc_ends)[1][first:first + n], seq_len)
        unique_real = int(lengths.sum())
        full, rest = divmod(samples, n)
        total_real = full * unique_real + int(lengths[epoch_permutation(seed, full, n)[:rest]].sum())
    else:
        unique_real, total_real = n * seq_len, samples * seq_len
    return BudgetPlan(
        corpus_tokens=corpus_tokens, val_tokens=val_tokens, train_start=train_start, unique_tokens=unique_tokens,
        seq_len=seq_len, unique_sequences=n, unused_tail_tokens=unique_tokens - n * seq_len,
        total_samples=samples, total_tokens=samples * seq_len, epochs=samples / n,
        min_repeats=samples // n, max_repeats=math.ceil(samples / n), seed=seed, val_source=val_source,
        val_from=val_from, packing=packing, unique_real_tokens=unique_real, total_real_tokens=total_real,
    )


class TokenBudget:
    """Maps sample indices to token sequences of a prepared directory under one `BudgetPlan`."""

    def __init__(self, stream: TokenStream, plan: BudgetPlan, held_out: TokenStream | None = None):
        """`held_out`: the directory's held-out validation set (required when plan.val_source is "heldout")."""
        if (held_out is not None) != (plan.val_source == "heldout"):
            raise DataError(f"plan.val_source={plan.val_source!r} does not match the held-out set given "
                            f"({'one' if held_out is not None else 'none'})")
        self.stream, self.plan, self.held_out = stream, plan, held_out
        # Two epochs cached: a batch may span an epoch boundary. Each is n int64s, like the permutation it replaces.
        self._epoch_offsets = lru_cache(maxsize=2)(self._make_epoch_offsets)
        self.documents: DocumentPool | None = None  # document packing: the pool's documents
        self.val_documents: DocumentPool | None = None
        if plan.packing == "document":
            pad = stream.eos_id  # any id: padded positions are masked out of the loss
            first = first_document_at(stream.doc_ends, plan.train_start)
            self.documents = DocumentPool(stream, first, plan.unique_sequences, plan.seq_len, pad)
            # validation: the documents that start in the first val_tokens of the held-out set or the stream (the
            # one the cut falls in included; carved off the stream, those are the documents before the pool)
            source = held_out or stream
            count = min(int(np.searchsorted(source.doc_ends, plan.val_tokens, side="left")) + 1,
                        len(source.doc_ends)) if plan.val_tokens else 0
            self.val_documents = DocumentPool(source, 0, count, plan.seq_len, pad)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer_path: str | None = None) -> "TokenBudget":
        stream = open_stream(cfg.dir, cfg.verify, tokenizer_path)
        held_out = open_validation(cfg.dir, stream.manifest, cfg.verify)
        plan = make_plan(stream.total_tokens, stream.doc_ends, cfg.unique_tokens, cfg.seq_len, cfg.seed,
                         cfg.epochs, cfg.total_tokens, cfg.val_tokens, stream.manifest.get("validation"),
                         cfg.packing)
        return cls(stream, plan, held_out)

    @property
    def vocab_size(self) -> int:
        return self.stream.vocab_size

    def _make_epoch_offsets(self, epoch: int) -> np.ndarray:
        """Stream offset of the sequence behind each position of `epoch`: int64 [n], in sample order (document
        packing: the pool document index instead)."""
        offsets = epoch_permutation(self.plan.seed, epoch, self.plan.unique_sequences)
        if self.documents is not None:
            return offsets
        offsets *= self.plan.seq_len
        offsets += self.plan.train_start
        return offsets

    def sample_offsets(self, samples: np.ndarray) -> np.ndarray:
        """Training sample indices -> stream offsets of their sequences (vectorised; samples may span epochs)."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(samples) and (samples.min() < 0 or samples.max() >= self.plan.total_samples):
            raise IndexError(f"sample index outside [0, {self.plan.total_samples})")
        n = self.plan.unique_sequences
        epochs, positions = np.divmod(samples, n)
        if len(samples) and epochs.min() == epochs.max():  # the common case: one epoch
            return self._epoch_offsets(int(epochs[0]))[positions]
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._epoch_offsets(int(epoch))[positions[where]]
        return out

    def sequence_ids(self, samples: np.ndarray) -> np.ndarray:
        """Training sample indices -> pool sequence (document packing: document) indices (vectorised)."""
        if self.documents is not None:
            return self.sample_offsets(samples)
        return (self.sample_offsets(samples) - self.plan.train_start) // self.plan.seq_len

    def read_sequences(self, sequence_ids: np.ndarray) -> np.ndarray:
        """Pool sequences -> int64 tokens [len(ids), L]."""
        L = self.plan.seq_len
        return self.stream.read_many(self.plan.train_start + np.asarray(sequence_ids, dtype=np.int64) * L, L)

    def samples(self, samples: np.ndarray) -> np.ndarray:
        """Training sample indices -> int64 tokens [len(samples), L]."""
        if self.documents is not None:
            return self.documents.read(self.sample_offsets(samples))[0]
        return self.stream.gather(self.sample_offsets(samples), self.plan.seq_len)  # offsets are in the pool

    def sample_range(self, lo: int, hi: int) -> np.ndarray:
        """Tokens of the consecutive samples [lo, hi) -> int64 [hi - lo, L]: the loader's per-batch path.

        Equal to samples(np.arange(lo, hi)), but costs O(epochs spanned) Python-int steps and slices of the cached
        per-epoch offsets instead of per-sample numpy arithmetic and validation (~10 us a batch).
        """
        offsets = self._range_offsets(lo, hi)
        if self.documents is not None:
            return self.documents.read(offsets)[0]
        return self.stream.gather(offsets, self.plan.seq_len)

    def _range_offsets(self, lo: int, hi: int) -> np.ndarray:
        """sample_offsets(np.arange(lo, hi)) by slices of the cached per-epoch offsets."""
        if not 0 <= lo <= hi <= self.plan.total_samples:
            raise IndexError(f"sample range [{lo}, {hi}) outside [0, {self.plan.total_samples})")
        if lo == hi:  # an empty micro-batch of a partial final batch (lo may be past the last epoch's start)
            return np.empty(0, np.int64)
        n, parts = self.plan.unique_sequences, []
        while lo < hi:  # one slice per epoch spanned: nearly always exactly one
            epoch, position = divmod(lo, n)
            take = min(hi - lo, n - position)
            parts.append(self._epoch_offsets(epoch)[position: position + take])
            lo += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def micro_batch(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The samples [lo, hi) as the trainer takes them: {"tokens": LongTensor [hi - lo, L]}, plus
        "loss_mask" (BoolTensor [hi - lo, L], True = real token) with document packing."""
        if self.documents is None:
            return {"tokens": torch.from_numpy(self.sample_range(lo, hi))}
        tokens, mask = self.documents.read(self._range_offsets(lo, hi))
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}

    def batch_targets(self, batch: int, global_batch: int) -> int:
        """Next-token targets the loss counts in global batch `batch` over all ranks (its normaliser; the same at
        any world size): samples x (L - 1), or with document packing the real targets of its documents."""
        lo = batch * global_batch
        hi = min(lo + global_batch, self.plan.total_samples)
        if self.documents is None:
            return (hi - lo) * (self.plan.seq_len - 1)
        return self.documents.targets(self._range_offsets(lo, hi))

    # --- batching -------------------------------------------------------------------------------------------
    def num_batches(self, global_batch: int) -> int:
        return math.ceil(self.plan.total_samples / global_batch)

    def rank_range(self, batch: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
        """[start, stop) sample indices of `rank`'s share of global batch `batch`.

        Ranks take contiguous slices (np.array_split), so the union over ranks is the same global batch at any
        world size; only the final batch of a run may be partial (then shares can differ by one sample).
        """
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by world size {world_size}")
        lo = batch * global_batch
        hi = min(lo + global_batch, self.plan.total_samples)
        if lo >= hi:
            raise IndexError(f"batch {batch} is past the end of the run ({self.num_batches(global_batch)} batches)")
        # np.array_split's arithmetic: the first (size mod world) ranks get one extra sample.
        base, extra = divmod(hi - lo, world_size)
        start = lo + rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def validation_sequences(self) -> int:
        if self.val_documents is not None:
            return len(self.val_documents)
        return self.plan.val_tokens // self.plan.seq_len

    def validation_batch(self, ids: np.ndarray) -> np.ndarray:
        """Validation sequences (in order from offset 0 of the held-out set, else of the stream) -> tokens
        [len(ids), L]."""
        if self.val_documents is not None:
            return self.val_documents.read(ids)[0]
        starts = np.asarray(ids, dtype=np.int64) * self.plan.seq_len
        return (self.held_out or self.stream).read_many(starts, self.plan.seq_len)

    def validation_micro_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Validation sequences `ids` as micro_batch() returns training samples (with "loss_mask" under document
        packing: the validation documents are the ones before the pool, one padded sequence each)."""
        if self.val_documents is None:
            return {"tokens": torch.from_numpy(self.validation_batch(ids))}
        tokens, mask = self.val_documents.read(ids)
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}


class TokenBudgetDataset(torch.utils.data.IterableDataset):
    """One rank's stream of micro-batches, as a torch IterableDataset (use with DataLoader(batch_size=None)).

    Yields dicts {"tokens": LongTensor [micro, L], "batch": b, "micro": k, "micro_batches": n, "samples_end": int,
    "batch_targets": int} (+ "loss_mask" BoolTensor [micro, L] with document packing): global batch b is this rank's
    slice split into n = `micro_batches_per_step` micro-batches of `micro_batch` samples, k = 0 .. n - 1;
    `samples_end` is the number of samples consumed once batch b is complete (the resume state); `batch_targets` the
    loss targets of the whole global batch over all ranks. With
    DataLoader workers, worker w produces every num_workers-th micro-batch and the DataLoader's round-robin restores
    the order.
    """

    def __init__(self, budget: TokenBudget, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, samples_consumed: int = 0):
        super().__init__()
        self.micro_batches_per_step = micro_batches_per_step(global_batch, micro_batch, world_size)
        if samples_consumed % global_batch:
            raise DataError(f"samples_consumed={samples_consumed} is not at a global-batch boundary "
                            f"(global batch {global_batch})")
        self.budget, self.global_batch, self.micro_batch = budget, global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.start_batch = samples_consumed // global_batch

    def micro_ranges(self) -> Iterator[tuple[int, int, int, int]]:
        """(global batch, micro index, first sample, end sample) in order, from the resume point to the end."""
        # Every rank yields the same number of micro-batches per global batch, so collectives stay matched; in a
        # partial final batch some micro-batches are smaller or empty (weight losses by token count).
        steps = self.micro_batches_per_step
        for b in range(self.start_batch, self.budget.num_batches(self.global_batch)):
            start, stop = self.budget.rank_range(b, self.global_batch, self.rank, self.world_size)
            for k in range(steps):
                lo = min(start + k * self.micro_batch, stop)
                yield b, k, lo, min(lo + self.micro_batch, stop)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        total = self.budget.plan.total_samples
        for index, (b, k, lo, hi) in enumerate(self.micro_ranges()):
            if index % workers == worker:
                yield {**self.budget.micro_batch(lo, hi), "batch": b, "micro": k,
                       "micro_batches": self.micro_batches_per_step,
                       "samples_end": min((b + 1) * self.global_batch, total),
                       "batch_targets": self.budget.batch_targets(b, self.global_batch)}
