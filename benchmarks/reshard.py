"""Cost of resuming on another world size: converting a ZeRO checkpoint tag to a DeepSpeed universal checkpoint.

    python benchmarks/reshard.py runs/<name>/checkpoints/step_00000120 [more tags ...] --out benchmarks/results/x.json

For each tag: its size on disk, the conversion time (rank 0 only, once per tag; the other ranks wait) and the size
of the universal copy. The universal copy holds one fp32 tensor per parameter and state (weights, exp_avg,
exp_avg_sq), i.e. what a world-size-independent "portable" state would have added to *every* checkpoint; the
design in sparse_dc/train/reshard.py pays it once, on demand. The universal copy is deleted afterwards unless
--keep. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from sparse_dc.config.base import write_text_atomic


def du(path: str) -> int:
    """Bytes of the regular files under `path`."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def measure(tag_dir: str, keep: bool) -> dict:
    from sparse_dc.train.checkpoint import read_marker
    from sparse_dc.train.reshard import convert_to_universal, universal_tag

    ckpt_dir, tag = os.path.split(os.path.abspath(tag_dir))
    out = os.path.join(ckpt_dir, universal_tag(tag))
    if os.path.isdir(out):
        raise SystemExit(f"{out} exists: remove it first, so the conversion is timed")
    marker = read_marker(tag_dir)
    start = time.perf_counter()
    convert_to_universal(ckpt_dir, tag)
    seconds = time.perf_counter() - start
    row = {"tag": tag_dir, "zero_stage": marker.get("zero_stage"), "world_size": marker["world_size"],
           "precision": marker.get("config", {}).get("train", {}).get("precision"),
           "sparsity": {k: (marker.get("config", {}).get("sparsity") or {}).get(k) for k in ("method", "block_size")},
           "tag_mib": du(tag_dir) / 2 ** 20, "universal_mib": du(out) / 2 ** 20,
           "universal_states_mib": du(os.path.join(out, "zero")) / 2 ** 20, "convert_s": seconds}
    if not keep:
        shutil.rmtree(out)
    return row


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tags", nargs="+", help="checkpoint tag folders (checkpoints/step_*) with a COMPLETE marker")
    p.add_argument("--out", help="JSON file for the rows")
    p.add_argument("--keep", action="store_true", help="keep the universal copies")
    args = p.parse_args(argv)
    rows = [measure(tag, args.keep) for tag in args.tags]
    print("| tag | ZeRO | ranks | precision | sparsity | tag MiB | universal MiB (states) | convert s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {os.path.basename(r['tag'])} | {r['zero_stage']} | {r['world_size']} | {r['precision']} | "
              f"{r['sparsity']['method']} B={r['sparsity']['block_size']} | {r['tag_mib']:.2f} | "
              f"{r['universal_mib']:.2f} ({r['universal_states_mib']:.2f}) | {r['convert_s']:.2f} |")
    if args.out:
        write_text_atomic(args.out, json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
