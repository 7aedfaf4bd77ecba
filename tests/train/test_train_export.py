"""`sparse-dc export`: a 2-rank ZeRO-3 block-sparse checkpoint -> safetensors + Llama config.json; with
transformers installed (the `hf` extra), LlamaForCausalLM's logits match our model's."""
import json
import struct

import pytest
import torch

from sparse_dc.cli import main as sparse_dc_main
from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.tokenizer import processor_from_bytes
from sparse_dc.errors import SparseDCError
from sparse_dc.train.checkpoint import resolve_checkpoint, run_config
from sparse_dc.train.export import export, load_model

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
    # HF's rope permutation moves q rows only within a head, so the block pattern survives: nonzeros exactly in the
    # live blocks (the path-aware topology leaves no live block without a gradient, so none stays all zero)
    q, mask = tensors["model.layers.0.self_attn.q_proj.weight"], ours.layers[0].attn.q.unit_mask()
    live = q.reshape(2, 32, 2, 32).ne(0).any(3).any(1)
    assert q.shape == (64, 64) and mask.float().mean() == 0.5 and torch.equal(live, mask)
    for i, layer in enumerate(ours.layers):
        for kind, hf_name in (("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"),
                              ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
            module = getattr(layer.attn if kind in ("v", "o") else layer.mlp, kind)
            w = tensors[f"model.layers.{i}.{hf_name}.weight"]
            blocks = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 32, 32).ne(0).any(3).any(1)
            assert torch.equal(blocks, module.unit_mask()), (i, kind)


def test_transformers_logits_match(exported):
    transformers = pytest.importorskip("transformers")
    run, out = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ours = load_model(*resolve_checkpoint(str(run.dir)))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = ours(tokens), hf(tokens).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_export_ships_the_runs_tokenizer(exported):
    transformers = pytest.importorskip("transformers")
    run, out = exported
    data_dir = run_config(*resolve_checkpoint(str(run.dir))).data.dir
    proto = open(f"{data_dir}/tokenizer.model", "rb").read()
    assert (out / "tokenizer.model").read_bytes() == proto
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    sp, hf = processor_from_bytes(proto), transformers.AutoTokenizer.from_pretrained(str(out))
    docs = [d for _, d in zip(range(200), builtin_documents())]
    assert all(hf(d)["input_ids"] == sp.encode(d) for d in docs)  # no BOS/EOS added, same pieces
    assert hf.eos_token_id == 2 and hf.decode(sp.encode(docs[0])) == docs[0]


def test_export_refuses_a_missing_tokenizer_and_writes_nothing(zero_run, tmp_path):
    run = zero_run(3, "block")
    with pytest.raises(SparseDCError, match="--tokenizer .*no such file"):
        export(str(run.dir), str(tmp_path / "hf"), tokenizer=str(tmp_path / "nope.model"))
    assert list(tmp_path.iterdir()) == []
