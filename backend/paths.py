"""Where the studio keeps its files.

* ``studio_home()``: runs, uploads and the queue's backup. ``STUDIO_HOME`` if set; else
  ``/data/finetune-studio`` when ``/data`` exists and is writable (a Hugging Face Space's persistent
  storage, or a volume mounted into the container); else ``~/.cache/finetune-studio``.
* ``local_home()``: what must stay on the machine's own disk: the SQLite queue (SQLite must not run
  over a network mount; it is backed up to the studio home instead) and the converted embedded model
  (built into the Docker image, so the first start is fast). ``STUDIO_LOCAL_HOME`` if set; else the
  studio home, unless that lies on the mount: then ``~/.cache/finetune-studio``.
"""

import os
from pathlib import Path

MOUNT = Path("/data")


def _default_home() -> Path:
    return Path.home() / ".cache" / "finetune-studio"


def studio_home() -> Path:
    if os.environ.get("STUDIO_HOME"):
        home = Path(os.environ["STUDIO_HOME"])
    elif MOUNT.is_dir() and os.access(MOUNT, os.W_OK | os.X_OK):
        home = MOUNT / "finetune-studio"
    else:
        home = _default_home()
    home.mkdir(parents=True, exist_ok=True)
    return home


def on_mount(path: Path) -> bool:
    return path.resolve().is_relative_to(MOUNT.resolve())


def local_home() -> Path:
    if os.environ.get("STUDIO_LOCAL_HOME"):
        home = Path(os.environ["STUDIO_LOCAL_HOME"])
    else:
        home = studio_home()
        if on_mount(home):
            home = _default_home()
    home.mkdir(parents=True, exist_ok=True)
    return home
