"""2-rank worker for test_sparsity_distributed.py (run under torchrun, gloo, DS_ACCELERATOR=cpu).

For each ZeRO stage and granularity: train a tiny sparse Llama on rank-dependent data with RigL/SET updates,
and record (per rank, as JSON) the topology hashes, whether the regrown/dropped units' fp32 weights and Adam
moments are exactly zero after an update, and whether pruned entries stay zero after further steps.
Case "rigl-exact": a block RigL update over 2 micro-batches x 2 ranks against RigL's dense simulation.
"""
import copy
import functools
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from sparse_dc.model import ModelConfig, build_model
from sparse_dc.sparsity import (AdamDST, DSTEngine, SparseLinear, SparsityConfig, fix_deepspeed_state_after_load,
                                optimizer_state)
from sparse_dc.sparsity.adamdst import ELEMENT_STEP


def mask_hash(engine: DSTEngine) -> list[int]:
    return [int((m.unit_mask().flatten().long() * torch.arange(m.unit_mask().numel())).sum())
            for m in engine.layers.values()]


def run_case(stage: int, block_size: int, method: str, ckpt_dir: str, adamdst: bool = False,
             regrow: str = "zero") -> dict:
    """adamdst: the paper recipe's rules (AdamDST, regrowth among units dead after the drop); also records whether
    every grown unit's per-weight step restarted at regrow_step while the others counted every step. regrow:
    sparsity.regrow_init."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    extra = dict(regrow_optimizer="adamdst", grow_candidates="dead_after_drop") if adamdst else {}
    sparsity = SparsityConfig(density=0.5, block_size=block_size, method=method, update_frequency=2,
                              prune_rate=0.3, prune_rate_decay="constant", stop_fraction=1.0, seed=7,
                              regrow_init=regrow, **extra)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1), sparsity, vocab_size=32)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
                 "zero_optimization": {"stage": stage}}
    optimizer = None
    if adamdst:
        optimizer = AdamDST(model.parameters(), lr=1e-2)
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
        del ds_config["optimizer"]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                           config=ds_config)
    dst = DSTEngine(engine.module, sparsity, total_steps=6, state=optimizer_state(engine))
    rank = dist.get_rank()
    data = torch.randint(0, 32, (6, 2, 9), generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
    out: dict = {"hashes": [], "reset_zero": True, "pruned_zero": True, "changed": [], "steps_ok": adamdst}

    def train(step: int) -> None:
        dst.begin_step(step)
        tokens = data[step - 1]
        loss = nn.functional.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()

    counts: dict[str, torch.Tensor] = {}  # adamdst: the expected per-weight step counts of each sparse layer
    for step in range(1, 6):
        for expected in counts.values():
            expected += 1
        if stage == 2 and step == 3:  # the post-load bug: the accessor must work after load_checkpoint
            engine.save_checkpoint(ckpt_dir, tag="t")
            engine.load_checkpoint(ckpt_dir, tag="t")
            fix_deepspeed_state_after_load(engine)
        before = {n: m.unit_mask().clone() for n, m in dst.layers.items()}
        train(step)
        stats = dst.end_step(step)
        if stats is None:
            continue
        out["hashes"].append(mask_hash(dst))
        out["changed"].append(stats["changed_fraction"])
        for name, layer in dst.layers.items():
            new = layer.unit_mask()
            p = layer.param
            fp32 = safe_get_full_fp32_param(p).reshape(tuple(getattr(p, "ds_shape", p.shape)))
            moments = [safe_get_full_optimizer_state(p, k).reshape(fp32.shape) for k in ("exp_avg", "exp_avg_sq")]
            if regrow == "normal":  # grown units hold small non-zero values (the same on both ranks), moments 0
                check_normal_regrowth(out, layer, before[name], new, fp32, moments, stage)
                continue
            if block_size == 1:
                reset = before[name] ^ new
            else:
                reset = fp32.abs().sum((1, 2)) == 0  # grown slots (values zeroed)
                grown_blocks = int((new & ~before[name]).sum())
                out["reset_zero"] &= int(reset.sum()) >= grown_blocks > 0
            out["reset_zero"] &= all(int(t[reset].count_nonzero()) == 0 for t in [fp32] + moments)
            if adamdst:  # B = 1: grown entries restart at regrow_step (5), every other entry counted each step
                steps = safe_get_full_optimizer_state(p, ELEMENT_STEP).reshape(fp32.shape)
                grown = new & (~before[name] | (fp32 == 0))  # newly live, or dropped and grown back (reset to 0)
                expected = counts.setdefault(name, torch.full_like(steps, float(step)))
                expected[grown] = 5.0
                out["steps_ok"] &= bool(grown.any()) and torch.equal(steps, expected)
    # pruned entries stay exactly zero in the fp32 master and the model's copy after further steps (B = 1)
    if block_size == 1:
        for layer in dst.layers.values():
            p = layer.param
            fp32 = safe_get_full_fp32_param(p).reshape(tuple(getattr(p, "ds_shape", p.shape)))
            out["pruned_zero"] &= int(fp32[~layer.unit_mask()].count_nonzero()) == 0
            if stage < 3:
                out["pruned_zero"] &= int(p.detach()[~layer.unit_mask()].count_nonzero()) == 0
    out["live"] = [int(m.unit_mask().sum()) for m in dst.layers.values()]
    return out


def check_normal_regrowth(out: dict, layer: SparseLinear, old: torch.Tensor, new: torch.Tensor,
                          fp32: torch.Tensor, moments: list[torch.Tensor], stage: int) -> None:
    """regrow_init=normal right after an update: grown units non-zero in the fp32 master (and in the model's copy
    below ZeRO 3), their moments zero; dropped entries (B = 1) zero."""
    if layer.block_size == 1:
        grown, dropped = new & ~old, old & ~new
        out["reset_zero"] &= int(fp32[dropped].count_nonzero()) == 0 and bool((fp32[grown] != 0).all())
        where = grown | dropped
    else:  # the grown blocks' slots: where the layout now reads a block that was dead before
        layout = layer.layout
        grown = (new & ~old)[layout.row_idx.long(), layout.col_idx.long()]
        where = layout.slot.long()[grown]
        out["reset_zero"] &= where.numel() > 0 and bool((fp32[where].abs().sum((1, 2)) > 0).all())
    out["reset_zero"] &= all(int(m[where].count_nonzero()) == 0 for m in moments)
    if stage < 3:
        out["reset_zero"] &= torch.equal(layer.param.detach().float()[where], fp32[where])
    out.setdefault("grown_values", []).append(float(fp32[where].abs().sum()))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def dense_simulation(model: nn.Module, batches: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """RigL's dense simulation on a copy of `model`: every SparseLinear runs as a dense weight holding its masked
    values; returns, per sparse layer, the torch-autograd dL/dW of each micro-batch."""
    sim = copy.deepcopy(model)
    weights = {}
    for name, layer in sim.named_modules():
        if isinstance(layer, SparseLinear):
            weights[name] = layer.dense_weight().detach().clone().requires_grad_()
            layer.forward = functools.partial(nn.functional.linear, weight=weights[name])
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
    for tokens in batches:
        for name, g in zip(weights, torch.autograd.grad(lm_loss(sim, tokens), list(weights.values()))):
            grads[name].append(g)
    return grads


def block_norms(dw: torch.Tensor, b: int) -> torch.Tensor:
    return dw.reshape(dw.shape[0] // b, b, dw.shape[1] // b, b).square().sum((1, 3)).sqrt()


def run_exact_case() -> dict:
    """One RigL update at step 1 over 2 micro-batches per rank (each rank its own data): is each layer's grown
    set the top of ‖Σ over both ranks' micro-batches of dL/dW‖_F (exact), and would the sum of norms differ?"""
    b = 16
    # independent masks: the grown set is then exactly the top of the scores (no line rule in between)
    sparsity = SparsityConfig(density=0.5, block_size=b, method="rigl", update_frequency=1, prune_rate=0.3,
                              prune_rate_decay="constant", stop_fraction=1.0, seed=7, block_topology="independent")
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1), sparsity, vocab_size=32)
    rank = dist.get_rank()
    batches = torch.randint(0, 32, (2, 2, 9), generator=torch.Generator().manual_seed(200 + rank))
    grads = dense_simulation(model, batches)  # before DeepSpeed wraps the model
    exact = {n: torch.stack(g).sum(0) for n, g in grads.items()}
    norm_sum = {n: sum(block_norms(x, b) for x in g) for n, g in grads.items()}
    for t in list(exact.values()) + list(norm_sum.values()):
        dist.all_reduce(t)  # sum over ranks: the gradient itself (exact) or the per-micro-batch norms
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    dst = DSTEngine(engine.module, sparsity, total_steps=4, state=optimizer_state(engine))
    old = {n: m.unit_mask().clone() for n, m in dst.layers.items()}
    dst.begin_step(1)
    for tokens in batches:
        engine.backward(lm_loss(engine, tokens))
        engine.step()  # a no-op until the accumulation boundary (the 2nd micro-batch)
    assert dst.end_step(1) is not None

    def top_dead(score: torch.Tensor, dead: torch.Tensor, k: int) -> list[int]:
        return sorted(torch.where(dead.flatten(), score.flatten(), -torch.inf).topk(k).indices.tolist())

    out: dict = {"grown": {}, "expected_exact": {}, "expected_norm_sum": {}}
    for name, layer in dst.layers.items():
        grown = (layer.unit_mask() & ~old[name]).flatten().nonzero().flatten().tolist()
        k = len(grown)
        out["grown"][name] = grown
        out["expected_exact"][name] = top_dead(block_norms(exact[name], b), ~old[name], k)
        out["expected_norm_sum"][name] = top_dead(norm_sum[name], ~old[name], k)
    return out


def main() -> None:
    result_dir = sys.argv[1]
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a 20 s C++ JIT build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in (1, 2, 3):
        for block_size, method, variant in ((1, "rigl", ""), (32, "rigl", ""), (32, "set", ""), (1, "set", "adamdst"),
                                            (1, "set", "normal"), (32, "set", "normal")):
            key = f"zero{stage}-B{block_size}-{method}" + (f"-{variant}" if variant else "")
            if len(sys.argv) > 2 and key not in sys.argv[2:]:
                continue
            results[key] = run_case(stage, block_size, method, os.path.join(result_dir, f"ckpt-{key}"),
                                    adamdst=variant == "adamdst", regrow="normal" if variant == "normal" else "zero")
    if len(sys.argv) <= 2 or "rigl-exact" in sys.argv[2:]:
        results["rigl-exact"] = run_exact_case()
    with open(os.path.join(result_dir, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(results, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
