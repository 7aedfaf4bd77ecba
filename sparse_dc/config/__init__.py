"""Config machinery (`base`) and the root tree every command builds from (`run`, imported lazily)."""
from sparse_dc.config.base import (
    Config,
    ConfigError,
    load_config,
    load_yaml_mapping,
    parse_quantity,
    parse_scalar,
    write_text_atomic,
)

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "load_yaml_mapping",
    "parse_quantity",
    "parse_scalar",
    "write_text_atomic",
]
