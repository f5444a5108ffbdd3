"""The run queue: a persistent job list (SQLite) and a worker that trains one job per device.

Two sources of truth, each for what it knows best:

* the **run folder** (``backend.runs``, DESIGN.md contract 2) says how a run is going: the trainer
  writes ``status.json`` and ``metrics.jsonl`` there, and the UI polls them;
* the **database** (``jobs.sqlite3`` in ``paths.local_home()``, table ``jobs``) says what waits, in
  which order (``id``), which process runs what (``pid``, ``device``), and who owns it. SQLite must
  not run over a network mount, so the database stays on local disk; when the studio home is a
  mounted volume (``/data`` on a Space) every change is copied there with SQLite's backup API
  (``jobs-backup.sqlite3``), and a start without the local database restores it from that copy.

The database never loses its records silently. At each start (``Queue()``):

* the local database is checked (``PRAGMA integrity_check``, and a ``jobs`` table). A missing,
  empty or damaged one is replaced by the newest backup that passes the same check; a damaged or
  empty file is first kept aside as ``jobs.sqlite3.damaged-<time>`` (with its ``-wal``/``-shm``);
* run folders under ``runs_root`` that have no row (a database lost without a backup, or a backup
  older than the run) are listed again from ``config.yaml`` and ``status.json``: a ``running``
  folder whose trainer still runs is watched, one whose trainer is gone is ``interrupted``, the way
  ``recover`` settles it;
* what was repaired is logged and kept in ``Queue.startup_notices`` for the UI.

A copy that would lose records (a delete, or a database that came back smaller) first moves the
previous backup to ``jobs-backup.sqlite3.1`` (``.1`` to ``.2``, ..., ``BACKUPS_KEPT`` of them).

Life of a job::

    submit -> queued -> running -> completed | failed | cancelled | interrupted
                 ^                                  |          |           |
                 +------------- resume -------------+----------+-----------+
                 +-- out of memory: half the batch, twice the accumulation, again

* ``Queue.submit`` writes ``config.yaml`` and ``status.json`` (``queued``) and inserts the row.
* ``Worker`` (a thread) takes queued jobs in ``id`` order, one per device, and runs each as
  ``python -m backend train --config RUN/config.yaml [--resume]`` in its own process group, output
  appended to ``RUN/train.log``. A run asking for ``num_processes`` > 1 waits until that many GPUs
  are free and runs under ``accelerate launch`` with a config from ``presets/accelerate/`` (DDP,
  FSDP, DeepSpeed ZeRO-2/3; ``launch_command``); on a machine without a GPU, as that many gloo
  processes on the CPU. A job is claimed inside one write transaction that succeeds only
  while its row is still ``queued`` and that stores the pid before committing, so a job never runs
  twice and a committed ``running`` row always names its process.
* When the process ends, the final state is the one ``status.json`` gives (the trainer writes
  ``completed``, ``failed`` with the error, or ``cancelled`` on SIGTERM). A process that ended with
  ``status.json`` still ``running`` was killed (``kill -9``, a crash of the machine): ``interrupted``;
  or, if it exited with an error code before training (a bad config), ``failed`` with the last line
  of ``train.log``.
  ``Queue.resume`` queues it again with ``--resume``, which continues from the last complete
  checkpoint.
* A run that failed out of memory is queued again with ``per_device_train_batch_size`` halved and
  ``gradient_accumulation_steps`` doubled (the same effective batch), noted in ``status.json``'s
  ``notices``; at batch 1 it fails with what to try instead.
* ``Queue.recover`` (run when a worker starts, and on every worker tick for processes a worker in
  this process did not start) turns ``running`` rows whose process is gone into their final state;
  with ``auto_resume`` an interrupted job goes back into the queue. A pid counts as alive only if
  the process has the start time recorded at launch, so a reused pid is not mistaken for the run.
  Processes outlive the app (their own session): after a restart they keep their device and are
  watched until they end.

Every operation opens its own connection (WAL, short busy timeout), so the UI thread and the worker
thread share a ``Queue`` safely. ``attempts`` counts how many times a job has been started.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .access import Caller, job_for
from .config import RunSpec
from .paths import local_home, studio_home
from .runs import STATES, RunFolder

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository: the training subprocess's cwd
RESUMABLE = ("failed", "cancelled", "interrupted")
ACCELERATE_CONFIGS = ROOT / "presets" / "accelerate"  # <name>.yaml: ddp, fsdp, deepspeed-zero2, deepspeed-zero3
_BACKUP_LOCK = threading.Lock()  # one snapshot at a time, so an older one never replaces a newer one
BACKUPS_KEPT = 3  # jobs-backup.sqlite3.1 .. .3: the copies a shrinking change pushed aside, newest first

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,   -- queue order
    run_id           TEXT NOT NULL UNIQUE,
    run_dir          TEXT NOT NULL,
    owner            TEXT NOT NULL DEFAULT '',
    state            TEXT NOT NULL,
    pid              INTEGER,                             -- also the process group id
    pid_start        INTEGER,                             -- its start time (/proc/PID/stat), against pid reuse
    attempts         INTEGER NOT NULL DEFAULT 0,          -- times started
    auto_resume      INTEGER NOT NULL DEFAULT 0,
    resume           INTEGER NOT NULL DEFAULT 0,          -- next start passes --resume
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    started_at       REAL,
    ended_at         REAL,
    error            TEXT,
    device           TEXT,                                -- CUDA_VISIBLE_DEVICES value, or 'cpu'
    notices          TEXT NOT NULL DEFAULT '[]'           -- the queue's own notes (JSON list)
)
"""


class JobError(ValueError):
    """An operation that does not fit the job's state (or a job that does not exist)."""


@dataclass
class Job:
    """One row of the ``jobs`` table."""

    id: int
    run_id: str
    run_dir: str
    owner: str
    state: str
    pid: int | None
    pid_start: int | None
    attempts: int
    auto_resume: bool
    resume: bool
    cancel_requested: bool
    created_at: float
    started_at: float | None
    ended_at: float | None
    error: str | None
    device: str | None
    notices: list = field(default_factory=list)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        for key in ("auto_resume", "resume", "cancel_requested"):
            d[key] = bool(d[key])
        d["notices"] = json.loads(d["notices"] or "[]")
        return cls(**d)

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.run_dir)


# -- the queue ----------------------------------------------------------------------------------
class Queue:
    """The job table plus the run folders it points to. Thread-safe: one connection per call."""

    def __init__(self, db_path: str | Path | None = None, runs_root: str | Path | None = None,
                 backup_path: str | Path | None = None):
        """``backup_path``: where each change is copied (default: the studio home's
        ``jobs-backup.sqlite3`` when the database is kept elsewhere, on local disk)."""
        self.db_path = Path(db_path) if db_path else local_home() / "jobs.sqlite3"
        self.runs_root = Path(runs_root) if runs_root else studio_home() / "runs"
        if backup_path is None and db_path is None and local_home() != studio_home():
            backup_path = studio_home() / "jobs-backup.sqlite3"
        self.backup_path = Path(backup_path) if backup_path else None
        self.startup_notices: list[str] = []  # what the start repaired, in plain sentences for the UI
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # one start at a time checks and repairs: another start must not take a database that is
        # being created (0 bytes for an instant) for an empty one
        with _locked(self.db_path.with_name(f"{self.db_path.name}.lock")):
            self._check_or_restore()
            with closing(self._connect()) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(SCHEMA)
            self._relist_folders()
        if self.backup_path and not self.backup_path.exists():
            self._backup()

    def _notice(self, text: str, detail: str = "") -> None:
        """Say what the start repaired: in the log (with ``detail``, e.g. paths) and to the UI."""
        self.startup_notices.append(text)
        log.warning("%s%s", text, f" ({detail})" if detail else "")

    # -- the database at start: checked, restored, its runs listed again
    def _check_or_restore(self) -> None:
        """Start from a sound database: a missing, empty or damaged one is put aside and replaced by
        the newest backup that passes the check; with none, the queue starts empty (its runs are
        then listed again from their folders)."""
        problem = _db_problem(self.db_path) if self.db_path.exists() else "missing"
        if problem is None:
            return
        backups = self._backups()
        if problem == "missing":
            for leftover in ("-wal", "-shm"):  # they belong to the lost database
                Path(f"{self.db_path}{leftover}").unlink(missing_ok=True)
            if not backups:
                return  # a first start
            kept, problem = "", "not on this disk (a new container, or it was deleted)"
        else:
            kept = f"; the damaged file is kept as {self._put_aside().name}"
        said = f"The job queue's database was {problem}"
        sound = next((b for b in backups if _db_problem(b) is None), None)
        if sound is None:
            why = "no backup to restore" if not backups else f"its {len(backups)} backup(s) are damaged too"
            self._notice(f"{said}; {why}, so the queue starts empty and its runs are listed again "
                         f"from their folders{kept}.", f"database {self.db_path}")
            return
        with closing(sqlite3.connect(sound)) as src, closing(sqlite3.connect(self.db_path)) as dst:
            src.backup(dst)
            count = dst.execute("SELECT count(*) FROM jobs").fetchone()[0]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(sound.stat().st_mtime))
        which = "" if sound == backups[0] else f" ({sound.name}: the newer copies are damaged)"
        self._notice(f"{said}; restored {_plural(count, 'run')} from the backup of {when}{which}{kept}.",
                     f"database {self.db_path}, backup {sound}")

    def _put_aside(self) -> Path:
        """Move the database and its -wal/-shm to ``<name>.damaged-<time>``: kept, never deleted."""
        name = f"{self.db_path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, n = self.db_path.with_name(name), 1
        while aside.exists():  # a second repair within the same second
            aside, n = self.db_path.with_name(f"{name}-{n}"), n + 1
        for suffix in ("", "-wal", "-shm"):  # <aside>-wal: SQLite still finds the pair together
            if Path(f"{self.db_path}{suffix}").exists():
                os.replace(f"{self.db_path}{suffix}", f"{aside}{suffix}")
        return aside

    def _relist_folders(self) -> None:
        """Rows again for run folders that have none (see the module docstring). Run only at start;
        a ``submit`` racing it is harmless: ``run_id`` is unique, this inserts OR IGNOREs and
        ``submit`` upserts."""
        if not self.runs_root.is_dir():
            return
        with closing(self._connect()) as conn:
            known = {r[0] for r in conn.execute("SELECT run_id FROM jobs")}  # a run's folder is named by its id
        found, unowned = [], []
        for path in sorted(self.runs_root.iterdir()):
            if path.name in known or not (path / "config.yaml").is_file():
                continue
            status = RunFolder(path).status()
            if "owner" not in status:  # no status.json: whose run it is cannot be known
                unowned.append(path.name)
                continue
            found.append((status.get("created_at") or path.stat().st_mtime, path, status))
        counts: dict[str, int] = {}
        if found:
            with self._transaction() as conn:
                for created_at, path, status in sorted(found, key=lambda f: f[0]):  # queued ones keep their order
                    state = self._relist(conn, path.resolve(), created_at, status)
                    if state:
                        counts[state] = counts.get(state, 0) + 1
        if counts:
            states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self._notice(f"Listed again from their folders: {_plural(sum(counts.values()), 'run')} that had no "
                         f"record in the job queue ({states}).", f"runs root {self.runs_root}")
        if unowned:  # the log only: an admin's matter, and it would be said again at every start
            log.warning("run folders in %s with a config.yaml but no status.json saying whose they are, "
                        "not listed: %s", self.runs_root, ", ".join(unowned))

    def _relist(self, conn: sqlite3.Connection, path: Path, created_at: float, status: dict) -> str | None:
        """Insert the row for one run folder; its state, or None if a row appeared meanwhile."""
        run = RunFolder(path)
        state, error, ended_at = status.get("state"), status.get("error"), status.get("ended_at")
        pid = pid_start = None
        device = status.get("device")
        if state == "running":
            trainer = _find_trainer(path)
            if trainer:  # it outlived the app: watched until it ends, never started twice
                pid, pid_start, device = trainer
            else:
                state, ended_at = "interrupted", time.time()
                error = ("the training process stopped without finishing (its record was lost with the "
                         "queue's database); resume continues from the last complete checkpoint")
        elif state not in STATES:
            state, ended_at, error = "interrupted", time.time(), f"unknown state {state!r} in status.json"
        resume = state == "queued" and bool(run.checkpoints())  # queued again by resume: continue
        inserted = conn.execute(
            "INSERT OR IGNORE INTO jobs (run_id, run_dir, owner, state, pid, pid_start, attempts, resume, "
            "created_at, started_at, ended_at, error, device) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path.name, str(path), status.get("owner") or "", state, pid, pid_start,
             int(status.get("attempt") or 0), int(resume), created_at, status.get("started_at"),
             ended_at, error, device)).rowcount
        if not inserted:
            return None
        if state != status.get("state"):
            run.set_status(state, ended_at=ended_at, error=error)
        return state

    # -- backup on the mounted home
    def _backups(self) -> list[Path]:
        """The backups that exist, newest first: ``jobs-backup.sqlite3``, then ``.1``, ``.2``, ..."""
        if self.backup_path is None:
            return []
        return [p for p in (self.backup_path, *self._rotated()) if p.exists()]

    def _rotated(self) -> list[Path]:
        return [self.backup_path.with_name(f"{self.backup_path.name}.{i}") for i in range(1, BACKUPS_KEPT + 1)]

    def _backup(self) -> None:
        """Copy the database to ``backup_path`` (SQLite's online backup: a consistent snapshot),
        through a temporary file so the backup is always whole. If the copy lacks runs the backup
        has (a delete, or a database that came back smaller), the backup is rotated first, never
        overwritten. A failure is logged, never raised: the queue goes on without its copy."""
        if self.backup_path is None:
            return
        tmp = self.backup_path.with_name(f".{self.backup_path.name}.{os.getpid()}.tmp")
        try:
            with _BACKUP_LOCK:
                self.backup_path.parent.mkdir(parents=True, exist_ok=True)
                with closing(self._connect()) as src, closing(sqlite3.connect(tmp)) as dst:
                    src.backup(dst)
                    # a plain rollback-journal file: read on the mount without WAL's shared memory
                    dst.execute("PRAGMA journal_mode=DELETE")
                    new = {r[0] for r in dst.execute("SELECT run_id FROM jobs")}
                if self.backup_path.exists():
                    old = _run_ids(self.backup_path)
                    if old is None or old - new:  # unreadable, or it holds runs the copy lacks
                        self._rotate()
                os.replace(tmp, self.backup_path)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not back up the job queue to %s: %s", self.backup_path, exc)
            tmp.unlink(missing_ok=True)

    def _rotate(self) -> None:
        """``jobs-backup.sqlite3`` -> ``.1`` -> ``.2`` ...; the oldest past ``BACKUPS_KEPT`` goes."""
        names = [self.backup_path, *self._rotated()]
        for newer, older in reversed(list(zip(names, names[1:]))):
            if newer.exists():
                os.replace(newer, older)
        log.info("the job queue lost runs since its last backup (a delete?): the backup moved to %s", names[1])

    # -- database plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=5.0, isolation_level=None)  # autocommit
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def _transaction(self):
        """A write transaction taken up front, so check-then-update cannot interleave; backed up
        after the commit if it changed anything."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            changed = conn.total_changes > 0
        if changed:
            self._backup()

    def _transition(self, run_id: str, from_states: tuple, then: Callable[[], object] | None = None,
                    **values) -> bool:
        """Set ``values`` if the job is in one of ``from_states``, and then call ``then`` (which
        writes ``status.json``) before committing, so a worker claiming the job cannot interleave.
        False if the job was in another state."""
        values = {k: json.dumps(v) if k == "notices" else v for k, v in values.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in from_states)
        with self._transaction() as conn:
            cur = conn.execute(f"UPDATE jobs SET {sets} WHERE run_id = ? AND state IN ({marks})",
                               (*values.values(), run_id, *from_states))
            if cur.rowcount != 1:
                return False
            if then is not None:
                then()
        return True

    # -- reading
    def list(self, owner: str | None = None) -> list[Job]:
        """Every job in queue order (``id``), or only ``owner``'s."""
        with closing(self._connect()) as conn:
            if owner is None:
                rows = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY id", (owner,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def get(self, run_id: str) -> Job:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise JobError(f"no job {run_id!r}")
        return Job.from_row(row)

    # -- what users do
    def submit(self, spec: RunSpec, owner: str = "", name: str | None = None,
               auto_resume: bool = False, status: dict | None = None) -> Job:
        """Write the run folder (``config.yaml``, ``status.json`` queued, with ``status``'s fields)
        and queue it; the fields are in status.json before a worker can see the row."""
        spec = spec.resolved()
        while True:  # a clash needs the same second and the same 4 random hex digits
            run_id = _run_id(name or spec.model.method)
            run = RunFolder(self.runs_root / run_id)
            try:
                run.path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        now = time.time()
        try:
            run.write_config(spec)
            run.set_status("queued", **(status or {}), run_id=run_id, name=name, owner=owner, created_at=now,
                           method=spec.model.method)
            with self._transaction() as conn:  # upsert: a Queue starting meanwhile may have listed the folder
                conn.execute("INSERT INTO jobs (run_id, run_dir, owner, state, auto_resume, created_at) "
                             "VALUES (?, ?, ?, 'queued', ?, ?) "
                             "ON CONFLICT (run_id) DO UPDATE SET auto_resume = excluded.auto_resume",
                             (run_id, str(run.path.resolve()), owner or "", int(auto_resume), now))
        except BaseException:
            shutil.rmtree(run.path, ignore_errors=True)
            raise
        return self.get(run_id)

    def cancel(self, run_id: str, user: str | None = None, admin: bool = False) -> Job:
        """Queued: leaves the queue. Running: SIGTERM to its process group; the trainer saves
        nothing more, marks the run ``cancelled`` (its checkpoints stay) and the worker records it."""
        job = self._owned(run_id, user, admin)
        now = time.time()
        error = "cancelled before it started"
        if self._transition(run_id, ("queued",), state="cancelled", ended_at=now, error=error,
                            then=lambda: job.run.set_status("cancelled", ended_at=now, error=error)):
            return self.get(run_id)
        if self._transition(run_id, ("running",), cancel_requested=1):
            job = self.get(run_id)
            if _alive(job.pid, job.pid_start):
                try:
                    os.killpg(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # ended in between: the worker records how
            return self.get(run_id)
        raise JobError(f"{run_id} is {self.get(run_id).state}: only a queued or running job can be cancelled")

    def resume(self, run_id: str, user: str | None = None, admin: bool = False) -> Job:
        """Queue an interrupted, failed or cancelled job again; it continues from its last
        complete checkpoint (``train --resume``), or starts over if it has none."""
        job = self._owned(run_id, user, admin)
        if not self._requeue(job, resume=True):
            raise JobError(f"{run_id} is {self.get(run_id).state}: only {', '.join(RESUMABLE)} jobs resume")
        return self.get(run_id)

    def delete(self, run_id: str, user: str | None = None, admin: bool = False) -> None:
        """Remove the job and its run folder; a running job must be cancelled first."""
        job = self._owned(run_id, user, admin)
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM jobs WHERE run_id = ? AND state != 'running'",
                                   (run_id,)).rowcount
        if not deleted:
            raise JobError(f"{run_id} is running: cancel it before deleting it")
        # config.yaml first: a folder left half-deleted is not listed again at the next start
        (Path(job.run_dir) / "config.yaml").unlink(missing_ok=True)
        shutil.rmtree(job.run_dir, ignore_errors=True)

    def _owned(self, run_id: str, user: str | None, admin: bool) -> Job:
        """The job, if ``user`` may change it (``access.job_for``: unknown and not theirs answer alike);
        ``user`` None: the machine's owner (the CLI, tests)."""
        return self.get(run_id) if user is None else job_for(self, run_id, Caller(user, admin))

    def _requeue(self, job: Job, resume: bool) -> bool:
        return self._transition(job.run_id, RESUMABLE, state="queued", resume=int(resume),
                                cancel_requested=0, pid=None, pid_start=None, error=None, ended_at=None,
                                then=lambda: job.run.set_status("queued", error=None, ended_at=None))

    # -- restart recovery
    def recover(self, skip: set | frozenset = frozenset()) -> list[Job]:
        """Settle ``running`` jobs whose process is gone (or is no longer ours): their final state
        comes from ``status.json``, or ``interrupted`` if it still says running; an interrupted job
        with ``auto_resume`` is queued again with ``--resume``. ``skip``: run ids that a worker in
        this process watches itself. Returns the jobs it settled."""
        settled = []
        for job in self.list():
            if job.state == "running" and job.run_id not in skip and not _alive(job.pid, job.pid_start):
                settled.append(self.finish(job.run_id, auto_resume=True))
        return settled

    # -- what the worker does
    def claim(self, device: str | Callable[[Job], str | None],
              launch: Callable[[Job], subprocess.Popen]) -> tuple[Job, subprocess.Popen] | None:
        """Start the first queued job: in one write transaction, mark it running (only if still
        queued) and ``launch`` it, storing its pid before the commit. ``device``: where it runs, or
        ``(job) -> device`` choosing for the job (None: not enough free now, it keeps its place;
        an error fails the job with that message)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            if callable(device):
                try:
                    device = device(Job.from_row(row))
                except Exception as exc:  # e.g. more GPUs than this machine has
                    error = f"cannot start: {exc}"
                    conn.execute("UPDATE jobs SET state = 'failed', ended_at = ?, error = ? WHERE id = ?",
                                 (now, error, row["id"]))
                    RunFolder(row["run_dir"]).set_status("failed", ended_at=now, error=error)
                    return None
                if device is None:
                    return None
            claimed = conn.execute(
                "UPDATE jobs SET state = 'running', device = ?, started_at = ?, ended_at = NULL, error = NULL, "
                "attempts = attempts + 1 WHERE id = ? AND state = 'queued'", (device, now, row["id"])).rowcount
            if not claimed:
                return None
            job = Job.from_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
            job.run.set_status("running", device=device, attempt=job.attempts, ended_at=None, error=None)
            try:
                proc = launch(job)
            except Exception as exc:  # e.g. the interpreter cannot be executed
                error = f"could not start the training process: {type(exc).__name__}: {exc}"
                conn.execute("UPDATE jobs SET state = 'failed', ended_at = ?, error = ? WHERE id = ?",
                             (now, error, job.id))
                job.run.set_status("failed", ended_at=now, error=error)
                return None
            conn.execute("UPDATE jobs SET pid = ?, pid_start = ? WHERE id = ?",
                         (proc.pid, _start_time(proc.pid), job.id))
        return self.get(job.run_id), proc

    def finish(self, run_id: str, returncode: int | None = None, auto_resume: bool = False) -> Job:
        """Record how a job's process ended (it must have ended). See the module docstring."""
        job = self.get(run_id)
        run = job.run
        status = run.status()
        state, error = status.get("state"), status.get("error")
        if state not in ("completed", "failed", "cancelled"):  # the trainer did not say how it ended
            if job.cancel_requested:  # SIGTERM came before the trainer could catch it
                state, error = "cancelled", "cancelled by the user"
            elif returncode is not None and returncode > 0:  # exited before training, e.g. a bad config
                state, error = "failed", _last_log_line(run) or f"exit code {returncode}"
            else:  # killed (kill -9, out of host memory, power) or ended unseen
                state, error = "interrupted", (
                    f"the training process stopped without finishing ({_exit_text(returncode)}); "
                    "resume continues from the last complete checkpoint")
        now = time.time()
        notices = status.get("notices") or []
        notices = notices + [n for n in job.notices if n not in notices]  # train.py rewrites the list
        # the process ended while the forgetting meter asked its questions: it will not answer now
        meter = {"forgetting": "stopped"} if status.get("forgetting") == "measuring" else {}
        if not self._transition(run_id, ("running",), state=state, ended_at=now, error=error,
                                then=lambda: run.set_status(state, ended_at=status.get("ended_at") or now,
                                                            error=error, notices=notices, **meter)):
            return self.get(run_id)  # someone else recorded it first
        if state == "failed" and _is_out_of_memory(error):
            self._retry_smaller(self.get(run_id))
        elif state == "interrupted" and auto_resume and job.auto_resume:
            self._requeue(job, resume=True)
        return self.get(run_id)

    def _retry_smaller(self, job: Job) -> None:
        """Out of memory: halve the batch, double the accumulation, queue again from scratch."""
        run = job.run
        spec = run.spec()
        t = spec.train
        batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps or 1
        if batch <= 1:
            tips = [f"a shorter max_length (now {spec.data.max_length})"]
            if spec.model.method != "qlora":
                tips.insert(0, "method qlora (a 4-bit base)")
            if not t.gradient_checkpointing:
                tips.append("gradient_checkpointing=true")
            error = f"{job.error}\nOut of memory even at per_device_train_batch_size=1: try {' or '.join(tips)}."
            self._transition(job.run_id, ("failed",), error=error)
            run.set_status(error=error)
            return
        t.per_device_train_batch_size, t.gradient_accumulation_steps = batch // 2, accumulation * 2
        notice = (f"out of memory at per_device_train_batch_size={batch}: retrying with "
                  f"per_device_train_batch_size={batch // 2} and gradient_accumulation_steps="
                  f"{accumulation * 2} (effective batch {batch // 2 * accumulation * 2})")
        log.warning("%s: %s", job.run_id, notice)
        run.write_config(spec)
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)  # made with the old batch size
        notices = run.status().get("notices") or []
        run.set_status("queued", error=None, ended_at=None, notices=notices + [notice])
        self._transition(job.run_id, ("failed",), state="queued", resume=0, error=None, ended_at=None,
                         notices=job.notices + [notice])


# -- the worker ---------------------------------------------------------------------------------
def launch_settings(spec: RunSpec) -> tuple[int, str]:
    """(processes, accelerate config) a run asks for: ``num_processes`` GPUs (1: no launcher) and
    ``accelerate_config``, a name in ``presets/accelerate/`` or a path (default ``ddp``)."""
    t = spec.train
    return int(getattr(t, "num_processes", 1) or 1), getattr(t, "accelerate_config", None) or "ddp"


def accelerate_config_path(name: str) -> Path:
    """``ddp`` -> ``presets/accelerate/ddp.yaml``; a path to a YAML file is taken as it is."""
    shipped = ACCELERATE_CONFIGS / f"{name}.yaml"
    path = shipped if shipped.exists() else Path(name).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
        raise JobError(f"accelerate_config {name!r} is neither one of {names} nor a YAML file")
    return path


def launch_command(config: str | Path, resume: bool = False, num_processes: int = 1,
                   accelerate_config: str = "ddp") -> list[str]:
    """The CLI's ``train --config`` (DESIGN.md contract 1), the same path a person would run; with
    several processes the same command under ``accelerate launch``. Without a GPU accelerate's
    ``--cpu`` would start one process only, so the DDP config (``--multi_gpu``) is used there too:
    the trainer runs on the CPU (``use_cpu``) and the processes talk over gloo."""
    train = ["-m", "backend", "train", "--config", str(config)] + (["--resume"] if resume else [])
    if num_processes <= 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config_path(accelerate_config)),
            "--num_processes", str(num_processes), "--main_process_port", str(_free_port()), *train]


def train_command(job: Job) -> list[str]:
    """How the worker starts a job: ``launch_command`` with what the run asks for."""
    processes, config = launch_settings(job.run.spec())
    return launch_command(Path(job.run_dir) / "config.yaml", job.resume, processes, config)


def detect_devices() -> list[str]:
    """One slot per visible GPU (the value for CUDA_VISIBLE_DEVICES), or ``["cpu"]``."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    if not count:
        return ["cpu"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # keep the parent's mapping: index i is the i-th listed device
        return [v.strip() for v in visible.split(",")][:count]
    return [str(i) for i in range(count)]


class Worker:
    """A thread that runs queued jobs, one at a time per device.

    ``devices``: CUDA_VISIBLE_DEVICES values, one job each (default: every GPU, else ``["cpu"]``:
    one job at a time). ``command``: ``(job) -> argv`` (default ``train_command``). ``stop()``
    leaves running trainings alone: they belong to their own sessions, and the next worker on the
    same database watches them to the end. ``on_launch()`` runs before a job starts on a GPU
    (the app frees the playground's models there).
    """

    def __init__(self, queue: Queue, devices: list | None = None,
                 command: Callable[[Job], list[str]] | None = None, poll_s: float = 1.0,
                 on_launch: Callable[[], None] | None = None):
        self.queue = queue
        self.devices = [str(d) for d in (devices if devices is not None else detect_devices())]
        self.command = command or train_command
        self.poll_s = poll_s
        self.on_launch = on_launch
        self._running: dict[str, tuple[str, subprocess.Popen]] = {}  # device -> (run_id, process)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Worker":
        self.queue.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="studio-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # keep the queue moving; the next tick retries
                log.exception("job worker tick failed")
            if self._stop.wait(self.poll_s):
                return

    def tick(self) -> None:
        """Record ended processes, settle orphans, start queued jobs on free devices."""
        for device, (run_id, proc) in list(self._running.items()):
            code = proc.poll()
            if code is not None:
                del self._running[device]
                self.queue.finish(run_id, returncode=code)
        self.queue.recover(skip={run_id for run_id, _ in self._running.values()})
        while True:  # in queue order: a job waiting for GPUs keeps the ones behind it waiting too
            claimed = self.queue.claim(self._devices_for, self._launch)
            if claimed is None:
                return
            job, proc = claimed
            self._running[job.device] = (job.run_id, proc)

    def _devices_for(self, job: Job) -> str | None:
        """The free devices for ``job`` ("0" or "0,1": its CUDA_VISIBLE_DEVICES; or "cpu"), None
        while not enough are free."""
        busy = {d for j in self.queue.list() if j.state == "running" for d in (j.device or "").split(",")}
        free = [d for d in self.devices if d not in busy]
        processes, config = launch_settings(job.run.spec())
        if self.devices == ["cpu"]:  # no GPU: all processes share the CPU
            if processes > 1 and "ddp" not in Path(config).stem:
                raise JobError(f"accelerate_config {config!r} needs CUDA GPUs; on the CPU use ddp")
            return "cpu" if free else None
        if processes > len(self.devices):
            raise JobError(f"the run asks for {processes} GPUs (num_processes) and this machine has {len(self.devices)}")
        return ",".join(free[:processes]) if len(free) >= processes else None

    def _launch(self, job: Job) -> subprocess.Popen:
        device = job.device
        if device != "cpu" and self.on_launch:
            self.on_launch()
        argv = self.command(job)
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        if device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = device
        if job.run.status().get("hub_token") is False:  # access.token_allowed: not for this run's Hub ids
            for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
                env.pop(name, None)
            env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # nor the token file a login left on disk
        with open(Path(job.run_dir) / "train.log", "a", encoding="utf-8") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {job.attempts} on {device}: "
                      f"{' '.join(argv)}\n")
            out.flush()
            return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)


# -- helpers ------------------------------------------------------------------------------------
@contextmanager
def _locked(path: Path):
    """An exclusive lock (``flock`` on the file ``path``) held for the block, across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases it


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _db_problem(path: Path) -> str | None:
    """Why the SQLite file at ``path`` cannot be the job queue ("empty (0 bytes)", "damaged (...)"),
    or None if it can."""
    try:
        if path.stat().st_size == 0:  # a database in WAL mode has its header on disk from the start
            return "empty (0 bytes)"
        with closing(sqlite3.connect(path, timeout=5.0)) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                return f"damaged ({check[0][0]})"
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone():
                return "without its jobs table"
    except (OSError, sqlite3.Error) as exc:  # e.g. "file is not a database"
        return f"damaged ({exc})"
    return None


def _run_ids(path: Path) -> set[str] | None:
    """The run ids a database (a backup) holds; None if it cannot be read."""
    try:
        with closing(sqlite3.connect(path, timeout=5.0)) as conn:
            return {r[0] for r in conn.execute("SELECT run_id FROM jobs")}
    except sqlite3.Error:
        return None


def _find_trainer(run_dir: Path) -> tuple[int, int | None, str] | None:
    """The live process group training ``run_dir`` (pid, start time, CUDA_VISIBLE_DEVICES or "cpu"),
    found by the ``--config RUN_DIR/config.yaml`` in its command line (Linux ``/proc``); None if there
    is none. Trainers outlive the app: a run that lost its row must not be started a second time."""
    config = str(run_dir / "config.yaml").encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(proc.name)
            if config not in (proc / "cmdline").read_bytes().split(b"\0") or os.getpgid(pid) != pid:
                continue  # not it, or one of the processes under accelerate's launcher
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        start = _start_time(pid)
        if _alive(pid, start):
            return pid, start, env.get(b"CUDA_VISIBLE_DEVICES", b"cpu").decode()
    return None


def _run_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


def _free_port() -> int:
    """A free TCP port for the processes of one run to meet on (two runs must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after ``(comm)`` (field 3 on), None without /proc (macOS)
    or once the process is gone. Field 3 is the state, field 22 the start time in clock ticks."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int | None, start: int | None) -> bool:
    """True if ``pid`` still runs and is the process we started (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process now
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc (macOS): trust the signal
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def _is_out_of_memory(error: str | None) -> bool:
    return bool(error) and ("OutOfMemoryError" in error or "out of memory" in error.lower())


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _last_log_line(run: RunFolder) -> str | None:
    try:
        lines = run.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1][-500:] if lines else None
