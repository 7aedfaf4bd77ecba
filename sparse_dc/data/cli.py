"""`sparse-dc data prepare ...` and `sparse-dc data inspect ...`."""
from __future__ import annotations

import argparse
import json
import logging

from sparse_dc.config.base import parse_quantity


def _quantity(text: str) -> int:
    value = parse_quantity(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-dc data", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="tokenize documents into Arrow shards + manifest.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", dest="inputs", metavar="PATH",
                     help="text/.md, .jsonl, .parquet files, folders of them, or saved HF datasets directories")
    src.add_argument("--builtin", action="store_true",
                     help="the built-in corpus: Python standard-library docstrings + language reference")
    src.add_argument("--hf-dataset", metavar="NAME",
                     help="stream a dataset through datasets.load_dataset(..., streaming=True): a hub name "
                          "(allenai/c4), json/parquet/text with --hf-data-files, or a local dataset folder")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or HF column with the text")
    p.add_argument("--doc-boundary", default="file", choices=["file", "blankline", "line"],
                   help="how plain-text files split into documents")
    p.add_argument("--split", default="train", help="split of a saved HF DatasetDict")
    p.add_argument("--tokenizer", metavar="MODEL", help="use this SentencePiece model instead of training one")
    p.add_argument("--vocab-size", type=_quantity, default=8192)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--workers", type=int, default=None, help="threads for training and encoding")
    p.add_argument("--shard-tokens", type=_quantity, default=100_000_000)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--seed", type=int, default=0, help="seeds the document order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    hf = p.add_argument_group("streaming (--hf-dataset)")
    hf.add_argument("--hf-config", metavar="CONFIG", help="the dataset's configuration (C4: en)")
    hf.add_argument("--hf-split", default="train", help="split streamed for training")
    hf.add_argument("--hf-data-files", nargs="+", metavar="GLOB",
                    help="data-file patterns, each GLOB (the --hf-split split) or SPLIT=GLOB")
    hf.add_argument("--hf-revision", metavar="REV", help="hub branch, tag or commit (the manifest records the commit)")
    hf.add_argument("--max-tokens", type=_quantity, help="write exactly this many training tokens, then stop reading")
    hf.add_argument("--shuffle-buffer", type=_quantity, default=0,
                    help="0: the stream's order; N: files and records shuffled through a seeded N-record buffer")
    hf.add_argument("--tokenizer-docs", type=_quantity, default=100_000,
                    help="without --tokenizer: train it on the stream's first this-many documents")
    val = p.add_argument_group("held-out validation set (used by training instead of a prefix of the corpus)")
    val.add_argument("--val-input", nargs="+", dest="val_inputs", metavar="PATH",
                     help="files/folders of the validation set (not the training inputs)")
    val.add_argument("--val-split", metavar="SPLIT",
                     help="read the validation set from this split of the stream (or of saved HF DatasetDicts)")
    val.add_argument("--val-tokens", type=_quantity, help="tokens of the validation set (its first ones)")

    i = sub.add_parser("inspect", help="print the token plan a run with this budget would see")
    i.add_argument("dir")
    i.add_argument("--unique-tokens", type=_quantity, required=True)
    i.add_argument("--seq-len", type=int, default=256)
    budget = i.add_mutually_exclusive_group(required=True)
    budget.add_argument("--epochs", type=float)
    budget.add_argument("--total-tokens", type=_quantity)
    i.add_argument("--val-tokens", type=_quantity, default=32_768)
    i.add_argument("--packing", default="stream", choices=["stream", "document"],
                   help="document: one padded document per sequence (the paper recipe)")
    i.add_argument("--seed", type=int, default=1234)
    i.add_argument("--verify", default="checksum", choices=["checksum", "size"])
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _prepare(args) if args.action == "prepare" else _inspect(args)


def _prepare(args: argparse.Namespace) -> int:
    from sparse_dc.data.prepare import PrepareConfig, prepare

    fields = {k: v for k, v in vars(args).items() if k != "action" and v is not None}
    cfg = PrepareConfig.from_dict({**fields, "inputs": args.inputs or []})
    if cfg.hf_dataset is not None:
        from sparse_dc.data.stream_prepare import prepare_stream

        manifest = prepare_stream(cfg)
    else:
        manifest = prepare(cfg)
    print(f"wrote {cfg.out}: {manifest['total_documents']} documents, {manifest['total_tokens']} tokens in "
          f"{len(manifest['shards'])} shard(s), {manifest['dtype']}, vocab {manifest['tokenizer']['vocab_size']} "
          f"({manifest['seconds']} s)")
    if manifest.get("skipped_rows"):  # rows of file inputs without text (a stream reports its own)
        from collections import Counter

        from sparse_dc.data.prepare import describe_skipped

        print(f"skipped {describe_skipped(Counter(manifest['skipped_rows']))} (no text to tokenize)")
    if "validation" in manifest:
        held_out = manifest["validation"]
        print(f"held-out validation set: {held_out['tokens']} tokens, {held_out['documents']} documents from "
              f"{held_out['description']}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from sparse_dc.data.config import DataConfig
    from sparse_dc.data.loader import TokenBudget

    cfg = DataConfig(dir=args.dir, unique_tokens=args.unique_tokens, seq_len=args.seq_len, epochs=args.epochs,
                     total_tokens=args.total_tokens, val_tokens=args.val_tokens, seed=args.seed, verify=args.verify,
                     packing=args.packing)
    cfg.validate("data")
    budget = TokenBudget.from_config(cfg)
    manifest = budget.stream.manifest
    shard_tokens = [s["tokens"] for s in manifest["shards"]]
    report = {
        **budget.plan.to_dict(),
        "validation_sequences": budget.validation_sequences(),
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "dtype": manifest["dtype"],
        "documents": manifest["total_documents"],
        "shards": {"count": len(shard_tokens), "min_tokens": min(shard_tokens), "max_tokens": max(shard_tokens)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        text = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        print(f"{key:>22}  {text}")
    return 0
