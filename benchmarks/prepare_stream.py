"""Prepare throughput: the streaming prepare (`--hf-dataset`, through `datasets`' streaming builders) vs the
file-based prepare (`--input`), on the same documents, with the same tokenizer and threads, in one run.

The corpus is the built-in documents repeated to `--docs` documents (each copy numbered so no two are equal),
written once as JSONL files and once as a parquet folder. Every method writes all of its tokens (the streaming
prepare with --max-tokens = the corpus's token count, found by the file-based run), so all write the same tokens;
the file-based prepare writes them in a seeded permutation (two passes), the streaming one in stream order (one).
Tokenizer training is left out (`--tokenizer` for all): it is the same work either way.

    python benchmarks/prepare_stream.py                  # -> benchmarks/results/prepare_stream.{json,md}
    python benchmarks/prepare_stream.py --docs 20000 --repeats 1   # a quick look
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sparse_dc.config.base import write_text_atomic
from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare
from sparse_dc.data.stream_prepare import prepare_stream

FILES = 4  # the corpus is split into this many JSONL / parquet files


def write_corpus(root: str, n_docs: int) -> tuple[list[str], str]:
    """`n_docs` documents as FILES JSONL files and a parquet folder of FILES files -> (jsonl paths, parquet dir)."""
    base = list(builtin_documents())
    docs = [f"[{i}] {base[i % len(base)]}" for i in range(n_docs)]
    parts = [docs[k * n_docs // FILES:(k + 1) * n_docs // FILES] for k in range(FILES)]
    jsonl = []
    os.makedirs(os.path.join(root, "parquet"))
    for k, part in enumerate(parts):
        path = os.path.join(root, f"part-{k}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in part)
        jsonl.append(path)
        pq.write_table(pa.table({"text": part}), os.path.join(root, "parquet", f"train-{k:05d}-of-{FILES:05d}.parquet"))
    return jsonl, os.path.join(root, "parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60_000, help="documents in the corpus (~100 tokens each)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2, help="encoding threads (all methods)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed interleaved runs per method (after one warm-up round); the median is kept")
    parser.add_argument("--out", default="benchmarks/results/prepare_stream.json")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="prepare_stream_")
    try:
        jsonl, parquet = write_corpus(root, args.docs)
        text_bytes = sum(os.path.getsize(p) for p in jsonl)
        tok = prepare(PrepareConfig(builtin=True, out=os.path.join(root, "tok"), vocab_size=args.vocab_size,
                                    workers=args.workers))
        tokenizer = os.path.join(root, "tok", "tokenizer.model")
        common = dict(tokenizer=tokenizer, workers=args.workers, shard_tokens=100_000_000)
        total_tokens: list[int] = []

        def files(out):
            m = prepare(PrepareConfig(inputs=jsonl, out=out, **common))
            total_tokens.append(m["total_tokens"])
            return m

        def stream(dataset, data_files):
            def run(out):
                return prepare_stream(PrepareConfig(hf_dataset=dataset, hf_data_files=data_files, out=out,
                                                    max_tokens=total_tokens[0], **common))
            return run

        methods = {"file-based (--input *.jsonl)": files,
                   "streaming (--hf-dataset json)": stream("json", [os.path.join(root, "part-*.jsonl")]),
                   "streaming (--hf-dataset <parquet folder>)": stream(parquet, [])}
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}  # this process's CPU seconds, all threads
        # Round 0 is a warm-up (first imports of datasets' builders, torch through datasets), not timed. Then
        # round-robin, so load from other processes falls on all methods alike.
        for r in range(args.repeats + 1):
            for name, fn in methods.items():
                out = os.path.join(root, f"out-{r}")
                start, start_cpu = time.perf_counter(), time.process_time()
                manifest = fn(out)
                if r:
                    seconds[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                assert manifest["total_tokens"] == total_tokens[0], (name, manifest["total_tokens"])
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    tokens = total_tokens[0]
    median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}
    median_cpu = {name: sorted(s)[len(s) // 2] for name, s in cpu.items()}
    reference, reference_cpu = median["file-based (--input *.jsonl)"], median_cpu["file-based (--input *.jsonl)"]
    rows = [{"method": name, "seconds": median[name], "tokens_per_s": tokens / median[name],
             "x_file_based": reference / median[name], "cpu_seconds": median_cpu[name],
             "tokens_per_cpu_s": tokens / median_cpu[name], "x_file_based_cpu": reference_cpu / median_cpu[name],
             "runs": seconds[name], "cpu_runs": cpu[name]} for name in methods]
    result = {
        "benchmark": "prepare_stream", "documents": args.docs, "tokens": tokens, "jsonl_bytes": text_bytes,
        "vocab_size": args.vocab_size, "workers": args.workers, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "versions": _versions(), "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    lines = [f"# prepare throughput: streaming vs file-based ({result['machine']}, {result['cpus']} cores, "
             f"load average {result['load_average'][0]:.1f})", "",
             f"{args.docs} documents, {tokens} tokens ({text_bytes / 1e6:.1f} MB of JSONL), vocab {args.vocab_size}, "
             f"{args.workers} encoding threads; median of {args.repeats} interleaved runs after a warm-up round "
             "(`python benchmarks/prepare_stream.py`). Same tokens written by every method.", "",
             "Wall time counts waiting for the CPU on a shared machine; CPU time (this process, all threads) is the "
             "work itself.", "",
             "| method | wall s | tokens/s (wall) | x file-based | CPU s | tokens per CPU s | x file-based (CPU) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['tokens_per_s'] / 1e6:.2f}M | {r['x_file_based']:.2f}x | "
              f"{r['cpu_seconds']:.2f} | {r['tokens_per_cpu_s'] / 1e6:.2f}M | {r['x_file_based_cpu']:.2f}x |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", table)
    print(table)


def _versions() -> dict:
    import datasets
    import sentencepiece

    return {"datasets": datasets.__version__, "pyarrow": pa.__version__, "sentencepiece": sentencepiece.__version__}


if __name__ == "__main__":
    main()
