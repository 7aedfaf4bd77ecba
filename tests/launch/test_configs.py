"""launch/configs/: every committed preset (fast and paper recipes) is a valid run config, the paper recipe has
every row of the official setup in effect, and make_configs.py regenerates them exactly."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.launch.presets import DENSITIES, SIZES, fast_preset, paper_lr
from sparse_dc.scaling.forms import PAPER, get_form
from sparse_dc.scaling.optimize import plan, training_config

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
CONFIGS = sorted((LAUNCH / "configs").glob("*.yaml"))
PAPER_CONFIGS = sorted((LAUNCH / "configs" / "paper").glob("*.yaml"))


def make_configs():
    spec = importlib.util.spec_from_file_location("make_configs", LAUNCH / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS + PAPER_CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS
                                                                 + PAPER_CONFIGS])
def test_every_committed_config_validates(path):
    cfg = load_config(RunConfig, str(path))
    assert cfg.name == path.stem or path.name == "tiny.yaml" or cfg.name == f"paper-{path.stem}"


def test_presets_cover_the_paper_grid_with_its_dst_defaults():
    assert len(CONFIGS) == len(SIZES) * len(DENSITIES) + 1  # + tiny.yaml
    cfg = load_config(RunConfig, str(LAUNCH / "configs" / "120m-d0.25.yaml"))
    assert (cfg.model.preset, cfg.sparsity.density, cfg.sparsity.block_size) == ("120m", 0.25, 64)
    s, t = cfg.sparsity, cfg.train
    assert (s.method, s.prune_rate, s.prune_rate_decay, s.update_frequency, s.distribution) == \
        ("set", 0.1, "cosine", 100, "uniform")
    assert (t.precision, t.schedule.warmup_steps, cfg.data.seq_len) == ("bf16", 1000, 256)
    assert load_config(RunConfig, str(LAUNCH / "configs" / "120m-d1.yaml")).sparsity.sparse is False
    # a ZeRO stage is one dotted override away, and every rank count up to 8 splits the global batch
    for stage in (1, 2, 3):
        zero = load_config(RunConfig, str(CONFIGS[0]), [f"train.deepspeed.zero_stage={stage}"])
        assert zero.train.deepspeed_config(8)["zero_optimization"]["stage"] == stage
    for path in (p for p in CONFIGS if p.name != "tiny.yaml"):
        load_config(RunConfig, str(path)).train.accumulation_steps(8)


def test_paper_recipe_has_every_official_row_in_effect():
    """Every (size, density) of the paper grid, the official setup row by row (docs/fidelity.md)."""
    assert len(PAPER_CONFIGS) == len(SIZES) * len(DENSITIES)
    dense_lr = {}
    for path in PAPER_CONFIGS:
        cfg = load_config(RunConfig, str(path))
        d, m, s, t = cfg.data, cfg.model, cfg.sparsity, cfg.train
        assert s.block_size == 1 and (s.method, s.distribution, s.update_frequency) == ("set", "uniform", 100)
        assert (s.prune_rate, s.prune_rate_decay, s.min_prune_rate, s.stop_fraction) == (0.1, "cosine", 0.005, 1.0)
        assert (s.grow_candidates, s.regrow_optimizer, s.regrow_step, s.momentum_ramp_steps) == \
            ("dead_after_drop", "adamdst", 5, 20)
        assert (t.optimizer.betas, t.optimizer.weight_decay, t.grad_clip) == ([0.9, 0.999], 0.0, 0.0)
        assert (t.global_batch, d.seq_len, d.packing) == (512, 256, "document")
        assert (t.schedule.warmup_fraction, t.schedule.step_convention, t.schedule.decay, t.schedule.min_lr_ratio) \
            == (0.05, "hf", "cosine", 0.1)
        assert (m.norm_eps, m.init, m.init_std) == (1e-6, "normal", 0.02)
        t.accumulation_steps(8)  # 512 sequences split over up to 8 ranks
        if s.density == 1.0:
            dense_lr[m.preset] = t.optimizer.lr
        assert t.optimizer.lr == pytest.approx(paper_lr(m.preset, 1.0) / s.density, rel=5e-3)  # sparse = dense / S
        assert str(t.optimizer.lr) in path.read_text().splitlines()[3]  # the header states the LR and its rule
    # the official scripts' numbers for 20m; larger models get smaller LRs (the stated N^-0.25 rule)
    assert dense_lr["20m"] == 1.95e-3 and paper_lr("20m", 0.0625) == 3.12e-2
    assert [dense_lr[size] for size in SIZES] == sorted(dense_lr.values(), reverse=True)
    assert dense_lr["3b84"] == pytest.approx(1.95e-3 * (3.84e9 / 1.14e7) ** -0.25, rel=0.05)


def test_make_configs_regenerates_the_committed_files_exactly():
    generated = make_configs().all_configs()
    committed = {p.name: p.read_text() for p in CONFIGS if p.name != "tiny.yaml"}
    committed.update({f"paper/{p.name}": p.read_text() for p in PAPER_CONFIGS})
    assert set(generated) == set(committed)
    stale = [name for name, text in generated.items() if committed[name] != text]
    assert not stale, f"run `python launch/make_configs.py`: {stale} differ"


def test_law_plan_writes_a_preset_shaped_runnable_config(tmp_path):
    p = plan(get_form("paper"), PAPER, 2.6e9, 1e20)
    cfg = training_config(p, "planned", data_dir="data/corpus", recipe="fast")
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = load_config(RunConfig, str(path))
    assert (run.model.preset, run.data.total_tokens, run.data.dir) == (p.preset, int(p.tokens), "data/corpus")
    assert cfg == fast_preset(p.preset, round(p.density, 6), data_dir="data/corpus", unique_tokens=int(2.6e9),
                               epochs=None, total_tokens=int(p.tokens), name="planned")
