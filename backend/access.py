"""Who may read or change what, decided in one place for every handler and endpoint of the web app.

* A **run** is read or changed only by its owner or an admin (``may_access``). Runs are named by
  run id alone, never by a folder path, and a run that is not the caller's looks exactly like one
  that does not exist, so ids of other users' runs cannot be probed.
* A **run setting** (``RUN_KEYS``: ``from_run``) submitted from the web is a run id, resolved
  here to the caller's own run folder (``run_keys``); a folder path is never taken from the web.
* A **file setting** (``PATH_KEYS``) submitted from the web names only the caller's own uploads,
  a shipped set, or a path under ``STUDIO_ALLOWED_PATHS`` (the admin's allow-list, ``os.pathsep``
  separated); the CLI, run by the machine's owner, is not confined.
* **Paths shown** to a user (logs, statuses, errors) are relative to the studio's home
  (``redact``), so no user learns the server's layout from another's messages.

The web app builds a ``Caller`` per request from its login (``service.caller``); the backend
never sees the request itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .paths import local_home, studio_home

ROOT = Path(__file__).resolve().parent.parent
# settings that name files on the server, and what a web user may name there
PATH_KEYS = ("data", "mix_data", "model", "augment_model", "accelerate_config")
RUN_KEYS = ("from_run",)  # settings that name a run: by run id from the web (run_keys)
SHIPPED_NAMES = {"mix_data": ("replay",),
                 "accelerate_config": tuple(p.stem for p in (ROOT / "presets" / "accelerate").glob("*.yaml"))}


class AccessError(PermissionError):
    """The caller may not do this; the message says what, without naming other users' things."""


@dataclass(frozen=True)
class Caller:
    """Who asks: ``user`` ("" for nobody signed in) and whether they are an admin."""

    user: str = ""
    admin: bool = False


def may_access(owner: str | None, caller: Caller) -> bool:
    """May ``caller`` read or change a run owned by ``owner``? Its owner may, and an admin may.
    A run without an owner (queued before a login was set up) is the admin's."""
    return caller.admin or bool(owner) and owner == caller.user


def job_for(queue, run_id: str, caller: Caller):
    """The queue's job ``run_id`` if ``caller`` may access it; one message for unknown and not
    theirs alike."""
    run_id = (run_id or "").strip()
    try:
        job = queue.get(run_id)
    except ValueError:
        job = None
    if job is None or not may_access(job.owner, caller):
        raise AccessError(f"no run {run_id!r} of yours: pick one from the Runs list")
    return job


def parent_job(queue, job, caller: Caller):
    """The job ``job`` started from (its ``from_run``), for the Playground's "parent run" side: only
    another run of the same owner in ``queue`` that ``caller`` may access. A ``from_run`` that is
    no such run (a folder given on the command line, another user's, a deleted run) is refused."""
    from .playground import parent_dir

    folder = Path(parent_dir(job.run_dir)).resolve()
    for other in queue.list(owner=job.owner) if may_access(job.owner, caller) else []:
        if other.run_id != job.run_id and other.run_dir and Path(other.run_dir).resolve() == folder:
            return other
    raise AccessError(f"the parent run of {job.run_id} is not a run of yours here: it cannot be compared")


def run_keys(queue, values: dict, caller: Caller) -> dict:
    """``values`` with each ``RUN_KEYS`` setting, a run id from the web, replaced by that run's folder
    when ``caller`` may use the run (``job_for``: unknown and not-theirs answer alike)."""
    out = dict(values)
    for key in RUN_KEYS:
        if out.get(key):
            if queue is None:
                raise AccessError(f"{key}: runs are named by run id, and there is no queue to find them in")
            out[key] = job_for(queue, str(out[key]), caller).run_dir
    return out


def visible_jobs(queue, caller: Caller) -> list:
    """The jobs ``caller`` may see, in queue order."""
    return [j for j in queue.list() if may_access(j.owner, caller)]


def own_file(path, run_dir) -> Path:
    """``path`` resolved (links followed) when it is a file inside the run folder ``run_dir`` (a run
    the caller may access, ``job_for``), for a download; anything else is refused, so a handler that
    serves a run's file never serves one from elsewhere, even through a link placed in the folder."""
    folder, resolved = Path(run_dir).resolve(), Path(path).resolve()
    if not resolved.is_file() or not resolved.is_relative_to(folder):
        raise AccessError(f"{Path(path).name} is not a file of this run")
    return resolved


# -- uploads and file settings ------------------------------------------------------------------
def user_folder(user: str) -> str:
    """A folder name for ``user``'s uploads: readable, and unique even when two names slug alike."""
    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", user)[:32].strip("-") or "anonymous"
    return f"{slug}-{hashlib.sha256(user.encode()).hexdigest()[:8]}"


def uploads_dir(user: str) -> Path:
    return studio_home() / "uploads" / user_folder(user)


def allowed_roots(caller: Caller) -> list[Path]:
    roots = [uploads_dir(caller.user)]
    for entry in (os.environ.get("STUDIO_ALLOWED_PATHS") or "").split(os.pathsep):
        if entry.strip():
            roots.append(Path(entry.strip()).expanduser())
    return [r.resolve() for r in roots]


def _hub_id(value: str) -> bool:
    """An ``ORG/NAME`` id fetched from the Hub, not a folder here (from the app's or the trainer's
    working folder) and not written as a path."""
    here = [Path(value).expanduser(), ROOT / value]
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and ".." not in value \
        and not any(p.exists() for p in here)


def _server_path(key: str, value: str) -> str | None:
    """The server path a setting's value names, or None when it names none: ``hub:ORG/NAME[:SPLIT]``
    data and ``ORG/NAME`` models are fetched from the Hub (``hub:`` also takes a local folder)."""
    if key in ("model", "augment_model"):
        return None if _hub_id(value) else value
    if key in ("data", "mix_data") and value.startswith("hub:"):
        ref = value[4:]
        name = ref.rpartition(":")[0] if ":" in ref and not Path(ref).exists() else ref
        return None if _hub_id(name) else ref
    return value


# trackio and mlflow write to one store under STUDIO_HOME, wandb to the server's account: every
# user's runs in one place; tensorboard writes into the run's own folder
PRIVATE_TRACKERS = {"tensorboard"}


def confine_paths(values: dict, caller: Caller) -> None:
    """Refuse a web user's settings that name server files outside what they may read (their own
    uploads, the shipped sets, ``STUDIO_ALLOWED_PATHS``), or that run code on the server
    (``trust_remote_code``) or log where every user's runs meet (``report_to`` other than
    tensorboard): both the admin's alone. ``values``: flat keys as in ``--set``."""
    from .models import EMBEDDED_ALIASES

    roots = allowed_roots(caller)
    refused = []
    for key in PATH_KEYS:
        value = values.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        value = value.strip()
        if value in SHIPPED_NAMES.get(key, ()) or (key in ("model", "augment_model") and value in EMBEDDED_ALIASES):
            continue
        path = _server_path(key, value)
        if path is None:
            continue
        resolved = Path(path).expanduser()
        resolved = (resolved if resolved.is_absolute() else ROOT / resolved).resolve()  # the trainer's cwd
        if not any(resolved.is_relative_to(root) for root in roots):
            refused.append(key)
    if refused:
        raise AccessError(f"{', '.join(refused)}: only files you uploaded, the shipped sets, or paths the admin "
                          "allows (STUDIO_ALLOWED_PATHS) may be used from the web app")
    if values.get("trust_remote_code") and not caller.admin:  # a model repository's Python runs on the server
        raise AccessError("trust_remote_code: only the admin may run a model repository's own code on this server")
    shared = sorted(set(values.get("report_to") or []) - PRIVATE_TRACKERS)
    if shared and not caller.admin:
        raise AccessError(f"report_to {', '.join(shared)}: only the admin may log to a shared store or the server's "
                          f"tracker account; tensorboard logs into your run's own folder")


# -- the server's Hub token ---------------------------------------------------------------------
def hub_ids(values: dict) -> list[str]:
    """The Hugging Face ids a run's settings fetch: ``model``/``augment_model`` ids, ``hub:`` data."""
    out = []
    for key in ("model", "augment_model", "data", "mix_data"):
        value = values.get(key)
        if isinstance(value, str) and value.strip() and _server_path(key, value.strip()) is None:
            out.append(value.strip().removeprefix("hub:").partition(":")[0] if key in ("data", "mix_data")
                       else value.strip())
    return out


def server_token() -> bool:
    """Does this server hold a Hub token (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN`` or a login's file)?"""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    from huggingface_hub import get_token

    return bool(get_token())


def token_allowed(values: dict, caller: Caller) -> bool:
    """May a run of ``caller`` fetch with the server's ``HF_TOKEN``? The token opens the owner's
    private and gated repositories, so a user other than the admin gets it only for the shipped
    presets' models and the ids the admin lists in ``STUDIO_HUB_TOKEN_IDS`` (``*``: every id);
    public ids need no token."""
    from .presets import list_presets, load_preset

    if caller.admin:
        return True
    listed = set((os.environ.get("STUDIO_HUB_TOKEN_IDS") or "").replace(",", " ").split())
    if "*" in listed:
        return True
    listed |= {load_preset(name).get("model") for name in list_presets()}
    return all(i in listed for i in hub_ids(values))


# -- what users see -----------------------------------------------------------------------------
def _prefixes() -> list[tuple[str, str]]:
    pairs = [(studio_home(), "STUDIO_HOME"), (local_home(), "STUDIO_LOCAL_HOME"), (ROOT, "."),
             (Path(sys.prefix), "PYTHON"), (Path.home(), "~")]
    out = []
    for path, name in pairs:
        for form in {str(path), str(path.resolve())}:
            out.append((form.rstrip("/"), name))
    return sorted(out, key=lambda p: -len(p[0]))  # the longest first: the home inside ~ stays STUDIO_HOME


# an absolute path of two or more parts (also after ``hub:`` or ``file://``), not a URL's path: in
# ``https://host/a/b`` no slash is both preceded by a non-slash and followed by a part before "host"
_ABSOLUTE = re.compile(r"(?<![\w/.~])/(?:[^\s/'\"`]+/)+([^\s/'\"`:,;)]*)")


def redact(text: str | None) -> str | None:
    """``text`` with the server's absolute paths made relative to the studio's home (and the
    repository, the Python installation, the user's home); any other absolute path is cut to its
    last part (``.../name``)."""
    if not text:
        return text
    for prefix, name in _prefixes():
        if prefix:
            text = text.replace(prefix, name)
    text = text.replace("file:///", "file:/")  # a file URL's path is a path
    return _ABSOLUTE.sub(lambda m: f".../{m.group(1)}", text)
