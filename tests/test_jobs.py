"""backend/jobs.py: the persistent queue and its worker.

Real training subprocesses on the tiny model for order, restart, kill -9 + resume and cancel; a
small fake trainer script (``FAKE``) for what needs no training: out-of-memory retries, ownership,
pid reuse, one job per device.
"""

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from conftest import wait_for

from backend.jobs import JobError, Queue, Worker, _alive
from backend.presets import build_spec
from backend.runs import RunFolder

# A stand-in for `python -m backend train`: argv = RUN_DIR MODE [ARG]. It overwrites `notices`
# the way train.py does, so the queue's own notices must survive that.
FAKE = r'''
import os, sys, time
from backend.runs import RunFolder

run, mode = RunFolder(sys.argv[1]), sys.argv[2]
arg = sys.argv[3] if len(sys.argv) > 3 else ""
run.set_status("running", notices=["fake trainer notice"])
with open(run.path.parent / "ran.txt", "a") as f:
    f.write(f"{run.path.name} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
if mode == "oom":  # out of memory while the batch is above ARG
    batch = run.spec().train.per_device_train_batch_size
    if batch > int(arg):
        run.set_status("failed", ended_at=time.time(), error="OutOfMemoryError: CUDA out of memory. "
                       "Tried to allocate 2.00 GiB")
        sys.exit(1)
elif mode == "sleep":
    time.sleep(float(arg))
run.set_status("completed", ended_at=time.time())
'''


def state(queue, job):
    return queue.get(job.run_id).state


def loss_steps(job):
    return [m["step"] for m in RunFolder(job.run_dir).metrics() if "loss" in m]


def log_text(job):
    return (Path(job.run_dir) / "train.log").read_text(errors="replace")


@pytest.fixture
def db(tmp_path):
    """(db_path, runs_root); at the end, no process started here survives the test."""
    paths = (tmp_path / "jobs.sqlite3", tmp_path / "runs")
    workers = []
    yield paths, workers
    for w in workers:
        w.stop()
    for job in Queue(*paths).list():
        if job.state == "running" and job.pid != os.getpid() and _alive(job.pid, job.pid_start):
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_worker(db, queue, **kw):
    worker = Worker(queue, devices=kw.pop("devices", ["cpu"]), poll_s=0.05, **kw).start()
    db[1].append(worker)
    return worker


@pytest.fixture
def tiny(tiny_model_dir, tiny_data):
    def spec(**overrides):
        values = {"model": str(tiny_model_dir), "data": str(tiny_data), "method": "lora", "max_steps": 2,
                  "save_steps": 2, "target_modules": "all-linear", "learning_rate": 1e-2,
                  "per_device_train_batch_size": 2, "val_size": 0}
        values.update(overrides)
        return build_spec(values)
    return spec


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)

    def command(mode, arg=""):
        return lambda job: [sys.executable, str(script), job.run_dir, mode, str(arg)]
    return command


# -- real training --------------------------------------------------------------------------------
def test_queued_jobs_run_once_in_order_across_a_restart(db, tiny):
    first = Queue(*db[0])
    a = first.submit(tiny(max_steps=6), owner="ann", name="First run")
    b = first.submit(tiny())
    assert "-first-run-" in a.run_id and "-lora-" in b.run_id
    assert RunFolder(a.run_dir).status()["state"] == "queued" and RunFolder(b.run_dir).spec().to_dict() == tiny().to_dict()

    w1 = start_worker(db, first)
    wait_for(lambda: state(first, a) == "running", what="a to start")
    w1.stop()  # the app goes away; a keeps training in its own session

    second = Queue(*db[0])  # the app starts again on the same database
    start_worker(db, second)
    assert state(second, a) == "running" and state(second, b) == "queued"  # a is alive: kept
    wait_for(lambda: state(second, b) == "completed", what="b to complete")

    a, b = second.get(a.run_id), second.get(b.run_id)
    assert a.state == "completed" and RunFolder(a.run_dir).status()["state"] == "completed"
    assert a.attempts == b.attempts == 1 and log_text(a).count("--- ") == 1  # each started once
    assert a.ended_at <= b.started_at  # in order, one at a time on the cpu
    assert loss_steps(a) == [1, 2, 3, 4, 5, 6] and loss_steps(b) == [1, 2]
    assert RunFolder(b.run_dir).result_dir() is not None and b.device == "cpu"


def test_kill_9_interrupts_and_resume_continues_from_the_checkpoint(db, tiny):
    queue = Queue(*db[0])
    job = queue.submit(tiny(max_steps=20, save_steps=2))
    run = RunFolder(job.run_dir)
    start_worker(db, queue)
    wait_for(lambda: run.latest_checkpoint(), what="a checkpoint")
    os.killpg(queue.get(job.run_id).pid, signal.SIGKILL)

    wait_for(lambda: state(queue, job) == "interrupted", what="interrupted")
    assert run.status()["state"] == "interrupted" and "SIGKILL" in queue.get(job.run_id).error
    assert run.result_dir() is None
    killed_at = int(run.latest_checkpoint().name.split("-")[1])
    assert killed_at < 20

    queue.resume(job.run_id)
    wait_for(lambda: state(queue, job) in ("completed", "failed"), what="the resumed run")
    job = queue.get(job.run_id)
    assert job.state == "completed" and job.attempts == 2, log_text(job)[-2000:]
    assert run.status()["resumed_from"] == f"checkpoint-{killed_at}" and "--resume" in log_text(job)
    assert loss_steps(job) == list(range(1, 21))  # contiguous, no step twice


def test_cancel_a_queued_job_and_a_running_one(db, tiny):
    queue = Queue(*db[0])
    running = queue.submit(tiny(max_steps=500, save_steps=1))
    waiting = queue.submit(tiny())
    worker = start_worker(db, queue)
    wait_for(lambda: RunFolder(running.run_dir).latest_checkpoint(), what="a checkpoint")

    assert queue.cancel(waiting.run_id).state == "cancelled"
    queue.cancel(running.run_id)
    wait_for(lambda: state(queue, running) == "cancelled", what="cancelled")
    run = RunFolder(running.run_dir)
    assert run.status()["state"] == "cancelled" and run.checkpoints()  # the last checkpoint stays
    assert queue.get(running.run_id).error == "cancelled by the user"

    worker.stop()
    worker.tick()  # one more pass, synchronously: nothing left to start
    waiting = queue.get(waiting.run_id)
    assert waiting.state == "cancelled" and waiting.attempts == 0 and waiting.started_at is None
    assert RunFolder(waiting.run_dir).status()["state"] == "cancelled"
    assert not (Path(waiting.run_dir) / "train.log").exists()  # never ran
    with pytest.raises(JobError):
        queue.cancel(waiting.run_id)


# -- fake trainer -----------------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_then_fails_at_one_and_the_queue_goes_on(db, tiny, fake):
    queue = Queue(*db[0])
    halves = queue.submit(tiny(per_device_train_batch_size=8, gradient_accumulation_steps=1))
    at_one = queue.submit(tiny(per_device_train_batch_size=1))
    after = queue.submit(tiny())
    limits = {halves.run_id: 2, at_one.run_id: 0, after.run_id: 8}
    command = {j: fake("oom", n) for j, n in limits.items()}
    start_worker(db, queue, command=lambda job: command[job.run_id](job))
    wait_for(lambda: state(queue, after) == "completed", what="the job after the failures")

    halves = queue.get(halves.run_id)
    spec = RunFolder(halves.run_dir).spec()
    assert halves.state == "completed" and halves.attempts == 3  # 8 -> 4 -> 2
    assert (spec.train.per_device_train_batch_size, spec.train.gradient_accumulation_steps) == (2, 4)
    notices = RunFolder(halves.run_dir).status()["notices"]
    assert notices[0] == "fake trainer notice" and len(notices) == 3  # kept, then the two retries
    assert "per_device_train_batch_size=4 and gradient_accumulation_steps=2" in notices[1]
    assert "effective batch 8" in notices[2]

    at_one = queue.get(at_one.run_id)
    assert at_one.state == "failed" and at_one.attempts == 1
    assert at_one.error.startswith("OutOfMemoryError")
    for tip in ("qlora", "max_length", "gradient_checkpointing"):
        assert tip in at_one.error and tip in RunFolder(at_one.run_dir).status()["error"]
    ran = [line.split()[0] for line in (Path(db[0][1]) / "ran.txt").read_text().splitlines()]
    assert ran == [halves.run_id] * 3 + [at_one.run_id, after.run_id]


def test_each_queued_job_runs_exactly_once_in_order_across_restarts(db, tiny, fake):
    first = Queue(*db[0])
    jobs = [first.submit(tiny()) for _ in range(5)]
    ran_txt = Path(db[0][1]) / "ran.txt"

    def ran():
        return ran_txt.read_text().splitlines() if ran_txt.exists() else []

    w1 = start_worker(db, first, command=fake("sleep", 0.3))
    wait_for(lambda: len(ran()) >= 2, what="two starts")
    w1.stop()
    second = Queue(*db[0])
    start_worker(db, second, command=fake("sleep", 0.3))
    wait_for(lambda: all(j.state == "completed" for j in second.list()), what="all completed")
    assert [line.split()[0] for line in ran()] == [j.run_id for j in jobs]
    assert all(j.attempts == 1 for j in second.list())


def test_one_job_at_a_time_per_device(db, tiny, fake):
    queue = Queue(*db[0])
    jobs = [queue.submit(tiny()) for _ in range(3)]
    start_worker(db, queue, devices=[0, 1], command=fake("sleep", 1))
    wait_for(lambda: all(j.state == "completed" for j in queue.list()), what="all completed")
    jobs = [queue.get(j.run_id) for j in jobs]
    assert {jobs[0].device, jobs[1].device} == {"0", "1"}
    assert jobs[1].started_at < jobs[0].ended_at  # both GPUs busy at once
    assert jobs[2].started_at >= min(jobs[0].ended_at, jobs[1].ended_at)  # the third waited for one
    seen = dict(line.split() for line in (Path(db[0][1]) / "ran.txt").read_text().splitlines())
    assert seen == {j.run_id: j.device for j in jobs}  # CUDA_VISIBLE_DEVICES as recorded


def test_ownership_and_delete(db, tiny, fake):
    queue = Queue(*db[0])
    mine = queue.submit(tiny(), owner="alice")
    anyones = queue.submit(tiny())
    assert [j.run_id for j in queue.list(owner="alice")] == [mine.run_id]
    for op in (queue.cancel, queue.delete, queue.resume):
        with pytest.raises(PermissionError):
            op(mine.run_id, user="bob")
    with pytest.raises(PermissionError):  # no owner (queued before a login was set up): the admin's
        queue.cancel(anyones.run_id, user="bob")
    queue.cancel(anyones.run_id, user="bob", admin=True)
    queue.resume(anyones.run_id)  # no user: the machine's owner (the CLI)
    assert queue.get(anyones.run_id).state == "queued" and queue.get(anyones.run_id).resume
    queue.cancel(anyones.run_id)  # out of the way of the worker below

    start_worker(db, queue, command=fake("sleep", 60))
    wait_for(lambda: state(queue, mine) == "running", what="running")
    with pytest.raises(JobError):
        queue.delete(mine.run_id, user="alice")
    queue.cancel(mine.run_id, user="bob", admin=True)  # SIGTERM kills the fake before it can say so
    wait_for(lambda: state(queue, mine) == "cancelled", what="cancelled")
    assert RunFolder(mine.run_dir).status()["state"] == "cancelled"

    queue.delete(mine.run_id, user="alice")
    assert not Path(mine.run_dir).exists() and [j.run_id for j in queue.list()] == [anyones.run_id]
    with pytest.raises(JobError):
        queue.get(mine.run_id)


def test_recover_settles_running_jobs_whose_process_is_gone(db, tiny):
    queue = Queue(*db[0])
    dead, reused, done, alive = (queue.submit(tiny(), auto_resume=i == 1) for i in range(4))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    with open(f"/proc/{os.getpid()}/stat") as f:
        my_start = int(f.read().rsplit(")", 1)[1].split()[19])
    rows = [(dead, finished.pid, None), (reused, os.getpid(), my_start + 1),  # pid reused by another
            (done, finished.pid, None), (alive, os.getpid(), my_start)]
    with sqlite3.connect(db[0][0]) as conn:
        for job, pid, start in rows:
            conn.execute("UPDATE jobs SET state='running', pid=?, pid_start=?, device='cpu' WHERE run_id=?",
                         (pid, start, job.run_id))
            RunFolder(job.run_dir).set_status("running")
    RunFolder(done.run_dir).set_status("completed", forgetting="measuring")  # killed while the meter ran

    settled = Queue(*db[0]).recover()  # a restart
    assert sorted(j.run_id for j in settled) == sorted(j.run_id for j in (dead, reused, done))
    assert state(queue, dead) == "interrupted" and RunFolder(dead.run_dir).status()["state"] == "interrupted"
    assert state(queue, reused) == "queued" and queue.get(reused.run_id).resume  # auto_resume
    assert state(queue, done) == "completed" and RunFolder(done.run_dir).status()["forgetting"] == "stopped"
    assert state(queue, alive) == "running"
    with sqlite3.connect(db[0][0]) as conn:  # leave nothing for the fixture to kill (it is us)
        conn.execute("UPDATE jobs SET state='interrupted' WHERE run_id=?", (alive.run_id,))


# -- deployment: the database on local disk, backed up to the mounted home; several GPUs per job ----
def test_the_queue_survives_losing_its_local_database(db, tiny, fake, tmp_path):
    backup = tmp_path / "mount" / "jobs-backup.sqlite3"
    first = Queue(*db[0], backup_path=backup)
    running, waiting = first.submit(tiny()), first.submit(tiny())
    with closing(sqlite3.connect(backup)) as conn:  # each change is copied at once
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2

    w1 = start_worker(db, first, command=fake("sleep", 2))
    wait_for(lambda: state(first, running) == "running", what="the first job to start")
    w1.stop()  # the app goes away and the container's disk with it
    pid = first.get(running.run_id).pid
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db[0][0]}{suffix}").unlink(missing_ok=True)

    second = Queue(*db[0], backup_path=backup)  # a new start: restored from the backup
    assert state(second, waiting) == "queued" and second.get(running.run_id).pid == pid
    start_worker(db, second, command=fake("sleep", 0))
    wait_for(lambda: all(j.state == "completed" for j in second.list()), what="both jobs to complete")
    assert [j.attempts for j in second.list()] == [1, 1]  # the running job was watched, not started again


def test_the_studio_home_goes_on_the_mount_and_the_database_stays_local(tmp_path, monkeypatch):
    from backend import paths

    mount, home = tmp_path / "data", tmp_path / "home"
    mount.mkdir()
    monkeypatch.setattr(paths, "MOUNT", mount)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("STUDIO_HOME", raising=False)
    monkeypatch.delenv("STUDIO_LOCAL_HOME", raising=False)
    assert paths.studio_home() == mount / "finetune-studio"
    assert paths.local_home() == home / ".cache" / "finetune-studio"
    queue = Queue()
    assert queue.db_path == home / ".cache" / "finetune-studio" / "jobs.sqlite3"
    assert queue.backup_path == mount / "finetune-studio" / "jobs-backup.sqlite3" and queue.backup_path.exists()
    assert queue.runs_root == mount / "finetune-studio" / "runs"

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "mine"))  # set by hand: used as it is, no backup
    assert paths.studio_home() == paths.local_home() == tmp_path / "mine"
    assert Queue().backup_path is None
    monkeypatch.delenv("STUDIO_HOME")
    monkeypatch.setattr(paths, "MOUNT", tmp_path / "absent")  # no /data: the home's usual place
    assert paths.studio_home() == paths.local_home() == home / ".cache" / "finetune-studio"


def test_a_job_gets_the_gpus_it_asks_for(db, tiny, fake, monkeypatch):
    from backend import jobs

    queue = Queue(*db[0])
    # each run asks for `seed` GPUs (the config key num_processes is read through launch_settings)
    monkeypatch.setattr(jobs, "launch_settings", lambda spec: (spec.train.seed, "ddp"))
    one, two, three, four = (queue.submit(tiny(seed=n)) for n in (1, 2, 3, 4))
    start_worker(db, queue, devices=[0, 1, 2], command=fake("sleep", 1))
    wait_for(lambda: state(queue, three) == "completed", what="the 3-GPU job")
    one, two, three, four = (queue.get(j.run_id) for j in (one, two, three, four))
    assert (one.device, two.device, three.device) == ("0", "1,2", "0,1,2")
    assert two.started_at < one.ended_at  # 1 + 2 GPUs at once
    assert three.started_at >= max(one.ended_at, two.ended_at)  # waited for all three
    assert four.state == "failed" and "asks for 4 GPUs" in four.error and "has 3" in four.error
    seen = dict(line.split() for line in (Path(db[0][1]) / "ran.txt").read_text().splitlines())
    assert seen == {j.run_id: j.device for j in (one, two, three)}  # CUDA_VISIBLE_DEVICES


def test_launch_command_runs_the_cli_alone_or_under_accelerate(tmp_path):
    from backend.jobs import launch_command

    config = tmp_path / "config.yaml"
    assert launch_command(config) == [sys.executable, "-m", "backend", "train", "--config", str(config)]
    argv = launch_command(config, resume=True, num_processes=4, accelerate_config="fsdp")
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert Path(argv[argv.index("--config_file") + 1]).name == "fsdp.yaml"
    assert argv[argv.index("--num_processes") + 1] == "4" and "--main_process_port" in argv
    assert argv[-6:] == ["-m", "backend", "train", "--config", str(config), "--resume"]
    with pytest.raises(JobError, match="ddp, deepspeed-zero2, deepspeed-zero3, fsdp"):
        launch_command(config, num_processes=2, accelerate_config="zero9")


def test_the_shipped_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    from backend.jobs import ACCELERATE_CONFIGS

    kinds = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert {k: c.distributed_type.value for k, c in kinds.items()} == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED"}
    assert kinds["deepspeed-zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["deepspeed-zero3"].deepspeed_config["zero_stage"] == 3
    assert all(c.num_machines == 1 and not c.use_cpu for c in kinds.values())
