"""The TokenBudget loader's guarantees: exact budgets, repetition counts, nesting, held-out validation,
world-size invariance and single-integer resume."""
import collections

import numpy as np
import pytest
import torch

from sparse_dc.data.config import DataConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset
from sparse_dc.data.shards import open_stream
from sparse_dc.data.sources import DataError


def budget(prepared, **kw):
    cfg = dict(dir=str(prepared), unique_tokens=10_000, seq_len=64, epochs=2.5, total_tokens=None,
               val_tokens=3_000, seed=7)
    cfg.update(kw)
    return TokenBudget.from_config(DataConfig(**cfg))


def all_samples(b):
    return b.samples(np.arange(b.plan.total_samples))


def test_exact_token_accounting(prepared):
    b = budget(prepared)
    plan = b.plan
    assert plan.unique_sequences == 10_000 // 64 and plan.unused_tail_tokens == 10_000 % 64
    assert plan.total_samples == round(2.5 * plan.unique_sequences)
    assert all_samples(b).size == plan.total_tokens == plan.total_samples * 64
    d = budget(prepared, epochs=None, total_tokens=64 * 400)
    assert d.plan.total_samples == 400 and all_samples(d).size == 64 * 400
    # The tokens training reads in the first epoch are exactly the pool's first n*L tokens, in some order.
    n = plan.unique_sequences
    pool = b.stream.read(plan.train_start, np.empty(n * 64, np.int64)).reshape(n, 64)
    first_epoch = b.micro_batch(0, n)["tokens"].numpy()
    np.testing.assert_array_equal(first_epoch, pool[b.sequence_ids(np.arange(n))])
    np.testing.assert_array_equal(b.read_sequences(np.arange(n)), pool)


def test_each_sequence_repeats_floor_or_ceil_of_R(prepared):
    b = budget(prepared, epochs=2.5)
    counts = collections.Counter(b.sequence_ids(np.arange(b.plan.total_samples)).tolist())
    assert set(counts) == set(range(b.plan.unique_sequences))
    assert set(counts.values()) == {2, 3}
    assert (b.plan.min_repeats, b.plan.max_repeats) == (2, 3)
    # each full epoch is a permutation; epochs differ in order
    n = b.plan.unique_sequences
    e0, e1 = b.sequence_ids(np.arange(n)), b.sequence_ids(np.arange(n, 2 * n))
    assert sorted(e0) == sorted(e1) == list(range(n)) and not np.array_equal(e0, e1)


def test_smaller_budget_is_a_prefix(prepared):
    small, large = budget(prepared, unique_tokens=4_096), budget(prepared, unique_tokens=12_800)
    n = small.plan.unique_sequences
    np.testing.assert_array_equal(small.read_sequences(np.arange(n)), large.read_sequences(np.arange(n)))
    assert small.plan.train_start == large.plan.train_start


def test_validation_is_disjoint_and_cut_at_a_document_boundary(prepared):
    b = budget(prepared)
    stream = b.stream
    assert b.plan.train_start >= b.plan.val_tokens
    assert b.plan.train_start in set(stream.doc_ends.tolist())  # no document is split between the two sets
    val = b.validation_batch(np.arange(b.validation_sequences()))
    assert val.size == b.validation_sequences() * 64 <= b.plan.val_tokens
    # validation is the stream's first positions, every one before the pool's first
    np.testing.assert_array_equal(val.reshape(-1), stream.read(0, np.empty(val.size, np.int64)))
    # the pool never reads below train_start
    first = b.read_sequences(np.array([0]))
    expect = np.empty(64, np.int64)
    np.testing.assert_array_equal(first[0], stream.read(b.plan.train_start, expect))


def stream_tokens(b, global_batch, micro, world, samples_consumed=0):
    """{global batch: tokens of all ranks in rank order} for a world size."""
    out = collections.defaultdict(list)
    for rank in range(world):
        ds = TokenBudgetDataset(b, global_batch, micro, rank, world, samples_consumed)
        for item in ds:
            out[item["batch"]].append((rank, item["micro"], item["tokens"]))
    return {k: torch.cat([t for _, _, t in sorted(v, key=lambda x: x[:2])]) for k, v in out.items()}


def test_global_batches_identical_at_world_sizes_1_2_4(prepared):
    b = budget(prepared, epochs=1.3)
    ref = stream_tokens(b, 16, 2, 1)
    assert len(ref) == b.num_batches(16)
    for world in (2, 4):
        other = stream_tokens(b, 16, 2, world)
        assert ref.keys() == other.keys()
        for k in ref:
            assert torch.equal(ref[k], other[k])
    assert sum(t.shape[0] for t in ref.values()) == b.plan.total_samples  # partial last batch kept


def test_resume_from_samples_consumed_reproduces_the_stream(prepared):
    b = budget(prepared, epochs=1.7)
    full = stream_tokens(b, 16, 4, 2)
    resume_at = 9 * 16  # mid-epoch: one epoch is ~156 samples
    assert resume_at % b.plan.unique_sequences != 0
    resumed = stream_tokens(b, 16, 4, 2, samples_consumed=resume_at)
    assert min(resumed) == 9 and resumed.keys() == {k for k in full if k >= 9}
    for k in resumed:
        assert torch.equal(full[k], resumed[k])
    with pytest.raises(DataError, match="not at a global-batch boundary"):
        TokenBudgetDataset(b, 16, 4, 0, 2, samples_consumed=5)


def test_dataloader_workers_keep_order(prepared):
    b = budget(prepared, epochs=1.0)
    ds = TokenBudgetDataset(b, 8, 2, 0, 1)
    direct = [item["tokens"] for item in ds]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    via_workers = [item["tokens"] for item in loader]
    assert len(direct) == len(via_workers) and all(torch.equal(x, y) for x, y in zip(direct, via_workers))


def test_impossible_budgets_are_clear_errors(prepared):
    total = open_stream(str(prepared)).total_tokens
    with pytest.raises(DataError, match=r"unique_tokens=\d+ exceeds the \d+ tokens left after the 3000-token"):
        budget(prepared, unique_tokens=total)
    with pytest.raises(DataError, match="not a multiple of seq_len=64"):
        budget(prepared, epochs=None, total_tokens=1000)
    with pytest.raises(DataError, match="seq_len=128 is larger than unique_tokens=100"):
        budget(prepared, unique_tokens=100, seq_len=128)
    with pytest.raises(DataError, match="does not exist"):
        budget(prepared.parent / "nope")


def test_batch_reads_match_token_by_token_reads(prepared):
    """Every batched read path returns exactly the stream's tokens: one vectorised copy inside a record batch,
    per-row slices, rows straddling two record batches, and consecutive-sample batches that span epochs."""
    b = budget(prepared, epochs=2.5)
    stream, L = b.stream, b.plan.seq_len
    boundary = int(stream.starts[1])  # the first record-batch boundary
    inside = np.arange(40) * 7 + 100  # more than SMALL_BATCH_ROWS rows, all in the first record batch
    straddle = np.array([boundary - L // 2, boundary - 1, boundary, 5])
    for starts in (inside, inside[:5], straddle, np.concatenate([inside, straddle])):
        expect = np.stack([stream.read(int(s), np.empty(L, np.int64)) for s in starts])
        np.testing.assert_array_equal(stream.read_many(starts, L), expect)
    n = b.plan.unique_sequences
    for lo, hi in ((0, 0), (5, 6), (n - 3, n + 20), (0, b.plan.total_samples)):
        np.testing.assert_array_equal(b.sample_range(lo, hi), b.samples(np.arange(lo, hi)))
    with pytest.raises(IndexError, match="outside"):
        b.sample_range(0, b.plan.total_samples + 1)
