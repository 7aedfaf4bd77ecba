"""The paper recipe end to end: the preset of launch/configs/paper/20m-d0.0625.yaml with its model shrunk to the
tiny shape (CI time; README has the 20m shape's own CPU command) and CPU-sized data (vocab 512, 64-token
documents, 16-sequence batches, fp32), trained as real 2-rank `sparse-dc train` runs. Each row is
checked against the official formula computed here: the LR curve (5% warmup from LR 0, cosine to 0.1x over
(s - w) / (T - w)), the prune rate (cosine to the 0.005 floor, updates to the last step), AdamDST's per-weight
steps, the padding mask and both validation estimators (recomputed from the final weights), the law's N; and a
resume on another world size (ZeRO 2: 2 -> 1 ranks, ZeRO 3: 1 -> 2) carries AdamDST's per-weight step."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.data.loader import TokenBudget
from sparse_dc.launch.presets import paper_recipe
from sparse_dc.model import ModelConfig, build_model
from sparse_dc.sparsity import SparsityConfig
from sparse_dc.train.ledger import read_ledger
from sparse_dc.train.trainer import token_loss_sum
from train_harness import check_ok, run_train

pytestmark = pytest.mark.slow

L, STEPS, UPDATE = 64, 40, 4  # 128 documents x 5 epochs = 640 samples = 40 steps of 16; topology update every 4
REL = 1e-5


def write_paper_config(tmp_path, data_dir, name: str, stage: int = 2, **train) -> "Path":
    cfg = paper_recipe("20m", 0.0625, data_dir=str(data_dir), unique_tokens=128 * L, epochs=5, name=name)
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["model"]["preset"] = "tiny"
    cfg["data"].update(seq_len=L, val_tokens=4096, verify="size")
    cfg["sparsity"]["update_frequency"] = UPDATE
    cfg["train"].update(global_batch=16, micro_batch=4, precision="fp32", eval_interval=0, checkpoint_interval=0,
                        log_interval=1, progress=False, tensorboard=False, ledger=str(tmp_path / "ledger.jsonl"),
                        **train)
    cfg["train"]["deepspeed"]["zero_stage"] = stage
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, prepared_data):
    tmp = tmp_path_factory.mktemp("paper")
    config = write_paper_config(tmp, prepared_data, "paper")
    run = run_train(tmp, config, 2, launcher="slurm")
    check_ok(run)
    return run, config, tmp


def official_lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """The official scheduler (training_utils.get_scheduler "cosine", one cycle), for the update after `step`."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_paper_recipe_trains_with_the_official_schedules(paper_run):
    run, config, _ = paper_run
    cfg = load_config(RunConfig, str(config))
    lr = {r["step"]: r["lr"] for r in run.records if r["kind"] == "train"}
    assert sorted(lr) == list(range(1, STEPS + 1))
    warmup = int(0.05 * STEPS)  # the official code overrides --warmup_steps with 5% of the steps
    assert warmup == 2
    for step, value in lr.items():  # logged after the step: the LR of the next update
        assert value == pytest.approx(cfg.train.optimizer.lr * official_lr_factor(step, STEPS, warmup), rel=1e-9)
    assert official_lr_factor(0, STEPS, warmup) == 0.0  # the first update has LR 0, as in the official runs
    dst = {r["step"]: r["prune_rate"] for r in run.records if r["kind"] == "dst"}
    assert sorted(dst) == list(range(UPDATE, STEPS + 1, UPDATE))  # never stops: the last step updates too
    for step, rate in dst.items():
        assert rate == pytest.approx(0.005 + 0.095 * (1 + math.cos(math.pi * step / STEPS)) / 2, abs=1e-12)
    losses = run.losses()
    assert losses[STEPS] < losses[1] - 1.0, losses
    final = run.final()
    assert final["replica_digests"][0] == final["replica_digests"][1]
    assert final["dst"]["density"] == 0.0625 and final["dst"]["ever_active_fraction"] > 0.0625


def test_regrown_weights_keep_their_own_step_counts(paper_run):
    """AdamDST's state in the final checkpoint: a weight never regrown has counted every step (STEPS); one last
    regrown at update u restarted at 5 and has counted since (5 + STEPS - u); 0 only in ZeRO's padding."""
    run, _, _ = paper_run
    tag = run.dir / "checkpoints" / f"step_{STEPS:08d}"
    values = set()
    for path in sorted(tag.glob("*optim_states.pt")):
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for state in sd["base_optimizer_state"]["state"].values():
            values |= set(state["element_step"].unique().tolist())
    restarted = {5 + STEPS - u for u in range(UPDATE, STEPS + 1, UPDATE)}
    assert values - {0.0} <= {float(STEPS)} | restarted and restarted <= values, sorted(values)


def law_dense(vocab: int, d: int, f: int, layers: int) -> int:
    """The paper's N_dense for a Llama shape: everything but the input embedding (head, blocks, norms)."""
    return vocab * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d


def test_ledger_row_carries_the_papers_n_and_both_estimators_on_the_padded_validation_set(paper_run):
    run, config, tmp = paper_run
    cfg = load_config(RunConfig, str(config))
    (row,) = read_ledger(str(tmp / "ledger.jsonl"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run.dir / "checkpoints"), tag=f"step_{STEPS:08d}")
    masks = [v for k, v in state.items() if k.endswith(".mask")]
    assert len(masks) == 14
    live = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    dense = law_dense(512, 64, 128, 2)
    assert row["dense_params"] == dense and row["density_measured"] == live == 0.0625
    assert row["active_params"] == round(dense * live)  # the head scaled by S too, as the paper's fit counts N
    assert row["active_params_physical"] > row["active_params"] and row["block_size"] == 1
    assert row["packing"] == "document" and row["unique_tokens"] == 128 * L and row["tokens"] == STEPS * 16 * L
    budget = TokenBudget.from_config(cfg.data)
    assert row["unique_real_tokens"] == budget.documents.real_tokens() < row["unique_tokens"]

    # both estimators, recomputed from the final weights with a per-target cross-entropy written out here
    model = build_model(cfg.model, cfg.sparsity, 512)
    model.load_state_dict(state)
    n = budget.validation_sequences()
    sums, counts, means = [], [], []
    with torch.no_grad():
        for first in range(0, n, cfg.train.micro_batch):
            mb = budget.validation_micro_batch(np.arange(first, min(first + cfg.train.micro_batch, n)))
            tokens, mask = mb["tokens"], mb["loss_mask"]
            logp = F.log_softmax(model(tokens[:, :-1]).float(), -1)
            nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
            real = mask[:, 1:]  # a target counts when the token it predicts is real
            sums.append(float(nll[real].sum()))
            counts.append(int(real.sum()))
            means.append(sums[-1] / counts[-1])
    assert row["val_loss"] == pytest.approx(sum(sums) / sum(counts), rel=REL)
    assert row["val_loss_paper"] == pytest.approx(sum(means) / (len(means) + 1), rel=REL)  # the official estimator
    assert row["val_loss_paper"] < row["val_loss"]


def test_padding_is_masked_out_of_the_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), SparsityConfig(), vocab_size=32)
    tokens = torch.randint(0, 32, (3, 9))
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5, [True] * 1 + [False] * 8])
    padded = tokens.masked_fill(~mask, 7)  # whatever fills the padding must not matter
    got = token_loss_sum(model, padded, mask)
    logits = model(tokens[:, :-1])
    want = sum(F.cross_entropy(logits[i, :k - 1], tokens[i, 1:k], reduction="sum") for i, k in ((0, 9), (1, 4)))
    torch.testing.assert_close(got, want)  # row 2 (one real token) predicts nothing


@pytest.mark.parametrize("stage, before, after", [(2, 2, 1), (3, 1, 2)])
def test_resume_on_another_world_size_carries_the_per_weight_steps(paper_run, prepared_data, tmp_path, stage,
                                                                   before, after):
    """Stopped right after the first update (step UPDATE), resumed on the other world size: every later step, and
    the updates at 8 ... 40, match the uninterrupted 2-rank run (a per-weight step restarted at the global count
    instead would move the regrown weights ~3x as far)."""
    reference = paper_run[0]
    config = write_paper_config(tmp_path, prepared_data, "elastic", stage)
    stop = run_train(tmp_path, config, before, f"train.stop_at_step={UPDATE + 1}", launcher="slurm")
    check_ok(stop)
    resumed = run_train(tmp_path, config, after, "--resume", "auto", launcher="slurm")
    check_ok(resumed)
    assert f"written by {before} ranks, resuming on {after}" in resumed.proc.stderr
    ref, got = reference.losses(), resumed.losses()
    for step in range(UPDATE + 2, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=REL, abs=0), step
    assert resumed.final()["dst"] == reference.final()["dst"]
