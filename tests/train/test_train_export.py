"""`sparse-dc export`: a 2-rank ZeRO-3 block-sparse checkpoint -> safetensors + Llama config.json; with
transformers installed (the `hf` extra), LlamaForCausalLM's logits match our model's."""
import json
import struct

import pytest
import torch

from sparse_dc.cli import main as sparse_dc_main
from sparse_dc.train.export import load_model, resolve_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(zero_run, tmp_path_factory):
    run = zero_run(3, "block")
    out = tmp_path_factory.mktemp("export") / "hf"
    assert sparse_dc_main(["export", "--checkpoint", str(run.dir), "--out", str(out)]) == 0
    return run, out


def read_safetensors(path):
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        data = fh.read()
    header.pop("__metadata__")
    return {name: torch.frombuffer(bytearray(data[h["data_offsets"][0]:h["data_offsets"][1]]),
                                   dtype=torch.float32).reshape(h["shape"]) for name, h in header.items()}


def test_export_writes_dense_llama_weights(exported):
    run, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    tensors = read_safetensors(out / "model.safetensors")
    assert len(tensors) == 3 + 2 * 9  # embed, norm, head + per layer 2 norms and 7 projections
    ours = load_model(*resolve_checkpoint(str(run.dir)))
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], ours.layers[1].mlp.down.dense_weight())
    # HF's rope permutation moves q rows only within a head, so the block pattern survives: nonzeros only in live
    # blocks (a regrown block can still be all zero: zero re-init, and no gradient while its head's v is dead)
    q, mask = tensors["model.layers.0.self_attn.q_proj.weight"], ours.layers[0].attn.q.unit_mask()
    live = q.reshape(2, 32, 2, 32).ne(0).any(3).any(1)
    assert q.shape == (64, 64) and mask.float().mean() == 0.5 and not (live & ~mask).any()


def test_transformers_logits_match(exported):
    transformers = pytest.importorskip("transformers")
    run, out = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ours = load_model(*resolve_checkpoint(str(run.dir)))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = ours(tokens), hf(tokens).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
