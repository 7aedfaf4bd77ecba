"""The loader's arithmetic at its edges: where the validation cut puts the pool, which budgets are exactly possible
(and the one-line errors for those that are not), the plan's repetition counts, sample and batch index bounds, rank
shares of a partial final batch, and the fields each micro-batch carries. Plans are worked out by hand on small
synthetic document layouts; the loader's reads are checked against the prepared corpus."""
import math
import shutil

import numpy as np
import pytest

from sparse_dc.data.config import DataConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset, epoch_permutation, make_plan
from sparse_dc.data.sources import DataError

# Four documents of 10, 15, 15 and 60 tokens: ends at 10, 25, 40, 100.
ENDS = np.array([10, 25, 40, 100], np.int64)


def plan(unique_tokens=32, seq_len=8, epochs=2.0, total_tokens=None, val_tokens=0, **kw):
    return make_plan(100, ENDS, unique_tokens, seq_len, seed=3, epochs=epochs, total_tokens=total_tokens,
                     val_tokens=val_tokens, **kw)


def test_exactly_one_of_epochs_and_total_tokens():
    for epochs, total in ((None, None), (1.0, 64)):
        with pytest.raises(DataError, match="^expected exactly one of epochs and total_tokens$"):
            plan(epochs=epochs, total_tokens=total)


def test_sequence_length_may_equal_the_pool():
    p = plan(unique_tokens=8, seq_len=8)
    assert (p.unique_sequences, p.unused_tail_tokens, p.total_samples) == (1, 0, 2)
    with pytest.raises(DataError, match=r"^seq_len=9 is larger than unique_tokens=8: expected L <= U$"):
        plan(unique_tokens=8, seq_len=9)


@pytest.mark.parametrize("val_tokens, train_start", [(0, 0), (1, 10), (10, 10), (11, 25), (25, 25), (26, 40)])
def test_the_pool_starts_at_the_first_document_boundary_at_or_after_the_cut(val_tokens, train_start):
    p = plan(unique_tokens=8, seq_len=8, val_tokens=val_tokens)
    assert (p.train_start, p.val_source, p.val_tokens) == (train_start, "prefix", val_tokens)
    assert p.val_from == "the first val_tokens of the training stream"  # as `data inspect` reports it


def test_plan_defaults_no_validation_and_stream_packing():
    p = make_plan(100, ENDS, 32, 8, seed=3, epochs=1.0)
    assert (p.val_tokens, p.train_start, p.val_source, p.packing) == (0, 0, "prefix", "stream")
    assert (p.unique_real_tokens, p.total_real_tokens) == (32, 32)


@pytest.mark.parametrize("val_tokens", [41, 100])
def test_a_cut_in_the_last_document_leaves_no_pool(val_tokens):
    with pytest.raises(DataError, match=rf"^unique_tokens=8 exceeds the 0 tokens left after the {val_tokens}-token "
                                        r"validation split \(corpus: 100 tokens\)$"):
        plan(unique_tokens=8, seq_len=8, val_tokens=val_tokens)


def test_validation_larger_than_the_corpus():
    with pytest.raises(DataError, match=r"^val_tokens=101 exceeds the corpus \(100 tokens\)$"):
        plan(val_tokens=101)


def test_the_pool_may_use_every_token_left_after_validation():
    p = plan(unique_tokens=75, seq_len=8, val_tokens=20)  # pool from 25: 75 tokens left
    assert (p.train_start, p.unique_sequences, p.unused_tail_tokens) == (25, 9, 3)
    with pytest.raises(DataError, match=r"^unique_tokens=76 exceeds the 75 tokens left after the 20-token validation "
                                        r"split \(corpus: 100 tokens\)$"):
        plan(unique_tokens=76, seq_len=8, val_tokens=20)


def test_held_out_validation_bounds():
    held_out = {"tokens": 50, "description": "held.txt"}
    p = plan(unique_tokens=100, val_tokens=50, held_out=held_out)
    assert (p.train_start, p.val_source, p.val_from, p.val_tokens) == (0, "heldout", "held.txt", 50)
    with pytest.raises(DataError, match=r"^val_tokens=51 exceeds the held-out validation set \(50 tokens of "
                                        r"held.txt\): expected data.val_tokens <= 50$"):
        plan(val_tokens=51, held_out=held_out)
    with pytest.raises(DataError, match=r"^unique_tokens=101 exceeds the 100-token training stream \(validation is "
                                        r"the separate held-out set\)$"):
        plan(unique_tokens=101, held_out=held_out)


def test_document_packing_counts_documents_not_stream_tokens():
    """U counts slots (documents x L): four short documents fill 4 x 30 = 120 slots of a 100-token stream."""
    for held_out in (None, {"tokens": 50, "description": "held.txt"}):
        p = plan(unique_tokens=120, seq_len=30, packing="document", held_out=held_out)
        assert (p.unique_sequences, p.unique_real_tokens) == (4, 10 + 15 + 15 + 30)
    p = plan(unique_tokens=90, seq_len=30, val_tokens=5, packing="document")  # the pool: documents 1, 2, 3
    assert (p.train_start, p.unique_real_tokens) == (10, 15 + 15 + 30)
    with pytest.raises(DataError, match=r"^unique_tokens=120 with document packing needs 4 documents \(U / seq_len=30 "
                                        r"slots each\); 3 are left after the 5-token validation split$"):
        plan(unique_tokens=120, seq_len=30, val_tokens=5, packing="document")


def test_document_packing_real_tokens_of_a_partial_last_epoch():
    p = plan(unique_tokens=120, seq_len=30, epochs=None, total_tokens=30 * 6, packing="document")
    real = np.array([10, 15, 15, 30])
    visited = np.random.default_rng([3, 1]).permutation(4)[:2]  # epoch 1, seeded by (seed, epoch), first 2 samples
    assert (p.total_samples, p.min_repeats, p.max_repeats) == (6, 1, 2)
    assert p.total_real_tokens == real.sum() + real[visited].sum()
    assert p.total_tokens == 180 and p.unique_tokens == 120


@pytest.mark.parametrize("epochs, samples, low, high", [(2.5, 10, 2, 3), (2.0, 8, 2, 2), (0.6, 2, 0, 1),
                                                         (0.01, 1, 0, 1), (1.125, 4, 1, 1), (1.375, 6, 1, 2)])
def test_repetition_counts(epochs, samples, low, high):
    p = plan(unique_tokens=33, seq_len=8, epochs=epochs)  # n = 4 sequences
    assert (p.total_samples, p.total_tokens, p.min_repeats, p.max_repeats) == (samples, samples * 8, low, high)
    assert p.epochs == samples / 4 and p.seed == 3 and p.corpus_tokens == 100 and p.seq_len == 8


def test_total_tokens_must_be_whole_sequences():
    assert plan(epochs=None, total_tokens=64).total_samples == 8
    with pytest.raises(DataError, match=r"^total_tokens=1000 is not a multiple of seq_len=64: expected e.g. 960 or "
                                        r"1024$"):
        plan(unique_tokens=64, seq_len=64, epochs=None, total_tokens=1000)
    with pytest.raises(DataError, match=r"^total_tokens=0: expected at least one sequence of 8 tokens$"):
        plan(epochs=None, total_tokens=0)


def test_epoch_order_is_seeded_by_seed_and_epoch():
    """Published runs and resumed ones depend on this exact order: numpy's generator seeded by [seed, epoch]."""
    for seed, epoch in ((0, 0), (7, 3), (1234, 1)):
        np.testing.assert_array_equal(epoch_permutation(seed, epoch, 50),
                                      np.random.default_rng([seed, epoch]).permutation(50))


# --- on the prepared corpus ------------------------------------------------------------------------------------------
def budget(prepared, **kw) -> TokenBudget:
    cfg = dict(dir=str(prepared), unique_tokens=20 * 32 + 5, seq_len=32, epochs=2.5, val_tokens=500, seed=11,
               verify="size")
    cfg.update(kw)
    return TokenBudget.from_config(DataConfig(**cfg))


def test_a_plan_and_the_held_out_set_must_agree(prepared):
    b = budget(prepared)
    with pytest.raises(DataError, match=r"^plan.val_source='prefix' does not match the held-out set given \(one\)$"):
        TokenBudget(b.stream, b.plan, held_out=b.stream)
    heldout_plan = make_plan(b.stream.total_tokens, b.stream.doc_ends, 640, 32, 11, epochs=1.0, val_tokens=10,
                             held_out={"tokens": 100, "description": "x"})
    with pytest.raises(DataError, match=r"^plan.val_source='heldout' does not match the held-out set given \(none\)$"):
        TokenBudget(b.stream, heldout_plan)


def one_by_one(b, samples):
    """Each sample read alone through the range path (one sample never spans epochs)."""
    return np.stack([b.sample_range(s, s + 1)[0] for s in samples])


def test_samples_in_any_order_and_any_epochs(prepared):
    b = budget(prepared)
    n, total = b.plan.unique_sequences, b.plan.total_samples
    for samples in ([n + 1, 0, n + 1], [0, n + 3, 0], [total - 1, 1, 2 * n], [2 * n + 1, 5], [3]):
        np.testing.assert_array_equal(b.samples(np.array(samples)), one_by_one(b, samples))
    for bad in ([-1], [0, total], [total]):
        with pytest.raises(IndexError, match=rf"^sample index outside \[0, {total}\)$"):
            b.samples(np.array(bad))
    assert b.samples(np.array([total - 1, 0])).shape == (2, 32)


def test_sample_ranges_bounds(prepared):
    b = budget(prepared)
    total = b.plan.total_samples
    for lo, hi in ((-1, 2), (5, 4), (0, total + 1)):
        with pytest.raises(IndexError, match=rf"^sample range \[{lo}, {hi}\) outside \[0, {total}\)$"):
            b.sample_range(lo, hi)
    assert b.sample_range(total, total).shape == (0, 32)
    np.testing.assert_array_equal(b.sample_range(total - 3, total), b.samples(np.arange(total - 3, total)))


def test_rank_shares_of_every_batch_are_array_split(prepared):
    b = budget(prepared, epochs=None, total_tokens=32 * 53)  # 53 samples: a partial final batch of 53 - 48 = 5
    assert b.num_batches(16) == 4 == math.ceil(53 / 16) and b.num_batches(53) == 1
    for world in (1, 2, 4, 8):
        for batch in range(4):
            parts = np.array_split(np.arange(batch * 16, min(batch * 16 + 16, 53)), world)
            shares = [b.rank_range(batch, 16, rank, world) for rank in range(world)]
            starts = batch * 16 + np.cumsum([0] + [len(p) for p in parts[:-1]])
            assert shares == [(int(s), int(s) + len(p)) for s, p in zip(starts, parts)]
    with pytest.raises(DataError, match="^global batch 16 is not divisible by world size 3$"):
        b.rank_range(0, 16, 0, 3)
    with pytest.raises(IndexError, match=r"^batch 4 is past the end of the run \(4 batches\)$"):
        b.rank_range(4, 16, 0, 2)
    whole = budget(prepared, epochs=None, total_tokens=32 * 48)  # three full batches: batch 3 starts at the end
    assert whole.num_batches(16) == 3 and whole.rank_range(2, 16, 1, 2) == (40, 48)
    with pytest.raises(IndexError, match=r"^batch 3 is past the end of the run \(3 batches\)$"):
        whole.rank_range(3, 16, 0, 1)


def test_stream_loss_normaliser_counts_every_next_token_target(prepared):
    b = budget(prepared, epochs=None, total_tokens=32 * 53)
    assert [b.batch_targets(k, 16) for k in range(4)] == [16 * 31, 16 * 31, 16 * 31, 5 * 31]


def test_micro_batch_fields_in_a_partial_final_batch(prepared):
    """The last global batch (5 of 16 samples) over 2 ranks x 2 micro-batches of 4: every rank still yields two
    micro-batches per step (rank 1's second one empty), each telling the trainer where the run stands."""
    b = budget(prepared, epochs=None, total_tokens=32 * 53)
    seen = {}
    for rank in range(2):
        for item in TokenBudgetDataset(b, 16, 4, rank, 2, samples_consumed=32):
            seen[(rank, item["batch"], item["micro"])] = item
    assert sorted(seen) == [(r, k, m) for r in range(2) for k in (2, 3) for m in (0, 1)]
    for (rank, batch, micro), item in seen.items():
        assert item["micro_batches"] == 2 and item["batch_targets"] == b.batch_targets(batch, 16)
        assert item["samples_end"] == (48 if batch == 2 else 53)
        assert "loss_mask" not in item
    rows = {key: len(item["tokens"]) for key, item in seen.items() if key[1] == 3}
    assert rows == {(0, 3, 0): 3, (0, 3, 1): 0, (1, 3, 0): 2, (1, 3, 1): 0}
    np.testing.assert_array_equal(seen[(1, 3, 0)]["tokens"].numpy(), b.samples(np.array([51, 52])))
    assert seen[(0, 3, 1)]["tokens"].shape == (0, 32)


def test_document_validation_cut_exactly_at_a_document_end(prepared):
    """A validation cut that falls on a document end keeps exactly the documents before it."""
    b = budget(prepared)
    ends = b.stream.doc_ends
    for k in (1, 5):
        d = budget(prepared, val_tokens=int(ends[k - 1]), packing="document")
        assert d.validation_sequences() == k == len(d.val_documents)
        assert d.plan.train_start == int(ends[k - 1]) and d.documents.starts[0] == int(ends[k - 1])
    assert budget(prepared, val_tokens=0, packing="document").validation_sequences() == 0
    assert budget(prepared, val_tokens=int(ends[4]) + 1, packing="document").validation_sequences() == 6


def test_index_arrays_of_any_integer_dtype(prepared):
    """Indices given as small unsigned arrays read the same sequences as int64 ones (their offsets exceed uint8)."""
    b = budget(prepared)
    n = b.plan.unique_sequences
    for samples in ([n + 1, 0], [3, 4, 5], [2 * n + 2, n + 3, 1]):
        np.testing.assert_array_equal(b.samples(np.array(samples, np.uint8)), one_by_one(b, samples))
    ids = np.arange(10)
    np.testing.assert_array_equal(b.read_sequences(ids.astype(np.uint8)), b.read_sequences(ids))
    np.testing.assert_array_equal(b.validation_batch(ids.astype(np.uint8)), b.validation_batch(ids))
    np.testing.assert_array_equal(b.validation_batch(ids), b.stream.read(0, np.empty(320, np.int64)).reshape(10, 32))


def test_document_packing_reads_the_same_documents_through_every_path(prepared):
    b = budget(prepared, packing="document")
    total = b.plan.total_samples
    tokens = b.micro_batch(0, total)["tokens"].numpy()
    np.testing.assert_array_equal(b.sample_range(0, total), tokens)
    np.testing.assert_array_equal(b.sample_range(3, 9), tokens[3:9])
    np.testing.assert_array_equal(b.samples(np.arange(total)), tokens)
    val_n = b.validation_sequences()
    np.testing.assert_array_equal(b.validation_batch(np.arange(val_n)),
                                  b.validation_micro_batch(np.arange(val_n))["tokens"].numpy())
    first = b.validation_batch(np.array([0]))[0]
    k = int(min(b.stream.doc_ends[0], 32))
    np.testing.assert_array_equal(first[:k], b.stream.read(0, np.empty(k, np.int64)))
    assert ((first[k:] >= 0) & (first[k:] < b.vocab_size)).all()  # padding: any id the embedding holds


def test_a_dataset_by_default_is_the_whole_run_on_one_rank(prepared):
    b = budget(prepared, epochs=None, total_tokens=32 * 53)
    items = list(TokenBudgetDataset(b, 16, 8))
    assert [(i["batch"], i["micro"]) for i in items] == [(k, m) for k in range(4) for m in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([i["tokens"].numpy() for i in items]), b.sample_range(0, 53))


def test_from_config_checks_the_shards_and_the_tokenizer(prepared, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    shard = copy / "shard_00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum sees it
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fails its sha256 check"):
        budget(copy, verify="checksum")
    assert budget(copy, verify="size").plan.train_start == budget(prepared).plan.train_start
    cfg = DataConfig(dir=str(prepared), unique_tokens=640, seq_len=32, epochs=1.0, val_tokens=0, verify="size")
    assert TokenBudget.from_config(cfg, str(prepared / "tokenizer.model")).vocab_size == 512
    other = tmp_path / "other.model"
    other.write_bytes((prepared / "tokenizer.model").read_bytes() + b"x")
    with pytest.raises(DataError, match="is not the one"):
        TokenBudget.from_config(cfg, str(other))


def test_from_config_checks_the_held_out_shards_as_asked(prepared, corpus_jsonl, tmp_path):
    from sparse_dc.data.prepare import PrepareConfig, prepare

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(f"Held-out paragraph {i}: repeated data, sparse weights." for i in range(40)))
    manifest = prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "d"),
                                     tokenizer=str(prepared / "tokenizer.model"), shard_tokens=40_000,
                                     val_inputs=[str(held_out)], doc_boundary="blankline", val_tokens=600))
    shard = tmp_path / "d" / manifest["validation"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum sees it
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"shard '{shard}' fails its sha256 check"):
        budget(tmp_path / "d", val_tokens=320, verify="checksum")
    assert budget(tmp_path / "d", val_tokens=320, verify="size").plan.val_source == "heldout"
