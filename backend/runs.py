"""The run folder (DESIGN.md, contract 2): everything a run is, readable from the folder alone.

    RUN_DIR/config.yaml     resolved RunSpec         RUN_DIR/status.json   state and progress
    RUN_DIR/metrics.jsonl   one object per log line  RUN_DIR/checkpoints/  resumable checkpoints
    RUN_DIR/adapter/        LoRA/QLoRA result        RUN_DIR/model/        full fine-tuning result
    RUN_DIR/data/           the train/val split used RUN_DIR/train.log     the trainer's log

A checkpoint counts only once ``COMPLETE`` is written into it, after the Trainer has finished
saving it, so a process killed mid-save never leaves a checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from .config import RunSpec

STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
COMPLETE_MARK = "COMPLETE"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: readers see the old file or
    the new one, never half of it (a kill mid-write, another thread writing at once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths
    config_path = property(lambda self: self.path / "config.yaml")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    model_dir = property(lambda self: self.path / "model")
    data_dir = property(lambda self: self.path / "data")
    log_path = property(lambda self: self.path / "train.log")

    def exists(self) -> bool:
        return self.config_path.exists()

    # config
    def write_config(self, spec: RunSpec) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        spec.save(self.config_path)

    def spec(self) -> RunSpec:
        return RunSpec.load(self.config_path)

    # status
    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"state": "queued" if self.exists() else "missing"}

    def add_notices(self, notices: list[str]) -> dict:
        """Append notices to status.json, keeping the ones already there (no duplicates)."""
        have = self.status().get("notices") or []
        return self.set_status(notices=have + [n for n in notices if n not in have])

    def set_status(self, state: str | None = None, **fields) -> dict:
        status = self.status()
        if state is not None:
            assert state in STATES, state
            status["state"] = state
        status.update(fields)
        status["updated_at"] = time.time()
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.status_path, json.dumps(status, ensure_ascii=False, indent=1))
        return status

    # metrics
    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill mid-write
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step``: on resume those steps are trained again."""
        kept = [m for m in self.metrics() if m.get("step", 0) <= after_step]
        write_atomic(self.metrics_path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in kept))

    # checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*") if (p / COMPLETE_MARK).exists()]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # result
    def result_dir(self) -> Path | None:
        for d in (self.adapter_dir, self.model_dir):
            if d.exists() and any(d.glob("*.safetensors")):
                return d
        return None


def overfitting_signal(metrics: list[dict], rises: int = 2) -> str | None:
    """A warning when eval loss has risen ``rises`` evaluations in a row while the train loss over
    the same steps fell: the model is memorising its training rows."""
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if len(evals) < rises + 1:
        return None
    window = evals[-(rises + 1):]
    if not all(b[1] > a[1] for a, b in zip(window, window[1:])):
        return None
    start, end = window[0][0], window[-1][0]
    before = [m["loss"] for m in metrics if "loss" in m and m["step"] <= start]
    during = [m["loss"] for m in metrics if "loss" in m and start < m["step"] <= end]
    if not before or not during or sum(during) / len(during) >= sum(before[-len(during):]) / len(before[-len(during):]):
        return None
    return (f"overfitting: eval loss rose from {window[0][1]:.3f} to {window[-1][1]:.3f} since step {start} "
            f"while train loss fell; try early_stopping_patience, fewer epochs, more data or augmentation")


def format_duration(seconds) -> str:
    """``75`` -> ``1m15s``, ``4000`` -> ``1h06m``; None -> ``–``."""
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
