"""Loading a tree of dataclasses from YAML plus ``key.sub=value`` overrides.

Kept generic (no SPA names) so the config schema in ``config.py`` reads as plain
documented dataclasses, like TRL's ``DPOConfig``. Unknown keys and wrongly typed
values are errors that name the key and the source, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, malformed or out of range; the message names the key."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that carries its documentation (rendered into the README)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: cannot be null")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, source=source, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _filled(cls: type, base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with what it leaves out taken from ``base`` (a section's factory values),
    descending only into sections; a plain dict setting given is taken whole, and unknown
    keys stay to be refused by ``from_dict``."""
    hints = _type_hints(cls)
    out = dict(base)
    for name, value in given.items():
        section = hints.get(name)
        if isinstance(value, dict) and isinstance(out.get(name), dict) and dataclasses.is_dataclass(section):
            out[name] = _filled(section, out[name], value)
        else:
            out[name] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build ``cls`` from a nested mapping; unknown keys raise with their full dotted name."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + u for u in unknown)} (known under '{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(names))})"
        )
    data = dict(data)
    for f in dataclasses.fields(cls):  # a partly given section keeps its factory's other values
        if isinstance(data.get(f.name), dict) and dataclasses.is_dataclass(hints[f.name]) \
                and f.default_factory is not dataclasses.MISSING:
            data[f.name] = _filled(hints[f.name], to_dict(f.default_factory()), data[f.name])
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {prefix or '<root>'}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config tree (what config.yaml in a run directory holds)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def differing_keys(a: Any, b: Any, ignore: frozenset[str] | set[str] = frozenset(), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees (``to_dict`` form).

    A key is skipped when it, or a section above it (``"judge"`` covers ``judge.beta``),
    is in ``ignore``.
    """
    key = prefix.rstrip(".")
    if key and any(".".join(key.split(".")[:i]) in ignore for i in range(1, key.count(".") + 2)):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for name in sorted(set(a) | set(b)):
            out += differing_keys(a.get(name), b.get(name), ignore, f"{prefix}{name}.")
        return out
    return [] if a == b else [key]


def get_dotted(tree: Any, key: str) -> Any:
    """The value at a dotted key of a plain config tree (None where a section lacks it)."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is parsed as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply CLI overrides to a nested mapping (validation happens in ``from_dict``)."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) rows for every leaf field: the README's config reference."""
    rows = []
    hints = _type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows


def reference_markdown(cls: type) -> str:
    """The config reference as a markdown table (the README embeds it; a test keeps them equal)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_text in describe(cls):
        lines.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)
