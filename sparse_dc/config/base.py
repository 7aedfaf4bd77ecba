"""The config machinery shared by every stage: typed dataclasses, YAML loading, dotted overrides, validation.

Each stage declares a kw-only dataclass subclassing `Config` next to its code (e.g. `sparse_dc/data/config.py`)
with a comment per field and a `validate()` that calls `self.check(...)`. The root tree (`sparse_dc.config.run`)
composes them. Construction from dicts is strict: unknown keys, wrong types and values outside a `Literal` are
rejected with a message naming the dotted field, the value, and what was expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from sparse_dc.errors import SparseDCError

C = TypeVar("C", bound="Config")


class ConfigError(SparseDCError):
    """A user-facing configuration error; its message is one line naming the field, the value and the rule."""


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_QUANTITY = re.compile(r"^\s*([+-]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_quantity(text: str | int | float, name: str = "value") -> float:
    """Parse '2.6e9', '2.6B', '500M', '1_000_000' or a number into a float; ConfigError names `name` otherwise."""
    if isinstance(text, bool):
        raise ConfigError(f"{name}={text!r}: expected a number such as 2.6e9 or 2.6B")
    if isinstance(text, (int, float)):
        return float(text)
    match = _QUANTITY.match(str(text))
    if not match:
        raise ConfigError(f"{name}={text!r}: expected a number such as 2.6e9, 2.6B, 500M or 1_000_000")
    return float(match.group(1).replace("_", "")) * _SUFFIXES.get(match.group(2).lower(), 1.0)


def parse_scalar(text: str) -> Any:
    """Parse one CLI override value: null/true/false, numbers (with K/M/B/T suffixes), YAML lists, else a string."""
    low = text.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if text.strip().startswith("["):
        return yaml.safe_load(text)
    if _QUANTITY.match(text):
        value = parse_quantity(text)
        return int(value) if value.is_integer() and not re.search(r"[.eE]", text.rstrip("kKmMbBgGtT ")) else value
    return text


@dataclasses.dataclass(frozen=True)
class _RawOverride:
    """A CLI override's text, parsed only once the target field's type is known ('20m' stays a string for a
    `str` field such as a preset name, and becomes 2e7 for a number)."""

    text: str


def _accepts_text(hint: Any, text: str) -> bool:
    origin = get_origin(hint)
    if hint is str:
        return True
    if origin is Literal:
        return text in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts_text(option, text) for option in get_args(hint))
    return False


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming `path`."""
    if isinstance(value, _RawOverride):
        parsed = parse_scalar(value.text)
        value = value.text if parsed is not None and _accepts_text(hint, value.text) else parsed
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}=None: expected a value of type {_type_name(hint)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: expected {_type_name(hint)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        (item_hint, *_) = get_args(hint) or (Any,)
        return [_coerce(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping of {hint.__name__} fields")
        return hint.from_dict(value, path)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, str):
            value = parse_quantity(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or float(value) != int(value):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            value = parse_quantity(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        if not math.isfinite(value):  # YAML's .inf/.nan, or a literal beyond float range such as 1e400
            raise ConfigError(f"{path}={value!r}: expected a finite number")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return str(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every config section. Subclasses are `@dataclass(kw_only=True)` and override `validate`."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], path: str = "") -> C:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise ConfigError(f"{where}: unknown field; expected one of {', '.join(sorted(names))}")
        kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self: C, overrides: list[str]) -> C:
        """Return a copy with dotted `a.b=value` overrides applied (strict: unknown keys are errors)."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. data.seq_len=256")
            node, parts = data, key.strip().split(".")
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown config section in override {item!r}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"{key}: unknown field; expected one of {', '.join(sorted(node))}")
            node[parts[-1]] = _RawOverride(raw)
        return type(self).from_dict(data)

    def validate(self, path: str = "") -> None:
        """Check this section's values (override and call super) then recurse into sub-sections."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value.validate(f"{path}.{f.name}" if path else f.name)

    def check(self, ok: bool, path: str, name: str, expected: str) -> None:
        """Raise ConfigError('<path.name>=<value>: expected <expected>') unless `ok`."""
        if not ok:
            where = f"{path}.{name}" if path else name
            raise ConfigError(f"{where}={getattr(self, name)!r}: expected {expected}")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: the config hash recorded in checkpoints and the ledger."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_yaml_mapping(path: str | None) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; a missing or malformed file is a one-line ConfigError."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {exc.start}): expected a UTF-8 YAML file"
                          ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | None = None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) -> dataclass tree -> dotted overrides -> validated once. Errors are ConfigError."""
    config = cls.from_dict(load_yaml_mapping(path)).with_overrides(list(overrides or []))
    config.validate()
    return config


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file and rename, so readers never see a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
