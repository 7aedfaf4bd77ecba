"""Property tests of the loader's contract, through what training reads (TokenBudgetDataset micro-batches), against
an oracle that re-reads the prepared corpus straight from its Arrow rows:

- every full epoch visits each pool sequence (document) exactly once, and every sample's tokens are that pool
  sequence's tokens (stream packing: L tokens of the corpus; document packing: the document, truncated or padded,
  with a mask that is True exactly on it);
- validation shares no token position with training: the validation tokens are the corpus's (or the held-out
  set's) first positions, training reads only positions at or after the pool start, which is past them;
- world sizes 1-8 read identical global batches (tokens, masks and loss normalisers).
"""
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_dc.data.config import DataConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset
from sparse_dc.data.shards import read_manifest

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Corpus:
    """The prepared directory read without the loader: documents in stored order and their flat concatenation."""

    def __init__(self, directory, prefix: str = "shards"):
        manifest = read_manifest(str(directory))
        entries = manifest[prefix] if prefix == "shards" else manifest[prefix]["shards"]
        self.docs = []
        for shard in entries:
            table = ipc.open_file(pa.memory_map(str(directory / shard["file"]), "r")).read_all()
            self.docs += [np.asarray(row, dtype=np.int64) for row in table.column(0).to_pylist()]
        self.flat = np.concatenate(self.docs)
        self.ends = np.cumsum([len(d) for d in self.docs])

    def pool_start(self, val_tokens: int) -> int:
        """Where training may start: the end of the document holding token val_tokens - 1 (0 without validation)."""
        return 0 if val_tokens == 0 else int(self.ends[self.ends >= val_tokens][0])


@pytest.fixture(scope="module")
def corpus(prepared):
    return Corpus(prepared)


def make_budget(prepared, **kw) -> TokenBudget:
    return TokenBudget.from_config(DataConfig(dir=str(prepared), verify="size", **kw))


def read_run(b: TokenBudget, global_batch: int, micro: int, world: int) -> dict[int, dict[str, np.ndarray]]:
    """{global batch: its tokens [, mask] over all ranks in rank order, and its loss normaliser} as training reads
    them: one TokenBudgetDataset per rank."""
    parts: dict[int, list] = {}
    for rank in range(world):
        for item in TokenBudgetDataset(b, global_batch, micro, rank, world):
            parts.setdefault(item["batch"], []).append((rank, item["micro"], item))
    out = {}
    for batch, items in parts.items():
        items = [i for _, _, i in sorted(items, key=lambda x: x[:2])]
        out[batch] = {"tokens": torch.cat([i["tokens"] for i in items]).numpy(),
                      "targets": {i["batch_targets"] for i in items}}
        if "loss_mask" in items[0]:
            out[batch]["mask"] = torch.cat([i["loss_mask"] for i in items]).numpy()
    return out


budgets = st.fixed_dictionaries({
    "seq_len": st.sampled_from([16, 48, 64]),
    "sequences": st.integers(20, 90),
    "tail": st.integers(0, 15),
    "epochs": st.sampled_from([1.0, 1.5, 2.25, 3.0]),
    "val_tokens": st.sampled_from([0, 1, 777, 3_000]),
    "seed": st.integers(0, 2 ** 16),
})


@PROPERTY
@given(case=budgets)
def test_stream_samples_are_pool_sequences_and_epochs_are_permutations(prepared, corpus, case):
    L, n = case["seq_len"], case["sequences"]
    b = make_budget(prepared, unique_tokens=n * L + case["tail"], seq_len=L, epochs=case["epochs"],
                    val_tokens=case["val_tokens"], seed=case["seed"])
    start = corpus.pool_start(case["val_tokens"])
    assert (b.plan.train_start, b.plan.unique_sequences) == (start, n)
    pool = corpus.flat[start:start + n * L].reshape(n, L)  # sequence k of the pool: positions start + kL ...
    run = read_run(b, 8, 2, 1)
    tokens = np.concatenate([run[k]["tokens"] for k in sorted(run)])
    assert len(tokens) == b.plan.total_samples == round(case["epochs"] * n)
    ids = b.sequence_ids(np.arange(len(tokens)))
    np.testing.assert_array_equal(tokens, pool[ids])  # what training reads is the pool's sequence, token for token
    for e in range(len(tokens) // n):  # every full epoch is a permutation of the pool
        assert sorted(ids[e * n:(e + 1) * n].tolist()) == list(range(n))
    # validation: the corpus's first positions, all before the pool (no token position in both)
    val_n = b.validation_sequences()
    assert val_n == case["val_tokens"] // L
    val = b.validation_micro_batch(np.arange(val_n))["tokens"].numpy()
    np.testing.assert_array_equal(val.reshape(-1), corpus.flat[:val_n * L])
    assert val_n * L <= case["val_tokens"] <= start or case["val_tokens"] == 0


@PROPERTY
@given(case=budgets)
def test_document_samples_are_pool_documents_with_exact_masks(prepared, corpus, case):
    L, n = case["seq_len"], case["sequences"]
    b = make_budget(prepared, unique_tokens=n * L + case["tail"], seq_len=L, epochs=case["epochs"],
                    val_tokens=case["val_tokens"], seed=case["seed"], packing="document")
    start = corpus.pool_start(case["val_tokens"])
    first = int(np.searchsorted(corpus.ends, start, side="right"))  # the first document starting at `start`
    assert first == 0 or corpus.ends[first - 1] == start
    pool = corpus.docs[first:first + n]
    run = read_run(b, 8, 2, 1)
    tokens = np.concatenate([run[k]["tokens"] for k in sorted(run)])
    mask = np.concatenate([run[k]["mask"] for k in sorted(run)])
    ids = b.sequence_ids(np.arange(len(tokens)))
    for row, doc_id in enumerate(ids.tolist()):
        k = min(len(pool[doc_id]), L)
        np.testing.assert_array_equal(tokens[row, :k], pool[doc_id][:k])
        assert mask[row, :k].all() and not mask[row, k:].any()
    for e in range(len(tokens) // n):
        assert sorted(ids[e * n:(e + 1) * n].tolist()) == list(range(n))
    for batch in run.values():  # the loss normaliser counts the real next-token targets of the global batch
        assert batch["targets"] == {int(batch["mask"][:, 1:].sum())}
    # validation: the documents before the pool, each its own (padded) sequence
    val_n = b.validation_sequences()
    assert val_n == first
    val = b.validation_micro_batch(np.arange(val_n))
    for row in range(val_n):
        k = min(len(corpus.docs[row]), L)
        np.testing.assert_array_equal(val["tokens"][row, :k].numpy(), corpus.docs[row][:k])
        assert int(val["loss_mask"][row].sum()) == k


@PROPERTY
@given(world=st.integers(1, 8), micro=st.sampled_from([1, 2]), steps=st.integers(1, 3),
       packing=st.sampled_from(["stream", "document"]), epochs=st.sampled_from([1.0, 1.7, 2.5]))
def test_world_sizes_1_to_8_read_identical_global_batches(prepared, world, micro, steps, packing, epochs):
    global_batch = world * micro * steps
    b = make_budget(prepared, unique_tokens=60 * 32, seq_len=32, epochs=epochs, val_tokens=1_000, seed=3,
                    packing=packing)
    reference = read_run(b, global_batch, global_batch, 1)  # one rank, one micro-batch per step
    other = read_run(b, global_batch, micro, world)
    assert other.keys() == reference.keys() == set(range(b.num_batches(global_batch)))
    for k, batch in reference.items():
        np.testing.assert_array_equal(other[k]["tokens"], batch["tokens"])
        assert other[k]["targets"] == batch["targets"]
        if packing == "document":
            np.testing.assert_array_equal(other[k]["mask"], batch["mask"])
    assert sum(len(v["tokens"]) for v in other.values()) == b.plan.total_samples  # a partial last batch kept


def test_held_out_validation_shares_no_position_with_training(tmp_path, corpus_jsonl, prepared):
    """With a held-out set (prepare --val-input), validation reads the held-out shards' first positions and the
    pool starts at position 0 of the training stream: the two never read the same file."""
    from sparse_dc.data.prepare import PrepareConfig, prepare

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(f"Held-out paragraph {i}: data repeats, weights thin out. " * (1 + i % 5)
                                    for i in range(40)))
    prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "d"),
                          tokenizer=str(prepared / "tokenizer.model"), shard_tokens=40_000,
                          val_inputs=[str(held_out)], doc_boundary="blankline", val_tokens=1_500))
    training, validation = Corpus(tmp_path / "d"), Corpus(tmp_path / "d", "validation")
    manifest = read_manifest(str(tmp_path / "d"))
    assert not {s["file"] for s in manifest["shards"]} & {s["file"] for s in manifest["validation"]["shards"]}
    b = make_budget(tmp_path / "d", unique_tokens=40 * 32, seq_len=32, epochs=1.0, val_tokens=1_000, seed=5)
    assert b.plan.train_start == 0
    val_n = b.validation_sequences()
    val = b.validation_micro_batch(np.arange(val_n))["tokens"].numpy()
    np.testing.assert_array_equal(val.reshape(-1), validation.flat[:val_n * 32])
    ids = b.sequence_ids(np.arange(b.plan.total_samples))
    np.testing.assert_array_equal(b.micro_batch(0, b.plan.total_samples)["tokens"].numpy(),
                                  training.flat[:40 * 32].reshape(40, 32)[ids])
