"""`sparse-dc export --checkpoint DIR --out HF_DIR`: a ZeRO checkpoint -> a Hugging Face Llama folder.

Consolidates the ZeRO shards into fp32 weights (DeepSpeed's zero_to_fp32), rebuilds our model from the config the
checkpoint recorded, densifies every SparseLinear (block values scattered into the dense matrix; pruned entries
are zero), renames to `transformers.LlamaForCausalLM`'s keys and writes `model.safetensors` + `config.json`, so
`LlamaForCausalLM.from_pretrained(HF_DIR)` (transformers: the optional `hf` extra) and lm-eval can load it.
The run's SentencePiece tokenizer (from the prepared data directory the checkpoint's config names, checked against
its manifest, or `--tokenizer FILE`) goes in as `tokenizer.model` + `tokenizer_config.json`, so
`AutoTokenizer.from_pretrained(HF_DIR)` yields a LlamaTokenizer encoding as training did. config.json also names the
run and step it came from (`sparse_dc_run`), so `sparse-dc eval` joins an export's scores to the run's ledger row.

RoPE convention: our attention rotates interleaved (even, odd) pairs (Meta's reference code); HF's Llama rotates
the two halves of each head. The q and k rows are permuted per head as in transformers'
convert_llama_weights_to_hf.py, which leaves q·k unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from typing import Any

import torch

from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError

log = logging.getLogger(__name__)
RUN_RECORD = "sparse_dc_run"  # config.json key naming the run an export came from (its scores join that ledger row)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A run folder, its checkpoints/ folder or one step_* tag -> (checkpoints folder, tag) of a complete one whose
    files match their COMPLETE record (the newest such tag of a folder; a named tag must be intact)."""
    from sparse_dc.train.checkpoint import MARKER, complete_checkpoints, tag_problem

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MARKER)):
        problem = tag_problem(path)
        if problem:
            raise SparseDCError(f"--checkpoint {path} is damaged ({problem}): expected an intact checkpoint")
        return os.path.dirname(path), os.path.basename(path)
    for root in (os.path.join(path, "checkpoints"), path):
        found = complete_checkpoints(root)
        for step, tag in reversed(found):
            problem = tag_problem(os.path.join(root, tag))
            if problem is None:
                return root, tag
            log.warning("checkpoint %s is damaged (%s): trying the one before it", tag, problem)
        if found:
            raise SparseDCError(f"--checkpoint {path}: every complete checkpoint in {root} is damaged: expected an "
                                "intact one (its files matching its COMPLETE record)")
    raise SparseDCError(f"--checkpoint {path}: expected a run folder, its checkpoints/ folder or a step_* folder "
                        "holding a complete checkpoint (one with a COMPLETE marker)")


def run_config(root: str, tag: str) -> RunConfig:
    """The RunConfig the checkpoint was written under."""
    from sparse_dc.train.checkpoint import read_marker

    return RunConfig.from_dict(read_marker(os.path.join(root, tag))["config"])


def run_record(root: str, tag: str) -> dict[str, Any]:
    """Which run and step a checkpoint is, and the ledger its row went to (`name` and `config_hash` find it)."""
    from sparse_dc.train.checkpoint import read_marker

    marker = read_marker(os.path.join(root, tag))
    cfg = RunConfig.from_dict(marker["config"])
    return {"name": cfg.name, "config_hash": cfg.fingerprint(), "ledger": cfg.train.ledger, "step": marker["step"]}


def load_model(root: str, tag: str) -> torch.nn.Module:
    """Our model with the checkpoint's consolidated fp32 weights and topology (CPU, eval mode)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sparse_dc.model import build_model
    from sparse_dc.train.checkpoint import read_marker

    marker = read_marker(os.path.join(root, tag))
    cfg = RunConfig.from_dict(marker["config"])
    model = build_model(cfg.model, cfg.sparsity, marker["vocab_size"])
    state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection [d, d_in]: interleaved pairs per head -> halves per head."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


@torch.no_grad()
def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors under LlamaForCausalLM's names."""
    heads = model.shape.n_heads
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.head.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = block.attn_norm.weight
        out[f"{p}.post_attention_layernorm.weight"] = block.mlp_norm.weight
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            w = _dense(getattr(block.attn, ours))
            out[f"{p}.self_attn.{theirs}.weight"] = _permute_rope(w, heads) if ours in ("q", "k") else w
        for ours in ("gate", "up", "down"):
            out[f"{p}.mlp.{ours}_proj.weight"] = _dense(getattr(block.mlp, ours))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _dense(linear: torch.nn.Module) -> torch.Tensor:
    return linear.dense_weight() if hasattr(linear, "dense_weight") else linear.weight


def hf_config(model: torch.nn.Module) -> dict:
    shape, cfg = model.shape, model.cfg
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size, "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_heads, "num_hidden_layers": shape.n_layers,
            "vocab_size": model.vocab_size, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "initializer_range": cfg.init_std, "torch_dtype": "float32"}


def find_tokenizer(cfg: RunConfig, override: str | None) -> str | None:
    """The tokenizer file to ship: `override`, else the one in the run's prepared data directory (which must match
    its manifest's sha256). None, with a warning, when the data directory is gone and no override was given."""
    from sparse_dc.data.shards import MANIFEST, manifest_tokenizer
    from sparse_dc.data.sources import DataError

    if override is not None:
        if not os.path.isfile(override):
            raise SparseDCError(f"--tokenizer {override}: no such file; expected a SentencePiece .model file")
        return override
    if not os.path.isfile(os.path.join(cfg.data.dir, MANIFEST)):
        log.warning("the run's data directory %s is not here: the export has no tokenizer (pass --tokenizer FILE)",
                    cfg.data.dir)
        return None
    try:
        return manifest_tokenizer(cfg.data.dir)
    except DataError as exc:
        raise SparseDCError(f"{exc}; pass --tokenizer FILE") from None


def write_tokenizer(path: str, out_dir: str, max_seq_len: int) -> dict[str, int]:
    """tokenizer.model + tokenizer_config.json for transformers' LlamaTokenizer. Documents were stored as
    text + EOS with no BOS, so the HF tokenizer adds neither. Returns the special ids for config.json."""
    from sparse_dc.data.tokenizer import processor_from_bytes

    with open(path, "rb") as fh:
        proto = fh.read()
    try:
        sp = processor_from_bytes(proto)
    except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError on a bad proto
        raise SparseDCError(f"--tokenizer {path}: not a SentencePiece model ({exc})") from None
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as fh:
        fh.write(proto)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unk_token_id": sp.unk_id()}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
              "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id")):
        if ids[key] >= 0:
            config[name] = sp.id_to_piece(ids[key])
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return {k: v for k, v in ids.items() if v >= 0 and k != "unk_token_id"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format (8-byte little-endian header size, JSON header of dtype/shape/byte offsets, raw
    little-endian data), written directly so export needs no extra package."""
    header, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            fh.write(blob)


def export(checkpoint: str, out: str, tokenizer: str | None = None) -> str:
    """Write the HF folder `out` (atomically: built next to it, then renamed). Returns `out`."""
    root, tag = resolve_checkpoint(checkpoint)
    tokenizer = find_tokenizer(run_config(root, tag), tokenizer)
    model = load_model(root, tag)
    tmp = f"{out.rstrip('/')}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        config = {**hf_config(model), RUN_RECORD: run_record(root, tag)}
        if tokenizer is not None:
            config.update(write_tokenizer(tokenizer, tmp, model.cfg.max_seq_len))
        write_safetensors(os.path.join(tmp, "model.safetensors"), hf_state_dict(model))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
