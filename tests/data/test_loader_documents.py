"""Document packing (data.packing=document): one document per sequence, truncated or padded to L, a mask that is
True exactly on the document's tokens, exact U and D in slots and in real tokens, world-size invariant batches
and loss normalisers. The oracle is the prepared corpus re-read as a list of documents (the Arrow rows)."""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from sparse_dc.data.config import DataConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset
from sparse_dc.data.shards import read_manifest
from sparse_dc.data.sources import DataError

L = 64


def documents(prepared) -> list[np.ndarray]:
    """Every document of the prepared directory, in the stored (seeded) order, straight from the Arrow rows."""
    docs = []
    for shard in read_manifest(str(prepared))["shards"]:
        table = ipc.open_file(pa.memory_map(str(prepared / shard["file"]), "r")).read_all()
        docs += [np.asarray(row, dtype=np.int64) for row in table.column(0).to_pylist()]
    return docs


def budget(prepared, **kw) -> TokenBudget:
    cfg = dict(dir=str(prepared), unique_tokens=200 * L, seq_len=L, epochs=2.5, val_tokens=3_000, seed=7,
               packing="document")
    cfg.update(kw)
    return TokenBudget.from_config(DataConfig(**cfg))


def test_each_sample_is_one_document_truncated_or_padded_with_a_true_mask(prepared):
    docs, b = documents(prepared), budget(prepared)
    plan = b.plan
    first = int(np.searchsorted(np.cumsum([len(d) for d in docs]), plan.train_start, side="right"))
    pool = docs[first:first + plan.unique_sequences]  # the first U / L documents after the validation split
    assert sum(len(d) for d in docs[:first]) == plan.train_start
    samples = np.arange(plan.total_samples)
    ids = b.sequence_ids(samples)
    batch = b.micro_batch(0, plan.total_samples)
    tokens, mask = batch["tokens"].numpy(), batch["loss_mask"].numpy()
    assert tokens.shape == mask.shape == (plan.total_samples, L) and mask.dtype == bool
    for row, doc_id in enumerate(ids.tolist()):
        doc = pool[doc_id]
        n = min(len(doc), L)
        np.testing.assert_array_equal(tokens[row, :n], doc[:n])
        assert mask[row, :n].all() and not mask[row, n:].any()
    assert any(len(d) > L for d in pool) and any(len(d) < L for d in pool)  # both cases exercised
    np.testing.assert_array_equal(b.samples(samples), tokens)


def test_exact_budgets_in_slots_and_real_tokens(prepared):
    docs, b = documents(prepared), budget(prepared, unique_tokens=200 * L + 17)
    plan = b.plan
    assert (plan.unique_sequences, plan.unused_tail_tokens) == (200, 17)
    assert plan.total_samples == 500 and plan.total_tokens == 500 * L  # D in slots: sequences x L
    counts = collections.Counter(b.sequence_ids(np.arange(plan.total_samples)).tolist())
    assert set(counts) == set(range(200)) and set(counts.values()) == {2, 3}
    ends = np.cumsum([len(d) for d in docs])
    first = int(np.searchsorted(ends, plan.train_start, side="right"))
    real = [min(len(d), L) for d in docs[first:first + 200]]
    assert plan.unique_real_tokens == sum(real)
    assert plan.total_real_tokens == sum(real[i] * c for i, c in counts.items())
    mask = b.micro_batch(0, plan.total_samples)["loss_mask"]
    assert int(mask.sum()) == plan.total_real_tokens
    # a budget needing more documents than are left is refused with the numbers
    with pytest.raises(DataError, match=r"unique_tokens=.* needs \d+ documents .* are left after"):
        budget(prepared, unique_tokens=len(docs) * L)


def test_batches_and_loss_normalisers_are_world_size_invariant(prepared):
    b = budget(prepared)
    for world in (1, 2, 4):
        rows, masks, targets = [], [], set()
        for rank in range(world):
            for mb in TokenBudgetDataset(b, 16, 4 // world if world < 4 else 1, rank, world):
                if mb["batch"] == 3:
                    rows.append(mb["tokens"])
                    masks.append(mb["loss_mask"])
                    targets.add(mb["batch_targets"])
        tokens, mask = np.concatenate(rows), np.concatenate(masks)
        if world == 1:
            reference = (tokens, mask)
        np.testing.assert_array_equal(tokens, reference[0])
        np.testing.assert_array_equal(mask, reference[1])
        # the normaliser: real next-token targets (a target is real when its token is), the whole global batch
        assert targets == {int(mask[:, 1:].sum())}


def test_validation_documents_come_before_the_pool(prepared):
    docs, b = documents(prepared), budget(prepared)
    n = b.validation_sequences()
    assert sum(len(d) for d in docs[:n]) == b.plan.train_start >= b.plan.val_tokens
    val = b.validation_micro_batch(np.arange(n))
    for row in (0, n - 1):
        k = min(len(docs[row]), L)
        np.testing.assert_array_equal(val["tokens"][row, :k].numpy(), docs[row][:k])
        assert int(val["loss_mask"][row].sum()) == k


def test_inspect_reports_both_counts(prepared, capsys):
    from sparse_dc.data.cli import main

    args = ["inspect", str(prepared), "--unique-tokens", str(200 * L), "--seq-len", str(L), "--epochs", "2.5",
            "--val-tokens", "3000", "--seed", "7", "--packing", "document", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    plan = budget(prepared).plan
    assert report["packing"] == "document" and report["unique_tokens"] == 200 * L
    assert (report["unique_real_tokens"], report["total_real_tokens"]) == (plan.unique_real_tokens,
                                                                          plan.total_real_tokens)


def test_held_out_validation_documents_come_from_the_separate_set(tmp_path, corpus_jsonl, prepared):
    """With a held-out validation set (prepare --val-input), document packing validates on its documents that start
    in its first val_tokens tokens, one padded sequence each, and the pool starts at the training stream's first
    document."""
    from sparse_dc.data.prepare import PrepareConfig, prepare

    held_out = tmp_path / "held_out.txt"
    paragraphs = [f"Validation paragraph {i}: " + "sparse weights, dense data, repeated epochs. " * (1 + i % 9)
                  for i in range(60)]
    held_out.write_text("\n\n".join(paragraphs))
    prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "d"),
                          tokenizer=str(prepared / "tokenizer.model"), shard_tokens=40_000, val_inputs=[str(held_out)],
                          doc_boundary="blankline", val_tokens=2_000))
    b = budget(tmp_path / "d", val_tokens=1_000)
    assert (b.plan.val_source, b.plan.train_start) == ("heldout", 0)
    validation = b.held_out
    lengths = np.diff(np.concatenate([[0], validation.doc_ends]))
    n = b.validation_sequences()
    assert sum(lengths[:n - 1]) < 1_000 <= sum(lengths[:n])  # every document starting before the cut
    val = b.validation_micro_batch(np.arange(n))
    first = np.empty(min(int(lengths[0]), L), np.int64)
    validation.read(0, first)
    np.testing.assert_array_equal(val["tokens"][0, :len(first)].numpy(), first)
    assert val["loss_mask"].sum(1).tolist() == np.minimum(lengths[:n], L).tolist()
    assert b.documents.starts[0] == 0  # the pool: the training stream's first documents
