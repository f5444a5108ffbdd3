"""Experiment trackers beside ``metrics.jsonl``: the Trainer's own ``report_to`` integrations.

``metrics.jsonl`` stays the studio's record (the Runs view and the run comparison read it); a tracker
named in ``report_to`` gets the same scalars from transformers' callback for it:

* ``tensorboard`` (pip tensorboard): event files in ``RUN_DIR/tensorboard/``: train/loss,
  train/learning_rate, train/grad_norm, eval/loss, ... and the training arguments as text.
* ``trackio`` (pip trackio): ``STUDIO_HOME/trackio/`` (``TRACKIO_DIR``), project ``studio``, one run per
  run folder: the same scalars and the config; ``trackio show --project studio`` serves the dashboard.
* ``wandb`` (pip wandb): Weights & Biases' servers, the key from ``WANDB_API_KEY`` in the environment
  only (never stored by the studio); local files in ``STUDIO_HOME/wandb``.
* ``mlflow`` (pip mlflow): ``MLFLOW_TRACKING_URI``, else ``STUDIO_HOME/mlruns``.

The locations are set through each library's own environment variables, before the Trainer imports
it; a variable already set wins.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .paths import studio_home

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}  # -> pip package
PROJECT = "studio"  # trackio's project: every run of this studio in one dashboard


class TrackerError(ValueError):
    """A tracker that cannot be used here (not installed, no key)."""


def check(report_to: list[str]) -> None:
    """One clear error for a tracker that is not installed, or W&B without a key in the environment."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise TrackerError(f"report_to {name}: the package is not installed (pip install {TRACKERS[name]})")
    if ("wandb" in report_to and not os.environ.get("WANDB_API_KEY")
            and os.environ.get("WANDB_MODE") not in ("offline", "disabled")):
        raise TrackerError("report_to wandb: set WANDB_API_KEY in the environment (the studio reads the key only "
                           "from there and never writes it anywhere), or WANDB_MODE=offline")


def trackio_dir() -> Path:
    return Path(os.environ.get("TRACKIO_DIR") or studio_home() / "trackio")


def setup(report_to: list[str]) -> None:
    """Point the trackers at local storage (environment variables each library reads at import)."""
    home = studio_home()
    if "trackio" in report_to:
        os.environ.setdefault("TRACKIO_DIR", str(home / "trackio"))
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_DIR", str(home / "wandb"))
        (home / "wandb").mkdir(exist_ok=True)
    if "mlflow" in report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri())


def tensorboard_dir(run_dir) -> Path:
    return Path(run_dir) / "tensorboard"


def place_tensorboard(trainer, run_dir) -> None:
    """TensorBoard's event files go to ``RUN_DIR/tensorboard`` (its callback would pick
    ``checkpoints/runs/<date>``, which checkpoint rotation does not touch but nobody would look in)."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(tensorboard_dir(run_dir))


_dashboard: dict = {}  # the one Trackio dashboard this process serves: {"url", "seconds"}


def trackio_dashboard() -> dict:
    """Start Trackio's dashboard (every run logged with report_to trackio) on this machine, once and
    only when asked, so the app's own start pays nothing for it; returns ``{"url", "seconds"}`` (the
    time its start took). The address is the machine's own (127.0.0.1): reachable from this machine."""
    if not _dashboard:
        check(["trackio"])
        setup(["trackio"])
        import time

        t0 = time.perf_counter()
        import trackio

        _, url, _, _ = trackio.show(project=PROJECT, open_browser=False, block_thread=False)
        _dashboard.update(url=f"{url.rstrip('/')}/?project={PROJECT}", seconds=round(time.perf_counter() - t0, 2))
    return dict(_dashboard)
