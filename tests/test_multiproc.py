"""Several processes through the worker's launcher: ``accelerate launch`` with presets/accelerate/ddp.yaml.

Without a GPU the processes train on the CPU and talk over gloo (accelerate's ``--cpu`` would start one
process only, so the DDP config is used there too). Two processes with half the per-device batch take
the same global batch as one, so with the same seed and no dropout every step's loss must match. The
optimizer is plain SGD without clipping: AdamW would hide a gradient off by the number of processes.
"""

import pytest
from conftest import wait_for

from backend import jobs
from backend.jobs import Queue, Worker
from backend.presets import build_spec
from backend.runs import RunFolder


@pytest.fixture
def queue(tmp_path):
    return Queue(tmp_path / "jobs.sqlite3", tmp_path / "runs")


def test_two_gloo_processes_match_one_process_step_by_step(queue, tiny_model_dir, tiny_data, monkeypatch):
    def spec(batch):
        return build_spec({"model": str(tiny_model_dir), "data": str(tiny_data), "method": "lora", "max_steps": 4,
                           "save_steps": 100, "target_modules": "all-linear", "lora_dropout": 0.0, "optim": "sgd",
                           "learning_rate": 0.5, "max_grad_norm": 0, "warmup_steps": 0, "val_size": 0, "seed": 3,
                           "per_device_train_batch_size": batch, "mix_data": "none"})  # a random model's replay is noise

    # The run asks for 2 processes; until backend/config.py has `num_processes`, through launch_settings.
    monkeypatch.setattr(jobs, "launch_settings", lambda s: (4 // s.train.per_device_train_batch_size, "ddp"))
    one, two = queue.submit(spec(4), name="one process"), queue.submit(spec(2), name="two processes")
    worker = Worker(queue, devices=["cpu"], poll_s=0.1).start()
    try:
        wait_for(lambda: all(j.state in ("completed", "failed") for j in queue.list()), timeout=300, what="both runs")
    finally:
        worker.stop()
    one, two = queue.get(one.run_id), queue.get(two.run_id)
    log = (RunFolder(two.run_dir).log_path).read_text()
    assert one.state == two.state == "completed", log[-3000:]
    assert "accelerate.commands.launch" in log and "--num_processes 2" in log  # the worker's own launcher

    runs = RunFolder(one.run_dir), RunFolder(two.run_dir)
    assert [r.status()["world_size"] for r in runs] == [1, 2]
    losses = [[(m["step"], m["loss"]) for m in r.metrics() if "loss" in m] for r in runs]
    assert [s for s, _ in losses[1]] == [1, 2, 3, 4]  # one line per step: rank 0 alone writes the folder
    assert [s for s, _ in losses[0]] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(*losses):
        assert abs(a - b) < 1e-4, (step, a, b)
    assert losses[0][-1][1] < losses[0][0][1] - 0.5  # it learned: the comparison is not between two idle runs
    assert runs[1].result_dir() is not None
