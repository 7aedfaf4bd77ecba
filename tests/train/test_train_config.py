"""The training config: the LR curve at every step against its formula written out here, the generated DeepSpeed
JSON, micro-batches per step, and one-line validation errors naming field, value and rule."""
import math

import pytest

from sparse_dc.config.base import ConfigError
from sparse_dc.train.config import DeepSpeedConfig, OptimizerConfig, ScheduleConfig, TrainConfig, WandbConfig


def expected_factor(s: int, total: int, warmup: int, decay: str, floor: float, hf: bool) -> float:
    """The curve as the docstrings state it, for the update after s completed steps."""
    if s < warmup:
        return s / warmup if hf else (s + 1) / (warmup + 1)
    if decay == "constant" or total <= warmup:
        return 1.0
    span = (total - warmup) if hf else (total - 1 - warmup)
    progress = min(1.0, (s - warmup) / max(1, span))  # a one-step run (span 0) trains at the peak
    shape = (1 + math.cos(math.pi * progress)) / 2 if decay == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("convention", ["shifted", "hf"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_factor_is_the_stated_curve_at_every_step(decay, convention, warmup):
    s = ScheduleConfig(warmup_steps=warmup, decay=decay, min_lr_ratio=0.1, step_convention=convention)
    for total in (1, 3, 20):
        for step in range(total + 2):  # past the end too: the curve stays at its floor
            want = expected_factor(step, total, warmup, decay, 0.1, convention == "hf")
            assert s.lr_factor(step, total) == pytest.approx(want, abs=1e-12), (step, total)


def test_cosine_is_not_linear_in_the_middle():
    """Spot values a linear decay would miss: a third of the way, cosine is at 0.775 of the span, linear 0.7."""
    s = ScheduleConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.1)
    assert s.lr_factor(0, 4) == 1.0 and s.lr_factor(3, 4) == pytest.approx(0.1)
    assert s.lr_factor(1, 4) == pytest.approx(0.1 + 0.9 * 0.75)
    assert s.lr_factor(2, 4) == pytest.approx(0.1 + 0.9 * 0.25)
    assert ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.1).lr_factor(1, 4) == pytest.approx(0.7)


def test_warmup_fraction_and_steps():
    assert ScheduleConfig(warmup_steps=None, warmup_fraction=0.05).warmup(1000) == 50
    assert ScheduleConfig(warmup_steps=None, warmup_fraction=0.05).warmup(39) == 1  # int(), not round()
    assert ScheduleConfig(warmup_steps=7).warmup(1000) == 7
    assert ScheduleConfig(warmup_steps=0).warmup(10) == 0
    hf = ScheduleConfig(warmup_steps=None, warmup_fraction=0.1, step_convention="hf", min_lr_ratio=0.0)
    assert [hf.lr_factor(s, 20) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]


def test_accumulation_steps_is_the_one_split():
    t = TrainConfig(micro_batch=4, global_batch=32)
    assert [t.accumulation_steps(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"train.global_batch=32: expected a multiple of micro_batch x world size "
                                          r"= 4 x 3"):
        t.accumulation_steps(3)


def test_deepspeed_json_is_generated_from_the_config():
    t = TrainConfig(micro_batch=2, global_batch=16, precision="fp16", grad_clip=0.5,
                    optimizer=OptimizerConfig(lr=1e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05),
                    deepspeed=DeepSpeedConfig(zero_stage=3, overlap_comm=True, reduce_bucket_size=7,
                                              allgather_bucket_size=9, extra={"zero_optimization": {"stage3_x": 1},
                                                                              "new": {"k": 2}}))
    ds = t.deepspeed_config(2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 2, 4)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_bucket_size": 7, "allgather_bucket_size": 9, "stage3_x": 1}
    assert ds["new"] == {"k": 2}  # extra merged last, recursively
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": True, "initial_scale_power": 16}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.9], "eps": 1e-6,
                                                           "weight_decay": 0.05, "torch_adam": True}}
    assert ds["steps_per_print"] > 10 ** 9 and ds["wall_clock_breakdown"] is False
    assert TrainConfig(precision="bf16").deepspeed_config(1)["bf16"] == {"enabled": True}
    assert "optimizer" not in TrainConfig(optimizer=OptimizerConfig(impl="client")).deepspeed_config(1)
    # the defaults leave the user's dicts alone
    extra = {"zero_optimization": {"stage": 1}}
    TrainConfig(deepspeed=DeepSpeedConfig(extra=extra)).deepspeed_config(1)
    assert extra == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("section,kwargs,match", [
    (OptimizerConfig, dict(lr=0), r"lr=0: expected a number > 0"),
    (OptimizerConfig, dict(betas=[0.9]), r"betas=\[0.9\]: expected two numbers in \[0, 1\)"),
    (OptimizerConfig, dict(betas=[0.9, 1.0]), r"betas=\[0.9, 1.0\]: expected two numbers"),
    (OptimizerConfig, dict(betas=[-0.1, 0.9]), r"betas=\[-0.1, 0.9\]: expected two numbers"),
    (OptimizerConfig, dict(eps=0), r"eps=0: expected a number > 0"),
    (OptimizerConfig, dict(weight_decay=-1e-3), r"weight_decay=-0.001: expected a number >= 0"),
    (ScheduleConfig, dict(warmup_steps=None), "warmup_steps=None: expected exactly one of"),
    (ScheduleConfig, dict(warmup_steps=3, warmup_fraction=0.1), "warmup_steps=3: expected exactly one of"),
    (ScheduleConfig, dict(warmup_steps=-1), r"warmup_steps=-1: expected an integer >= 0"),
    (ScheduleConfig, dict(warmup_steps=None, warmup_fraction=1.0),
     r"warmup_fraction=1.0: expected a number in \[0, 1\)"),
    (ScheduleConfig, dict(warmup_steps=None, warmup_fraction=-0.1), r"warmup_fraction=-0.1: expected a number in"),
    (ScheduleConfig, dict(min_lr_ratio=1.5), r"min_lr_ratio=1.5: expected a number in \[0, 1\]"),
    (ScheduleConfig, dict(min_lr_ratio=-0.5), r"min_lr_ratio=-0.5: expected a number in \[0, 1\]"),
    (DeepSpeedConfig, dict(zero_stage=0), "zero_stage=0: expected 1, 2 or 3"),
    (DeepSpeedConfig, dict(zero_stage=4), "zero_stage=4: expected 1, 2 or 3"),
    (DeepSpeedConfig, dict(reduce_bucket_size=0), "reduce_bucket_size=0: expected an integer >= 1"),
    (DeepSpeedConfig, dict(allgather_bucket_size=0), "allgather_bucket_size=0: expected an integer >= 1"),
    (WandbConfig, dict(project=""), "project='': expected a W&B project name"),
    (TrainConfig, dict(micro_batch=0, global_batch=0), "micro_batch=0: expected an integer >= 1"),
    (TrainConfig, dict(micro_batch=4, global_batch=2), "global_batch=2: expected a positive multiple of micro_batch=4"),
    (TrainConfig, dict(micro_batch=4, global_batch=6), "global_batch=6: expected a positive multiple"),
    (TrainConfig, dict(grad_clip=-1.0), r"grad_clip=-1.0: expected a number >= 0"),
    (TrainConfig, dict(log_interval=0), "log_interval=0: expected an integer >= 1"),
    (TrainConfig, dict(eval_interval=-1), r"eval_interval=-1: expected an integer >= 0 \(0 = only at the end\)"),
    (TrainConfig, dict(checkpoint_interval=-1), "checkpoint_interval=-1: expected an integer >= 0"),
    (TrainConfig, dict(eval_sequences=0), "eval_sequences=0: expected null or an integer >= 1"),
    (TrainConfig, dict(keep_checkpoints=0), "keep_checkpoints=0: expected an integer >= 1"),
    (TrainConfig, dict(stop_at_step=0), "stop_at_step=0: expected null or an integer >= 1"),
    (TrainConfig, dict(ledger=""), "ledger='': expected a file path"),
    (TrainConfig, dict(peak_flops=0.0), r"peak_flops=0.0: expected null or a number > 0"),
])
def test_invalid_values_are_one_line_errors(section, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        section(**kwargs).validate("train")
    assert "\n" not in str(err.value) and str(err.value).startswith("train.")


def test_boundary_values_are_accepted():
    for section, kwargs in [
        (OptimizerConfig, dict(betas=[0.0, 0.999], weight_decay=0.0)),
        (ScheduleConfig, dict(warmup_steps=0, min_lr_ratio=0.0)), (ScheduleConfig, dict(min_lr_ratio=1.0)),
        (ScheduleConfig, dict(warmup_steps=None, warmup_fraction=0.0)),
        (DeepSpeedConfig, dict(zero_stage=1, reduce_bucket_size=1, allgather_bucket_size=1)),
        (DeepSpeedConfig, dict(zero_stage=3)),
        (TrainConfig, dict(micro_batch=1, global_batch=1, grad_clip=0.0, log_interval=1, eval_interval=0,
                           checkpoint_interval=0, eval_sequences=1, keep_checkpoints=1, stop_at_step=1,
                           peak_flops=1.0)),
    ]:
        section(**kwargs).validate("train")


def test_error_paths_name_the_section_from_the_top():
    with pytest.raises(ConfigError, match=r"^lr=0: expected a number > 0$"):
        OptimizerConfig(lr=0).validate()  # no path: the bare field
    for bad, match in ((dict(optimizer=OptimizerConfig(lr=0)), r"^train.optimizer.lr=0: "),
                       (dict(schedule=ScheduleConfig(min_lr_ratio=2.0)), r"^train.schedule.min_lr_ratio=2.0: "),
                       (dict(deepspeed=DeepSpeedConfig(zero_stage=5)), r"^train.deepspeed.zero_stage=5: "),
                       (dict(wandb=WandbConfig(project="")), r"^train.wandb.project='': ")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad).validate("train")
    for section in (OptimizerConfig(lr=0), ScheduleConfig(min_lr_ratio=2.0), DeepSpeedConfig(zero_stage=5),
                    WandbConfig(project=""), TrainConfig(micro_batch=0)):
        with pytest.raises(ConfigError, match=r"^[a-z_]+="):
            section.validate()


def test_wandb_logging_needs_the_package(monkeypatch):
    """Logging to W&B without the optional package installed is refused at start, naming the install command."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    WandbConfig(mode="disabled").validate("train.wandb")
    for mode in ("offline", "online"):
        with pytest.raises(ConfigError, match=rf"^train.wandb.mode='{mode}': expected disabled, or the wandb package "
                                              r"installed \(pip install \"sparse-dc\[wandb\]\"\)$"):
            WandbConfig(mode=mode).validate("train.wandb")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    WandbConfig(mode="offline").validate("train.wandb")  # installed here (the test extra)
