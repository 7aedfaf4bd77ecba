"""`sparse-dc model`: exact parameter counts and training FLOPs per token of the presets (no model is built).

    sparse-dc model                                  # every preset, dense, vocab 32000
    sparse-dc model --preset 20m --block-size 64 --density 0.25
"""
from __future__ import annotations

import argparse
import json

from sparse_dc.config.base import ConfigError
from sparse_dc.model.build import model_shape, param_counts
from sparse_dc.model.config import PRESETS, ModelConfig
from sparse_dc.model.params import flops_per_token
from sparse_dc.sparsity.config import SparsityConfig


def rows(presets: list[str], vocab: int, block_size: int, density: float, distribution: str,
         seq_len: int) -> list[dict]:
    sparsity = SparsityConfig(density=density, block_size=block_size, distribution=distribution)
    sparsity.validate("sparsity")
    out = []
    for name in presets:
        model = ModelConfig(preset=name, vocab_size=vocab)
        model.validate("model")
        shape = model_shape(model, sparsity)
        counts = param_counts(model, sparsity)
        out.append({"preset": name, "hidden": shape.hidden_size, "ffn": shape.intermediate_size,
                    "ffn_nominal": PRESETS[name].intermediate_size, **counts.as_dict(),
                    "flops_per_token": flops_per_token(counts, shape, seq_len)})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparse-dc model", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset name (repeatable; default: all)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (paper: 32000)")
    parser.add_argument("--block-size", type=int, default=1)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--distribution", default="uniform", choices=["uniform", "erk", "am_ratio"])
    parser.add_argument("--seq-len", type=int, default=256, help="for the attention FLOPs term")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    presets = args.preset or list(PRESETS)
    for name in presets:
        if name not in PRESETS:
            raise ConfigError(f"--preset={name!r}: expected one of {', '.join(PRESETS)}")
    table = rows(presets, args.vocab, args.block_size, args.density, args.distribution, args.seq_len)
    if args.json:
        print("\n".join(json.dumps(r) for r in table))
        return 0
    head = ("preset", "hidden", "ffn", "dense", "active", "law_dense", "law_active", "dense_non_embedding",
            "active_non_embedding", "flops_per_token")
    print("  ".join(f"{h:>20}" if i > 2 else f"{h:>6}" for i, h in enumerate(head)))
    for r in table:
        ffn = f"{r['ffn']}" + ("*" if r["ffn"] != r["ffn_nominal"] else "")
        print("  ".join([f"{r['preset']:>6}", f"{r['hidden']:>6}", f"{ffn:>6}"]
                        + [f"{r[h]:>20,}" for h in head[3:-1]] + [f"{r['flops_per_token']:>20.4e}"]))
    if any(r["ffn"] != r["ffn_nominal"] for r in table):
        print(f"* SwiGLU width rounded up to a multiple of block size {args.block_size}")
    return 0
