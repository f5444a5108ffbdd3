"""What a tracker in ``report_to`` costs a run: its import, and each logged step.

    python bench/tracker_cost.py [--steps 200]

* import: seconds to import the tracker in a fresh process that has already imported torch and
  transformers (as a training process has), median of 3 processes;
* per step: the tracker's transformers callback ``on_log`` with a typical training log (loss,
  learning rate, grad norm, epoch), mean over ``--steps`` calls; Trackio logs in a background
  thread, so its figure is the training thread's share, and ``finish`` (the flush at the end) is
  reported apart.

Everything is written to a temporary folder (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = {"tensorboard": "from torch.utils.tensorboard import SummaryWriter", "trackio": "import trackio"}


def import_seconds(name: str, rounds: int = 3) -> float:
    code = ("import time, torch, transformers; t = time.perf_counter(); " + IMPORTS[name]
            + "; print(time.perf_counter() - t)")
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                  check=True).stdout.split()[-1]) for _ in range(rounds))


def step_seconds(name: str, steps: int, folder: str) -> dict:
    """Mean seconds of one ``on_log`` of the tracker's callback, and its end-of-training cost."""
    os.environ["TRACKIO_DIR"] = os.path.join(folder, "trackio")
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import TensorBoardCallback, TrackioCallback

    args = TrainingArguments(output_dir=folder, report_to=[], run_name=f"cost-{name}", project="cost")
    state, control = TrainerState(), TrainerControl()
    callback = TensorBoardCallback() if name == "tensorboard" else TrackioCallback()
    if name == "tensorboard":
        callback.logging_dir = os.path.join(folder, "tb")
        callback.on_train_begin(args, state, control)
    else:
        import torch

        callback.setup(args, state, torch.nn.Linear(2, 2))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": 1.0 / step, "learning_rate": 1e-4, "grad_norm": 0.5,
                                                     "epoch": step / steps})
    per_step = (time.perf_counter() - t0) / steps
    t1 = time.perf_counter()
    callback.on_train_end(args, state, control)
    return {"per_step_ms": round(1000 * per_step, 3), "end_s": round(time.perf_counter() - t1, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: the per-step measure of one tracker
    a = p.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(step_seconds(a.one, a.steps, folder)))
        return
    rows = {}
    for name in IMPORTS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True).stdout
        rows[name] = {"import_s": round(import_seconds(name), 2), **json.loads(out.strip().splitlines()[-1])}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
