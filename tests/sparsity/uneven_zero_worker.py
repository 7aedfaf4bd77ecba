"""3-rank worker for test_sparsity_distributed.py's uneven-partition test (torchrun, gloo, DS_ACCELERATOR=cpu).

Every sparse weight of the tiny model has 2^k elements, which 3 ranks never divide. For ZeRO 1, 2 and 3 (AdamDST,
the paper recipe's optimizer) and ZeRO 3 with AdamW, a DeepSpeed engine trains on per-rank data next to a plain
torch reference: the same model and optimizer on one process, stepping on the mean loss of all three ranks' batches
(the gradient ZeRO's averaging gives). At each SET update (steps 2 and 4) the worker records, per rank:

- reads: how far the gathered fp32 weights and optimizer states (exp_avg, exp_avg_sq, AdamDST's element_step)
  are from the reference's before the update (the largest difference over the tensor's largest value; reduction
  order alone gave up to ~1e-6 with AdamDST and ~1e-3 with AdamW here, a misplaced slice gives ~1);
- exact reset: after the update every state equals its value before the update with exactly the changed entries
  (dropped | grown: the masks' symmetric difference) set to 0, and element_step exactly the grown entries set to
  regrow_step. The reference then takes the same topology by plain torch indexing, and both train on.
"""
import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from torch import nn

from sparse_dc.model import ModelConfig, build_model
from sparse_dc.sparsity import AdamDST, DSTEngine, SparseLinear, SparsityConfig, optimizer_state
from sparse_dc.sparsity.adamdst import ELEMENT_STEP

LR, WEIGHT_DECAY, REGROW_STEP = 1e-2, 0.1, 5
MOMENTS = ("exp_avg", "exp_avg_sq")


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def engine_states(p: nn.Parameter, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The gathered fp32 master ("param") and optimizer states of one parameter (collective)."""
    shape = tuple(getattr(p, "ds_shape", p.shape))
    out = {"param": safe_get_full_fp32_param(p).reshape(shape).clone()}
    out.update({k: safe_get_full_optimizer_state(p, k).reshape(shape).clone() for k in keys})
    return out


def reference_states(p: nn.Parameter, opt: torch.optim.Optimizer, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {"param": p.detach().clone(), **{k: opt.state[p][k].detach().clone() for k in keys}}


def run_case(stage: int, adamdst: bool) -> dict:
    extra = {"regrow_optimizer": "adamdst", "regrow_step": REGROW_STEP} if adamdst else {}
    sparsity = SparsityConfig(density=0.5, block_size=1, method="set", update_frequency=2, prune_rate=0.3,
                              prune_rate_decay="constant", stop_fraction=1.0, seed=7, **extra)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1), sparsity, vocab_size=32)
    reference = copy.deepcopy(model)
    world = dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0; the reference does not clip
                 "zero_optimization": {"stage": stage}}
    if adamdst:
        optimizer, ref_opt = AdamDST(model.parameters(), lr=LR), AdamDST(reference.parameters(), lr=LR)
        ds_config["zero_allow_untested_optimizer"] = True
    else:
        optimizer, ref_opt = None, torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY,
                                                             "torch_adam": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                           config=ds_config)
    dst = DSTEngine(engine.module, sparsity, total_steps=6, state=optimizer_state(engine))
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, SparseLinear)}
    keys = MOMENTS + ((ELEMENT_STEP,) if adamdst else ())
    data = [torch.randint(0, 32, (5, 2, 9), generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    rank = dist.get_rank()
    out = {"uneven": all(m.param.numel() % world for m in ref_layers.values()), "updates": 0, "read_error": 0.0,
           "reset_exact": True}
    for step in range(1, 5):
        dst.begin_step(step)
        engine.backward(lm_loss(engine, data[rank][step - 1]))
        engine.step()
        ref_opt.zero_grad()
        (sum(lm_loss(reference, d[step - 1]) for d in data) / world).backward()
        ref_opt.step()
        if not dst.is_update_step(step):
            continue
        before_masks = {n: m.unit_mask().clone() for n, m in dst.layers.items()}
        before = {n: engine_states(m.param, keys) for n, m in dst.layers.items()}
        for name, states in before.items():
            ref = reference_states(ref_layers[name].param, ref_opt, keys)
            for key, value in states.items():  # relative to the tensor's scale: a misplaced slice is ~1
                error = float((value - ref[key]).abs().max() / ref[key].abs().max().clamp_min(1e-30))
                out["read_error"] = max(out["read_error"], error)
        assert dst.end_step(step) is not None
        out["updates"] += 1
        for name, layer in dst.layers.items():
            new = layer.unit_mask()
            changed, grown = before_masks[name] ^ new, new & ~before_masks[name]
            out["reset_exact"] &= bool(changed.any())
            after = engine_states(layer.param, keys)
            for key, value in after.items():
                want = before[name][key].masked_fill(changed, 0.0)
                if key == ELEMENT_STEP:
                    want = before[name][key].masked_fill(grown, float(REGROW_STEP))
                out["reset_exact"] &= torch.equal(value, want)
            # the reference takes the engine's topology by plain torch indexing
            ref = ref_layers[name]
            with torch.no_grad():
                ref.mask.copy_(new)
                ref.weight[changed] = 0
                for key in MOMENTS:
                    ref_opt.state[ref.weight][key][changed] = 0
                if adamdst:
                    ref_opt.state[ref.weight][ELEMENT_STEP][grown] = REGROW_STEP
    return out


def main() -> None:
    result_dir = sys.argv[1]
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a 20 s C++ JIT build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"zero{stage}-{name}": run_case(stage, name == "adamdst")
               for stage, name in ((1, "adamdst"), (2, "adamdst"), (3, "adamdst"), (3, "adamw"))}
    with open(os.path.join(result_dir, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(results, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
