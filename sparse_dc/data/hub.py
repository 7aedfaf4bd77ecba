"""Read a corpus as a `datasets` stream (`prepare --hf-dataset`): a Hugging Face hub dataset, a packaged builder
over local files (`json`, `parquet`, `text`, `csv`, `arrow` with --hf-data-files), or a local dataset folder.

Nothing is downloaded up front: `load_dataset_builder(...).as_streaming_dataset(split)` (what
`load_dataset(..., streaming=True)` does) reads records as they are consumed, so a prepare that stops at its token
budget reads only what it needs.

Order. Records come in the stream's own order: data files in the builder's (sorted) order, rows in file order.
With `shuffle_buffer` > 0 the stream is `IterableDataset.shuffle(seed, buffer_size)`: the file order is permuted and
records are drawn from a buffer, both from `seed`. Either way the order depends only on (files, seed, buffer), never
on where reading stops, so a smaller budget reads a prefix of what a larger one reads (nested unique budgets).

Reproducibility. A hub dataset is pinned to the commit its revision resolves to (recorded in the manifest with the
resolved data files); rerunning with `--hf-revision <that commit>` reads the same records. If the dataset changes
on the hub, a new prepare of the same name reads a new commit (the manifest says which), and its shards' sha256
differ: runs prepared before and after are then not on the same tokens, even at equal budgets.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from sparse_dc.data.sources import DataError

READ_BATCH = 256  # records per read from the stream (the most a prepare reads past its budget, plus one chunk)
LOCAL_HINT = ("download the files and stream them locally (--hf-dataset json --hf-data-files 'c4/en/*.json.gz', "
              "or a parquet folder), or use --input PATH")


@dataclass(frozen=True)
class StreamSpec:
    """Which records to stream: `datasets.load_dataset(dataset, config, data_files=..., revision=...,
    split=split, streaming=True)`, optionally shuffled through a seeded buffer."""

    dataset: str
    config: str | None
    split: str
    data_files: tuple[str, ...]  # glob patterns, each "GLOB" (the split `split`) or "SPLIT=GLOB"
    revision: str | None
    text_field: str
    shuffle_buffer: int = 0
    seed: int = 0

    @property
    def is_hub(self) -> bool:
        """A hub repository (not a packaged builder such as json/parquet, not a local folder)."""
        import datasets.packaged_modules

        return self.dataset not in datasets.packaged_modules._PACKAGED_DATASETS_MODULES \
            and not os.path.exists(self.dataset)

    def data_files_arg(self) -> dict[str, list[str]] | None:
        """--hf-data-files as `load_dataset`'s data_files: {split: [patterns]}; unprefixed patterns go to `split`."""
        if not self.data_files:
            return None
        out: dict[str, list[str]] = {}
        for pattern in self.data_files:
            split, sep, glob = pattern.partition("=")
            if not sep or "/" in split or "*" in split:  # "a=b" with a path or glob before "=" is a file name
                split, glob = self.split, pattern
            out.setdefault(split, []).append(glob)
        return out


class DocumentStream:
    """The non-empty text records of one split, in stream order, numbered from 0; `skip` resumes after record n.

    Counts `records_read` (records pulled from the stream, in READ_BATCH steps) and `records_skipped` (records whose
    text field is empty, missing or not a string: not documents).
    """

    def __init__(self, spec: StreamSpec, skip: int = 0):
        self.spec, self.skip = spec, skip
        self.records_read = self.records_skipped = 0
        self.revision = resolve_revision(spec) if spec.is_hub else None
        self.builder = _builder(spec, self.revision)
        self.dataset = _split_stream(self.builder, spec)

    def documents(self) -> Iterator[tuple[int, str]]:
        """(record index, text) of each document, in order."""
        dataset = self.dataset.skip(self.skip) if self.skip else self.dataset
        index = self.skip
        field = self.spec.text_field
        batches = dataset.iter(batch_size=READ_BATCH)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (ValueError, KeyError) as exc:  # a corrupt or inconsistent file (pyarrow's errors are ValueErrors)
                raise DataError(f"{self.where()}: cannot read record {index}: {_first_line(exc)}") from None
            if field not in batch:
                raise DataError(f"{self.where()}: no field {self.spec.text_field!r}; fields are {sorted(batch)} "
                                "(choose one with --text-field)")
            texts = batch[field]
            self.records_read += len(texts)
            for text in texts:
                if isinstance(text, str) and text.strip():
                    yield index, text
                else:
                    self.records_skipped += 1
                index += 1

    def where(self) -> str:
        config = f" ({self.spec.config})" if self.spec.config else ""
        return f"--hf-dataset {self.spec.dataset}{config} split {self.spec.split!r}"

    def describe(self) -> dict:
        """What the manifest records about this stream (enough to read the same records again)."""
        files = (self.builder.config.data_files or {}).get(self.spec.split, [])
        return {
            "dataset": self.spec.dataset, "config": self.builder.config.name, "split": self.spec.split,
            "data_files": list(self.spec.data_files) or None,
            "revision": self.revision, "revision_requested": self.spec.revision,
            "resolved_files": [str(f) for f in files],
            "text_field": self.spec.text_field,
            "order": (f"shuffle buffer {self.spec.shuffle_buffer}, seed {self.spec.seed}" if self.spec.shuffle_buffer
                      else "stream order"),
            "records_read": self.skip + self.records_read, "records_skipped": self.records_skipped,
            "datasets_version": _datasets_version(),
        }


def resolve_revision(spec: StreamSpec) -> str:
    """The commit a hub dataset's revision (default: main) points to now; one line if the hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(spec.dataset, revision=spec.revision).sha
    except GatedRepoError:
        raise DataError(f"--hf-dataset {spec.dataset}: gated on the hub; accept its terms and log in "
                        "(`hf auth login`) first") from None
    except RevisionNotFoundError:
        raise DataError(f"--hf-dataset {spec.dataset}: no revision {spec.revision!r} on the hub "
                        "(expected a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise DataError(f"--hf-dataset {spec.dataset}: no such dataset on the hub (or it is private: "
                        "log in with `hf auth login`)") from None
    except Exception as exc:
        if _is_connection_error(exc):
            raise DataError(f"cannot reach the Hugging Face hub for --hf-dataset {spec.dataset} "
                            f"({type(exc).__name__}): {LOCAL_HINT}") from None
        raise


def _is_connection_error(exc: BaseException) -> bool:
    """Offline mode, DNS failure, refused or timed-out connections: OSErrors (requests' errors included) or the
    transport errors of huggingface_hub's HTTP client (httpx / httpx2: ConnectError, ReadTimeout, ...)."""
    if isinstance(exc, OSError):
        return True
    return any(cls.__name__ == "TransportError" and cls.__module__.startswith("httpx") for cls in type(exc).__mro__)


def _builder(spec: StreamSpec, revision: str | None):
    import datasets

    patterns = spec.data_files_arg()
    if patterns is None and spec.dataset in datasets.packaged_modules._PACKAGED_DATASETS_MODULES:
        raise DataError(f"--hf-dataset {spec.dataset} reads local files: expected --hf-data-files GLOB...")
    try:
        builder = datasets.load_dataset_builder(spec.dataset, spec.config, data_files=patterns, revision=revision)
    except Exception as exc:
        if _is_connection_error(exc) and spec.is_hub:
            raise DataError(f"cannot reach the Hugging Face hub for --hf-dataset {spec.dataset} "
                            f"({type(exc).__name__}): {LOCAL_HINT}") from None
        if isinstance(exc, (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError)):
            raise DataError(f"--hf-dataset {spec.dataset}: {_first_line(exc)}") from None
        raise
    for split, globs in (patterns or {}).items():
        if not (builder.config.data_files or {}).get(split):
            raise DataError(f"--hf-data-files {' '.join(globs)}: no file matches (split {split!r})")
    return builder


def _split_stream(builder, spec: StreamSpec):
    try:
        dataset = builder.as_streaming_dataset(split=spec.split)
    except (ValueError, KeyError, StopIteration) as exc:  # "Bad split: test. Available splits: [...]"
        raise DataError(f"--hf-dataset {spec.dataset}: split {spec.split!r}: {_first_line(exc)}") from None
    features = dataset.features
    if features is not None and not features:
        raise DataError(f"--hf-dataset {spec.dataset} split {spec.split!r} holds no records")
    if features is not None:
        if spec.text_field not in features:
            raise DataError(f"--hf-dataset {spec.dataset} split {spec.split!r}: no field {spec.text_field!r}; "
                            f"fields are {sorted(features)} (choose one with --text-field)")
        dataset = dataset.select_columns([spec.text_field])  # the other columns are never decoded (4x faster)
    if spec.shuffle_buffer:
        dataset = dataset.shuffle(seed=spec.seed, buffer_size=spec.shuffle_buffer)
    return dataset


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _datasets_version() -> str:
    import datasets

    return datasets.__version__
