"""The variant presets (clusters/presets/variants/*.yaml) as ``key=value`` overrides.

A preset file is a complete config on its own (the embedded default plus the variant);
a grid that starts from another base config (e.g. the Mistral-7B preset) appends
``variant_overrides(name)`` to its own overrides:

    load_config("clusters/presets/mistral-7b-ultrafeedback.yaml", variant_overrides("wdro_dpo"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from spa_ray.config.tree import ConfigError, read_yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "clusters" / "presets" / "variants"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _flatten(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out
    text = data if isinstance(data, str) and yaml.safe_load(data) == data else json.dumps(data)
    return [f"{prefix.rstrip('.')}={text}"]


def variant_overrides(name_or_path: str) -> list[str]:
    """Overrides equal to the preset ``name`` (a file stem in PRESET_DIR) or a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"variant preset {name_or_path!r}: not one of {preset_names()}")
    return _flatten(read_yaml(path))


__all__ = ["PRESET_DIR", "preset_names", "variant_overrides"]
