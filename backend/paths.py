"""Where the studio keeps its files: ``STUDIO_HOME`` (default ``~/.cache/finetune-studio``)."""

import os
from pathlib import Path


def studio_home() -> Path:
    home = Path(os.environ.get("STUDIO_HOME") or Path.home() / ".cache" / "finetune-studio")
    home.mkdir(parents=True, exist_ok=True)
    return home
