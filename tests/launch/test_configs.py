"""launch/configs/: every committed preset is a valid run config, and make_configs.py regenerates them exactly."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.launch.presets import DENSITIES, SIZES, paper_preset
from sparse_dc.scaling.forms import PAPER, get_form
from sparse_dc.scaling.optimize import plan, training_config

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
CONFIGS = sorted((LAUNCH / "configs").glob("*.yaml"))


def make_configs():
    spec = importlib.util.spec_from_file_location("make_configs", LAUNCH / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_committed_config_validates(path):
    cfg = load_config(RunConfig, str(path))
    assert cfg.name == path.stem or path.name == "tiny.yaml"


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


def test_make_configs_regenerates_the_committed_files_exactly():
    generated = make_configs().all_configs()
    committed = {p.name: p.read_text() for p in CONFIGS if p.name != "tiny.yaml"}
    assert set(generated) == set(committed)
    stale = [name for name, text in generated.items() if committed[name] != text]
    assert not stale, f"run `python launch/make_configs.py`: {stale} differ"


def test_law_plan_writes_a_preset_shaped_runnable_config(tmp_path):
    p = plan(get_form("paper"), PAPER, 2.6e9, 1e20)
    cfg = training_config(p, "planned", data_dir="data/corpus")
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = load_config(RunConfig, str(path))
    assert (run.model.preset, run.data.total_tokens, run.data.dir) == (p.preset, int(p.tokens), "data/corpus")
    assert cfg == paper_preset(p.preset, round(p.density, 6), data_dir="data/corpus", unique_tokens=int(2.6e9),
                               epochs=None, total_tokens=int(p.tokens), name="planned")
