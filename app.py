"""The web app: wiring only. Each handler unpacks widget values and calls one backend function.

Tabs (``ui/``): Data (upload, format, mapping, highlighted sample, token lengths), Train (model,
method, preset, hyperparameters, estimate, config and command, "Queue run"), Runs (the persistent
queue: progress, loss curves, log, cancel/resume/delete/download), Playground (base vs tuned
side by side, blind A/B votes, several runs, batches and evaluation), Export (zip, merge, Hub, GGUF
with its Ollama Modelfile as downloads).

Runs go through ``backend.jobs``: a SQLite queue under ``STUDIO_HOME`` and a worker thread that
trains each job in its own process, so closing the page or restarting the app loses nothing.

Environment: ``PORT`` / ``GRADIO_SERVER_PORT`` (7860), ``GRADIO_SERVER_NAME`` (bind address,
127.0.0.1), ``STUDIO_AUTH=user:password`` (optional login; that user is the admin),
``STUDIO_MAX_FILE_SIZE`` (uploads, default 200mb), ``STUDIO_QUEUE_MAX`` (requests that may wait in Gradio's
queue, default 32: beyond that a request is refused at once with "queue full" instead of waiting
without end; each endpoint runs one request at a time). On a Hugging Face Space (``SPACE_ID`` set) the
env-var login is off: "Sign in with Hugging Face" (``hf_oauth``) decides who may queue runs, and the
Space's owner is the admin.
"""

from __future__ import annotations

import os
import threading
import time

import gradio as gr
from starlette.middleware import Middleware

from backend import access, data, playground, service
from backend.config import ConfigError
from backend.jobs import Queue, Worker
from ui.common import job_of
from ui.data_tab import create_data_tab
from ui.export_tab import create_export_tab
from ui.http import BodyLimit, max_body_size, parse_size
from ui.i18n import i18n, t
from ui.playground_tab import create_playground_tab
from ui.runs_tab import create_runs_tab
from ui.train_tab import create_train_tab, form_values

ON_SPACES = bool(os.environ.get("SPACE_ID"))  # set by Hugging Face Spaces
QUEUE_MAX = 32  # default of STUDIO_QUEUE_MAX


def queue_max() -> int:
    """How many requests may wait in Gradio's queue (``STUDIO_QUEUE_MAX``): the next one is refused
    at once (HTTP 503, "queue full"; the page says the app is busy) instead of waiting without end."""
    value = os.environ.get("STUDIO_QUEUE_MAX", "").strip()
    try:
        size = int(value) if value else QUEUE_MAX
    except ValueError:
        raise ValueError(f"STUDIO_QUEUE_MAX must be a whole number, not {value!r}") from None
    if size < 1:
        raise ValueError(f"STUDIO_QUEUE_MAX must be at least 1, not {size}")
    return size


def build_ui(queue: Queue | None = None) -> gr.Blocks:
    queue = queue or Queue()

    def submit(request: gr.Request, data_path, row_tokens, config: dict):
        """Queue a run from a config mapping (keys as in ``--set`` and config.yaml); without a
        ``data`` key, the dataset last checked on the Data tab."""
        caller = service.caller(request)
        if ON_SPACES and not caller.user:
            return "**Error:** sign in with Hugging Face (top of the page) to queue runs."
        if not isinstance(config, dict):
            return "**Error:** /submit takes a config mapping, e.g. {\"method\": \"qlora\", \"learning_rate\": 1e-4}"
        try:
            values, preset = form_values({"data": data_path or None, **config})
            run_id = service.submit(queue, values, preset, caller=caller, row_tokens=row_tokens)
        except (ConfigError, data.DataError, ValueError, access.AccessError) as exc:
            return f"**Error:** {access.redact(str(exc))}"
        return f"Queued **{run_id}**: follow it in the Runs tab."

    # Gradio's own copies of uploads go after a day (ours: service.sweep_uploads)
    with gr.Blocks(title="Fine-tuning studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# Fine-tuning studio")
        if queue.startup_notices:  # what the start repaired (a damaged queue database...): said to everyone
            gr.Markdown("\n\n".join(f"**Note:** {n}" for n in queue.startup_notices))
        if ON_SPACES:
            gr.LoginButton()
        with gr.Tab(t("data")):
            data_inputs = create_data_tab()
        with gr.Tab(t("train")):
            create_train_tab(data_inputs, submit, queue)
        with gr.Tab(t("runs")) as runs_tab:
            refresh, outputs, run_id, shown = create_runs_tab(queue)
        with gr.Tab(t("playground")) as playground_tab:
            refresh_runs, play_run, play_others = create_playground_tab(queue)
        with gr.Tab(t("export")) as export_tab:
            export_run = create_export_tab(queue)
        demo.load(refresh, [run_id], outputs, api_visibility="private")
        playground_tab.select(refresh_runs, [play_run], [play_run, play_others], api_visibility="private")

        def export_runs(current, request: gr.Request):
            return refresh_runs(current, request)[0]

        export_tab.select(export_runs, [export_run], [export_run], api_visibility="private")
        # a plot drawn while its tab was hidden has no size: clear it and draw it again when shown
        runs_tab.select(lambda: (None, ""), None, [outputs[3], shown], api_visibility="private").then(
            refresh, [run_id, shown], outputs, api_visibility="private")

        def list_runs(request: gr.Request) -> list:
            return service.jobs_table(queue, service.caller(request))

        def run_status(run_id: str, request: gr.Request) -> dict:
            return service.run_view(job_of(queue, run_id, request).run_dir)

        gr.api(list_runs, api_name="list")
        gr.api(run_status, api_name="status")
    # a bounded queue: an overloaded server answers "queue full" (503) at once; each endpoint runs one
    # request at a time (the models share one device), other endpoints (status, list) run beside it
    demo.queue(max_size=queue_max(), default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, **overrides):
    """Launch with the settings from the environment (tests override host, port, blocking)."""
    credentials = service.auth_credentials()
    options = dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860),
        auth=credentials if credentials and not ON_SPACES else None,
        max_file_size=os.environ.get("STUDIO_MAX_FILE_SIZE", "200mb"),
        app_kwargs={"middleware": [Middleware(BodyLimit, limit=max_body_size(),
                                              upload_limit=parse_size(os.environ.get("STUDIO_MAX_FILE_SIZE", "200mb"))
                                              + 2**20)]},
        i18n=i18n,
    )
    return demo.launch(**{**options, **overrides})


def _sweep_uploads(queue: Queue, every_s: float = 3600) -> None:
    """Uploads no run uses are deleted after STUDIO_UPLOAD_TTL (default a day), checked hourly."""
    while True:
        try:
            service.sweep_uploads(queue)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not end the thread for good
            print(f"upload sweep failed: {exc}", flush=True)
        time.sleep(every_s)


def main() -> None:
    queue = Queue()
    # recovers interrupted jobs, then runs the queue in order; the playground's models make room
    Worker(queue, on_launch=playground.CACHE.release).start()
    threading.Thread(target=_sweep_uploads, args=(queue,), name="studio-uploads", daemon=True).start()
    launch(build_ui(queue))


if __name__ == "__main__":
    main()
