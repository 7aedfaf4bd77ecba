"""Document packing (`data.packing: document`): one document per training sequence, as the paper's code trains.

A document of the prepared stream (its tokens, EOS last) becomes one sequence of L slots: its first min(len, L)
tokens, then padding; a bool mask marks the real tokens, and the loss counts a next-token target only where the
target token is real (no target crosses into padding or into another document). A longer document is truncated:
its tail is never trained on (the paper's tokenizer call does the same, see docs/fidelity.md).

    sequence:  [ d0 d1 d2 ... d_{n-1} | pad pad ... pad ]      n = min(len(document), L)
    mask:      [ 1  1  1  ...  1      |  0   0  ...  0  ]      targets: positions 1 .. n-1 (n - 1 of them)

The unique pool is a prefix of the seeded document order, as in stream packing, counted in slots: U = (documents)
x L, the paper's count (sequences x 256); the real tokens (what the mask keeps) are recorded beside it.
"""
from __future__ import annotations

import numpy as np

from sparse_dc.data.shards import TokenStream


def document_bounds(doc_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) int64 of every document of a stream, from its end offsets."""
    ends = np.asarray(doc_ends, dtype=np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
    return starts, ends - starts


def first_document_at(doc_ends: np.ndarray, offset: int) -> int:
    """Index of the first document that starts at or after stream `offset` (a document boundary)."""
    return int(np.searchsorted(doc_ends, offset, side="right"))


class DocumentPool:
    """Documents [first, first + count) of a stream, each read as one padded sequence of `seq_len` slots."""

    def __init__(self, stream: TokenStream, first: int, count: int, seq_len: int, pad_id: int):
        starts, lengths = document_bounds(stream.doc_ends)
        if first < 0 or first + count > len(starts):
            raise IndexError(f"documents [{first}, {first + count}) outside the stream's {len(starts)} documents")
        self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
        self.starts = starts[first:first + count]
        self.lengths = np.minimum(lengths[first:first + count], seq_len)  # real tokens of each sequence

    def __len__(self) -> int:
        return len(self.starts)

    def real_tokens(self, ids: np.ndarray | None = None) -> int:
        """Real (unpadded) tokens of documents `ids` (all of them when None)."""
        return int(self.lengths.sum() if ids is None else self.lengths[np.asarray(ids, np.int64)].sum())

    def targets(self, ids: np.ndarray) -> int:
        """Next-token targets the loss counts over documents `ids`: len - 1 per sequence."""
        return int(np.maximum(self.lengths[np.asarray(ids, np.int64)] - 1, 0).sum())

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Documents `ids` -> (tokens int64 [n, L], padded with pad_id; mask bool [n, L], True = real token)."""
        ids = np.asarray(ids, dtype=np.int64)
        tokens = np.full((len(ids), self.seq_len), self.pad_id, dtype=np.int64)
        lengths = self.lengths[ids]
        for row, (start, length) in enumerate(zip(self.starts[ids].tolist(), lengths.tolist())):
            self.stream.read(start, tokens[row, :length])
        mask = np.arange(self.seq_len)[None, :] < lengths[:, None]
        return tokens, mask
