"""What every tab's handlers share: the caller's runs, by run id only, and errors without server paths."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from backend import access, service


def error(exc: Exception) -> gr.Error:
    """A message for the page: the exception's text with the server's paths made relative."""
    return gr.Error(access.redact(str(exc)))


def signed_in(request) -> str:
    """The caller's user name; on a Space, a visitor who has not signed in is refused (looking is
    free; uploading, paraphrasing and queueing take a Hugging Face sign-in)."""
    user = service.user_of(request)
    if os.environ.get("SPACE_ID") and not user:
        raise gr.Error("sign in with Hugging Face (top of the page) first")
    return user


def job_of(queue, run_id, request):
    """The caller's job ``run_id`` (an id from the Runs list; never a folder path). No run picked yet
    (e.g. a click before the tab's run list arrived): the caller's newest completed run, as the tab
    shows."""
    caller = service.caller(request)
    if not run_id:
        ids = service.finished_runs(queue, caller)
        if not ids:
            raise gr.Error("pick a completed run first")
        run_id = ids[-1]
    try:
        return access.job_for(queue, str(run_id), caller)
    except access.AccessError as exc:
        raise error(exc)


def run_dir_of(queue, run_id, request) -> str:
    return job_of(queue, run_id, request).run_dir


def run_download(path, run_dir) -> str:
    """A file of the caller's run (``run_dir``, from ``job_of``) as a ``gr.File`` value. The file must lie
    in that run's folder (``access.own_file``). Gradio serves only its own cache, so the file is linked
    into it under a fresh unguessable folder: Gradio serves it as it is (no second copy of a
    multi-GB file), other users cannot name it, and the app's ``delete_cache`` removes it after a
    day. Where no link can be made (another file system), it is copied."""
    try:
        source = access.own_file(path, run_dir)
    except access.AccessError as exc:
        raise error(exc)
    target = Path(get_upload_folder()) / f"studio-{secrets.token_hex(16)}" / source.name
    target.parent.mkdir(parents=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return str(target)
