"""The config machinery: strict typing, dotted overrides, validation messages that name field, value and rule."""
import pytest

from sparse_dc.config import ConfigError, load_config, parse_quantity, parse_scalar
from sparse_dc.config.run import RunConfig


def test_defaults_validate():
    cfg = load_config(RunConfig)
    assert cfg.data.seq_len == 256


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ndata:\n  unique_tokens: 1M\n  seq_len: 128\n")
    cfg = load_config(RunConfig, str(path), ["data.seq_len=64", "data.epochs=null", "data.total_tokens=2.56e6"])
    assert (cfg.name, cfg.data.unique_tokens, cfg.data.seq_len) == ("a", 1_000_000, 64)
    assert cfg.data.epochs is None and cfg.data.total_tokens == 2_560_000


@pytest.mark.parametrize(
    "override, message",
    [
        (["data.seq_len=1"], "data.seq_len=1: expected an integer >= 2"),
        (["data.seqlen=4"], "data.seqlen: unknown field"),
        (["data.verify=md5"], "data.verify='md5': expected one of 'checksum', 'size'"),
        (["data.seq_len=abc"], "data.seq_len='abc': expected a number"),
        (["data.total_tokens=1000"], "data.epochs=4.0: expected exactly one of"),
        (["data.epochs=null", "data.total_tokens=1000"], "data.total_tokens=1000: expected a positive multiple"),
        (["nosuch.x=1"], "nosuch: unknown config section"),
        (["data.seq_len"], "expected dotted key=value"),
        (["train.global_batch=1e400"], "train.global_batch=inf: expected an integer"),
        (["data.seq_len=2048"], "data.seq_len=2048: expected at most model.max_seq_len + 1 = 1025"),
        (["sparsity.density=0.01", "sparsity.block_size=32"],
         "sparsity.density=0.01: not achievable with 32x32 blocks at hidden size 64 (each of the 14 sparse "
         "projections keeps at least one block), which would train at density 0.175"),
    ],
)
def test_errors_name_field_value_and_rule(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(RunConfig, str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, str(tmp_path / "bad.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text \(byte 9\)"):
        load_config(RunConfig, str(tmp_path / "latin1.yaml"))
    (tmp_path / "inf.yaml").write_text("train:\n  optimizer: {lr: .inf}\n")
    with pytest.raises(ConfigError, match="train.optimizer.lr=inf: expected a finite number"):
        load_config(RunConfig, str(tmp_path / "inf.yaml"))


def test_density_within_tolerance_is_accepted_and_reported():
    from sparse_dc.model.build import achieved_density

    cfg = load_config(RunConfig, None, ["model.preset=20m", "sparsity.density=0.01", "sparsity.block_size=32"])
    assert achieved_density(cfg.model, cfg.sparsity) == pytest.approx(0.01, rel=0.02)  # 0.00989: rounding only
    cfg = load_config(RunConfig, None, ["sparsity.density=0.5", "sparsity.block_size=32"])
    assert achieved_density(cfg.model, cfg.sparsity) == 0.5


def test_quantities():
    assert parse_quantity("2.6B") == 2.6e9
    assert parse_quantity("500M") == 5e8
    assert parse_quantity("1_000") == 1000
    assert parse_scalar("1e6") == 1e6 and parse_scalar("12") == 12 and parse_scalar("x") == "x"
    with pytest.raises(ConfigError, match="expected a number"):
        parse_quantity("lots")


def test_fingerprint_changes_with_values():
    a = load_config(RunConfig)
    b = load_config(RunConfig, None, ["data.seed=7"])
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == load_config(RunConfig).fingerprint()


def test_override_text_is_parsed_by_the_field_type():
    from dataclasses import dataclass

    from sparse_dc.config import Config

    @dataclass(kw_only=True)
    class Inner(Config):
        preset: str = "tiny"
        size: int = 1
        maybe: str | None = "x"

    @dataclass(kw_only=True)
    class Outer(Config):
        inner: Inner = None  # type: ignore[assignment]

    cfg = Outer(inner=Inner()).with_overrides(["inner.preset=20m", "inner.size=20m", "inner.maybe=null"])
    assert cfg.inner.preset == "20m" and cfg.inner.size == 20_000_000 and cfg.inner.maybe is None
