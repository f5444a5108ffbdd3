"""The queue's database never loses its records (backend/jobs.py): a damaged or emptied database is
restored from its backup and kept aside, backups are rotated instead of shrunk, and run folders
without a record are listed again. Each restart is a fresh ``Queue`` on the same paths, the way the
app starts. No training: the specs name a model that is never loaded.
"""

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from backend.jobs import BACKUPS_KEPT, Queue
from backend.presets import build_spec
from backend.runs import RunFolder


def spec():
    return build_spec({"model": "/nowhere/model", "data": "/nowhere/data.json", "method": "lora"})


@pytest.fixture
def paths(tmp_path):
    """db_path, runs_root, backup_path: the database on "local disk", the rest on "the mount"."""
    return tmp_path / "local" / "jobs.sqlite3", tmp_path / "mount" / "runs", tmp_path / "mount" / "jobs-backup.sqlite3"


def restart(paths) -> Queue:
    db_path, runs_root, backup = paths
    return Queue(db_path, runs_root, backup_path=backup)


def run_ids(db: Path) -> list[str]:
    with closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT run_id FROM jobs ORDER BY id")]


def eight_runs(queue: Queue) -> dict[str, str]:
    """8 runs of two owners in several states: {run_id: state}."""
    made = [queue.submit(spec(), owner=("ann", "bob")[i % 2], name=f"run {i}") for i in range(8)]
    for job in made[:3]:
        queue.cancel(job.run_id, admin=True)
    queue.resume(made[0].run_id, admin=True)
    return {j.run_id: j.state for j in queue.list()}


def damage(db: Path, how: str) -> bytes:
    """What the probe did to the file: truncated to 0 bytes, or garbage written over its pages (the
    header kept, or all of it)."""
    size = db.stat().st_size
    keep = {"truncated": 0, "garbage": 100, "not a database": 0}[how]
    garbage = random.Random(0).randbytes(size - keep) if how != "truncated" else b""
    db.write_bytes(db.read_bytes()[:keep] + garbage)
    return db.read_bytes()


def checkpoint(queue: Queue) -> None:
    """Write the WAL into the database file, so damaging the file damages the records."""
    with closing(sqlite3.connect(queue.db_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@pytest.mark.parametrize("how", ["truncated", "garbage", "not a database"])
def test_a_damaged_database_is_restored_from_the_backup_and_kept_aside(paths, how, caplog):
    first = restart(paths)
    before = eight_runs(first)
    checkpoint(first)
    damaged = damage(paths[0], how)

    with caplog.at_level(logging.WARNING, logger="backend.jobs"):
        second = restart(paths)  # the app starts again: it neither dies nor starts empty
    assert {j.run_id: j.state for j in second.list()} == before
    assert {j.owner for j in second.list()} == {"ann", "bob"}
    [notice] = second.startup_notices
    what = {"truncated": "empty (0 bytes)", "garbage": "damaged (database disk image is malformed)",
            "not a database": "damaged (file is not a database)"}[how]
    assert notice.startswith(f"The job queue's database was {what}; restored 8 runs from the backup of ")
    [aside] = paths[0].parent.glob("jobs.sqlite3.damaged-*")
    assert aside.read_bytes() == damaged and f"the damaged file is kept as {aside.name}." in notice
    assert str(paths[0].parent) not in notice  # no server paths for the UI
    assert notice in caplog.text and str(paths[2]) in caplog.text  # the log says it too, with the paths

    job = second.submit(spec(), owner="ann")  # the first submit after the restore loses nothing
    assert run_ids(paths[2]) == [*before, job.run_id]
    assert restart(paths).startup_notices == []  # sound again: nothing to say


def test_a_damaged_database_without_a_backup_is_rebuilt_from_the_run_folders(tmp_path):
    db_path, runs_root = tmp_path / "jobs.sqlite3", tmp_path / "runs"
    first = Queue(db_path, runs_root)  # STUDIO_HOME on local disk: no backup
    before = eight_runs(first)
    checkpoint(first)
    damage(db_path, "garbage")

    second = Queue(db_path, runs_root)
    assert {j.run_id: j.state for j in second.list()} == before
    assert [j.run_id for j in second.list(owner="ann")] == list(before)[::2]
    damaged, listed = second.startup_notices
    assert damaged.startswith("The job queue's database was damaged (database disk image is malformed); "
                              "no backup to restore, so the queue starts empty")
    assert "the damaged file is kept as jobs.sqlite3.damaged-" in damaged
    assert listed == ("Listed again from their folders: 8 runs that had no record in the job queue "
                      "(2 cancelled, 6 queued).")


def test_runs_without_a_record_are_listed_again_with_owner_and_state(paths, caplog):
    queue = restart(paths)
    queued, running, done, resumed = (queue.submit(spec(), owner="ann") for _ in range(4))
    RunFolder(running.run_dir).set_status("running", attempt=1, started_at=time.time())
    RunFolder(done.run_dir).set_status("completed", attempt=1, ended_at=time.time())
    Path(resumed.run_dir, "checkpoints", "checkpoint-2").mkdir(parents=True)
    Path(resumed.run_dir, "checkpoints", "checkpoint-2", "COMPLETE").touch()
    (paths[1] / "not-a-run").mkdir()  # no config.yaml: ignored
    unowned = paths[1] / "no-status"
    unowned.mkdir()
    (unowned / "config.yaml").write_text(Path(done.run_dir, "config.yaml").read_text())
    for db in (paths[0], paths[2]):  # every record lost, the backup's too
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("DELETE FROM jobs")

    with caplog.at_level(logging.WARNING, logger="backend.jobs"):
        again = restart(paths)
    got = {j.run_id: j for j in again.list()}
    assert list(got) == [queued.run_id, running.run_id, done.run_id, resumed.run_id]  # queue order kept
    assert {j.owner for j in got.values()} == {"ann"}
    assert got[queued.run_id].state == "queued" and not got[queued.run_id].resume
    assert got[resumed.run_id].state == "queued" and got[resumed.run_id].resume  # continues from checkpoint-2
    assert got[done.run_id].state == "completed" and got[done.run_id].attempts == 1
    gone = got[running.run_id]  # no process trains it: settled the way recover() settles it
    assert gone.state == "interrupted" and "resume continues" in gone.error and gone.pid is None
    assert RunFolder(running.run_dir).status()["state"] == "interrupted"
    assert again.startup_notices == ["Listed again from their folders: 4 runs that had no record in the job "
                                     "queue (1 completed, 1 interrupted, 2 queued)."]
    assert "no status.json saying whose they are, not listed: no-status" in caplog.text  # no owner: not shown
    again.resume(running.run_id, user="ann")  # usable like any other row
    with pytest.raises(PermissionError):
        again.cancel(queued.run_id, user="bob")  # the owner came back with it
    assert restart(paths).startup_notices == []  # listed once


def test_a_live_trainer_without_a_record_is_watched_not_started_again(paths):
    queue = restart(paths)
    job = queue.submit(spec(), owner="ann")
    RunFolder(job.run_dir).set_status("running", attempt=1)
    config = str(Path(job.run_dir) / "config.yaml")  # the worker's command line names the run's config
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--config", config],
                               env=dict(os.environ, CUDA_VISIBLE_DEVICES="1"), start_new_session=True)
    try:
        for db in (paths[0], paths[2]):
            with closing(sqlite3.connect(db)) as conn, conn:
                conn.execute("DELETE FROM jobs")
        again = restart(paths)
        row = again.get(job.run_id)
        assert (row.state, row.pid, row.device) == ("running", trainer.pid, "1")
        assert again.recover() == [] and again.claim("cpu", lambda j: pytest.fail("started twice")) is None
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    assert [j.state for j in again.recover()] == ["interrupted"]  # then settled like any lost process


def test_a_submit_racing_a_start_is_inserted_once(paths, monkeypatch):
    """A Queue starting between a submit's status.json and its insert lists the folder first; the
    submit still succeeds, with its own settings, and the run is there once."""
    queue = restart(paths)
    original, starts = RunFolder.set_status, []

    def set_status(self, state=None, **fields):
        out = original(self, state, **fields)
        if state == "queued" and not starts:
            starts.append(restart(paths))  # the other start, at the worst moment
        return out

    monkeypatch.setattr(RunFolder, "set_status", set_status)
    job = queue.submit(spec(), owner="ann", auto_resume=True)
    assert starts[0].startup_notices == ["Listed again from their folders: 1 run that had no record in the "
                                         "job queue (1 queued)."]
    assert [(j.run_id, j.owner, j.auto_resume) for j in queue.list()] == [(job.run_id, "ann", True)]
    assert Path(job.run_dir, "config.yaml").exists()


def test_backups_are_rotated_instead_of_shrunk(paths):
    queue = restart(paths)
    a, b, c = (queue.submit(spec()) for _ in range(3))
    assert run_ids(paths[2]) == [a.run_id, b.run_id, c.run_id]
    assert not list(paths[2].parent.glob("jobs-backup.sqlite3.*"))  # growing: nothing rotated

    queue.delete(c.run_id)  # a legitimate delete shrinks the database: the old backup moves to .1
    rotated = paths[2].with_name("jobs-backup.sqlite3.1")
    assert run_ids(paths[2]) == [a.run_id, b.run_id] and run_ids(rotated) == [a.run_id, b.run_id, c.run_id]

    # the old failure: the local database replaced by an empty one, then a submit
    with closing(sqlite3.connect(paths[0])) as conn, conn:
        conn.execute("DELETE FROM jobs")
    shutil_rmtree(a.run_dir, b.run_dir)  # (their folders gone too: nothing to list again)
    d = queue.submit(spec())
    assert run_ids(paths[2]) == [d.run_id]
    assert run_ids(rotated) == [a.run_id, b.run_id]
    assert run_ids(paths[2].with_name("jobs-backup.sqlite3.2")) == [a.run_id, b.run_id, c.run_id]

    for _ in range(BACKUPS_KEPT + 2):  # a fixed number is kept
        queue.delete(queue.submit(spec()).run_id)
    names = sorted(p.name for p in paths[2].parent.glob("jobs-backup.sqlite3*"))
    assert names == ["jobs-backup.sqlite3", *(f"jobs-backup.sqlite3.{i}" for i in range(1, BACKUPS_KEPT + 1))]


def test_the_newest_sound_backup_is_restored(paths):
    queue = restart(paths)
    a, b = queue.submit(spec()), queue.submit(spec())
    queue.delete(b.run_id)  # .1 holds a and b, the backup a only
    damage(paths[2], "garbage")
    paths[0].unlink()
    again = restart(paths)
    assert [j.run_id for j in again.list()] == [a.run_id, b.run_id]
    [notice] = again.startup_notices
    assert notice.startswith("The job queue's database was not on this disk (a new container, or it was "
                             "deleted); restored 2 runs from the backup of ")
    assert "(jobs-backup.sqlite3.1: the newer copies are damaged)" in notice

    damage(paths[0], "truncated")  # and when every backup is damaged: kept, started empty, said
    for backup in paths[2].parent.glob("jobs-backup.sqlite3*"):
        damage(backup, "garbage")
    shutil_rmtree(a.run_dir)
    last = restart(paths)
    assert last.list() == [] and "its 2 backup(s) are damaged too" in last.startup_notices[0]


def test_a_first_start_says_nothing(paths, tmp_path):
    assert restart(paths).startup_notices == []
    assert Queue(tmp_path / "other.sqlite3", tmp_path / "other-runs").startup_notices == []


def shutil_rmtree(*dirs):
    import shutil

    for d in dirs:
        shutil.rmtree(d)
