"""report_to: TensorBoard and Trackio get the Trainer's loss scalars, offline, read back with their own
readers; a tracker that cannot be used is one clear error before anything loads."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_spec

from backend import trackers
from backend import train as train_mod
from backend.runs import RunFolder


def test_tensorboard_and_trackio_hold_the_loss_scalars_of_metrics_jsonl(tmp_path, tiny_model_dir, tiny_data):
    home = tmp_path / "home"
    env = dict(os.environ, STUDIO_HOME=str(home))
    env.pop("TRACKIO_DIR", None)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "backend", "train", "--data", str(tiny_data), "--out", str(run_dir),
                           "--model", str(tiny_model_dir), "--set", "report_to=[tensorboard,trackio]",
                           "--set", "learning_rate=5e-2", "--set", "num_train_epochs=1",
                           "--set", "mix_data=none", "--set", "measure_forgetting=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = RunFolder(run_dir).metrics()
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    eval_losses = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert losses and eval_losses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trackers.tensorboard_dir(run_dir))).Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)
    assert {e.step: e.value for e in events.Scalars("eval/loss")} == pytest.approx(eval_losses)

    # Trackio's local store, read by Trackio itself in a fresh process (it fixes its folder at import)
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps(S.get_logs({trackers.PROJECT!r}, {run_dir.name!r})))")
    out = subprocess.run([sys.executable, "-c", read], env=dict(env, TRACKIO_DIR=str(home / "trackio")),
                         capture_output=True, text=True, check=True, timeout=120).stdout
    logs = json.loads(out.strip().splitlines()[-1])
    # the Trainer's step is the metric train/global_step (Trackio numbers its own log calls)
    assert {r["train/global_step"]: r["train/loss"] for r in logs if "train/loss" in r} == pytest.approx(losses)
    assert {r["train/global_step"]: r["eval/loss"] for r in logs if "eval/loss" in r} == pytest.approx(eval_losses)
    assert (home / "trackio").is_dir()  # under STUDIO_HOME, not the user's cache


def test_a_tracker_that_is_not_installed_is_one_error_naming_the_package(monkeypatch, tmp_path, tiny_model_dir,
                                                                         tiny_data):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    spec = tiny_spec(tiny_model_dir, tiny_data, report_to=["tensorboard", "mlflow"])
    with pytest.raises(trackers.TrackerError, match=r"^report_to mlflow: the package is not installed "
                                                    r"\(pip install mlflow\)$"):
        train_mod.train(spec, tmp_path / "run")
    assert "pip install mlflow" in RunFolder(tmp_path / "run").status()["error"]


def test_wandb_needs_its_key_in_the_environment(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(trackers.TrackerError, match="WANDB_API_KEY in the environment"):
        trackers.check(["wandb"])
    monkeypatch.setenv("WANDB_API_KEY", "secret-from-env")
    trackers.check(["wandb"])


def test_report_to_is_the_trainers_key_and_takes_only_known_trackers(tiny_model_dir, tiny_data):
    from backend.config import ConfigError

    assert tiny_spec(tiny_model_dir, tiny_data, report_to="tensorboard").train.report_to == ["tensorboard"]
    assert tiny_spec(tiny_model_dir, tiny_data, report_to="none").train.report_to == []
    with pytest.raises(ConfigError, match="report_to must be a list of tensorboard, trackio, wandb, mlflow"):
        tiny_spec(tiny_model_dir, tiny_data, report_to=["comet"])
