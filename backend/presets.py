"""Presets: YAML files in ``presets/`` holding only the keys that differ from the defaults.

A preset is named ``<model>-<method>`` (``smollm2-135m-lora``). With no preset named, a run on
the embedded model takes the embedded preset for its method, so the default run learns.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import ConfigError, RunSpec
from .models import EMBEDDED_ALIASES

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
EMBEDDED_PRESET = "smollm2-135m-{method}"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset {name!r} (available: {', '.join(list_presets()) or 'none'})")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def build_spec(overrides: dict, preset: str | None = None) -> RunSpec:
    """Defaults <- preset <- overrides, resolved. The embedded model gets its preset by default."""
    method = overrides.get("method", "lora")
    if preset is None and overrides.get("model") in EMBEDDED_ALIASES:
        candidate = EMBEDDED_PRESET.format(method=method)
        preset = candidate if candidate in list_presets() else None
    values = dict(load_preset(preset)) if preset else {}
    values.update(overrides)
    values["preset"] = preset
    return RunSpec.from_flat(values).resolved()
