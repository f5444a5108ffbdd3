"""Presets: YAML files in ``presets/`` holding only the keys that differ from the defaults.

A preset is named ``<model>-<method>`` (``smollm2-135m-lora``). With no preset named, a run on
the embedded model takes the embedded preset for its method, so the default run learns.

Each preset opens with a comment (what it is for, the hardware, the estimated peak memory;
``preset_header``). A preset for a hub model ships that model's ``config.json`` (no weights) in
``presets/configs/<org>--<name>.json``, so its memory estimate and a meta-device build need no
network: ``model_config(preset_or_model_id)``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import ConfigError, RunSpec
from .models import EMBEDDED_ALIASES

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
CONFIG_DIR = PRESET_DIR / "configs"
EMBEDDED_PRESET = "smollm2-135m-{method}"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if name not in list_presets():  # a name, never a path: "../../x" must not read another YAML file
        raise ConfigError(f"no preset {name!r} (available: {', '.join(list_presets()) or 'none'})")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def preset_header(name: str) -> str:
    """The preset's opening comment without the ``#`` marks: what it is for, hardware, memory."""
    load_preset(name)  # the same error for an unknown name
    lines = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines)


def model_config_path(name: str | None) -> Path | None:
    """The shipped ``config.json`` of a preset's model, or of a hub id (``ORG/NAME``); None if none ships."""
    if name and name in list_presets():
        name = load_preset(name).get("model")
    if not isinstance(name, str) or name.count("/") != 1:
        return None
    path = CONFIG_DIR / f"{name.replace('/', '--')}.json"
    return path if path.exists() else None


def model_config(name: str | None):
    """The transformers config of a preset's model (or a hub id) from the shipped file, offline; None if none ships."""
    path = model_config_path(name)
    if path is None:
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def build_spec(overrides: dict, preset: str | None = None) -> RunSpec:
    """Defaults <- preset <- overrides, resolved. The embedded model gets its preset by default."""
    method = overrides.get("method", "lora")
    if preset is None and overrides.get("model") in EMBEDDED_ALIASES:
        candidate = EMBEDDED_PRESET.format(method=method)
        preset = candidate if candidate in list_presets() else None
    values = dict(load_preset(preset)) if preset else {}
    if overrides.get("stage", "sft") != "sft" and preset == EMBEDDED_PRESET.format(method=method):
        values.pop("learning_rate", None)  # tuned for SFT; a preference stage takes its own default (STAGE_DEFAULTS)
        values.pop("ewc_lambda", None)  # an SFT tool (config.py refuses it with dpo and orpo)
    values.update(overrides)
    values["preset"] = preset
    return RunSpec.from_flat(values).resolved()
