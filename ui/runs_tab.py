"""Runs tab: the queue and history; one run's progress, loss curves, log; cancel/resume/delete."""

import gradio as gr
import pandas as pd

from backend import access, service, trackers
from backend.runs import format_duration

from .common import error, job_of
from .i18n import t

COLUMNS = ["run_id", "state", "owner", "progress", "created"]


def detail_markdown(view: dict) -> str:
    parts = [f"**{view['state']}** · step {view['step']}/{view['total_steps']} "
             f"({100 * view['progress']:.0f}%) · elapsed {format_duration(view['elapsed_s'])} · ETA {format_duration(view['eta_s'])}"]
    if view["tokens_per_second"]:
        parts.append(f"{view['tokens_per_second']:.0f} tokens/s")
    if view["peak_memory_mb"]:
        parts.append(f"peak memory {view['peak_memory_mb']:.0f} MB")
    if view.get("estimated_peak_mb"):
        parts.append(f"estimated {view['estimated_peak_mb']:.0f} MB")
    if view.get("best_step"):
        parts.append(("stopped early; " if view.get("stopped_early") else "") + f"result: best step {view['best_step']}")
    text = " · ".join(parts)
    if view.get("forgetting"):
        f = view["forgetting"]
        lost = ", ".join(c["question"] for c in f["changed"][:5]) + (" ..." if len(f["changed"]) > 5 else "")
        text += f"\n\nForgetting: kept {f['kept']} of {f['n']} general answers" + (f" (lost: {lost})" if lost else "")
    elif view.get("forgetting_state") == "measuring":
        text += "\n\nForgetting: asking the general questions of base and tuned model..."
    elif view.get("forgetting_state") == "stopped":
        text += "\n\nForgetting: the process ended before the meter finished; Measure forgetting in the Playground asks again."
    if view.get("replay"):
        r = view["replay"]
        text += (f"\n\nReplay: {r['rows']} rows of the base model's own answers mixed in"
                 + (f" ({r['answered']} prompts answered once in {r['seconds']:.0f}s, cached for later runs)"
                    if r.get("answered") else " (from the cache)"))
    if view.get("checkpoints"):
        text += f"\n\nCheckpoints (the recommended one is used by Playground, Export and the CLI):\n\n{view['checkpoints']}"
        text += f"\n\n{view['recommended_reason']}"
    for notice in view["notices"]:
        text += f"\n\n> {notice}"
    if view["error"]:
        text += f"\n\n**Error:** {view['error']}"
    return text


def create_runs_tab(queue):
    def table(request):
        return pd.DataFrame(service.jobs_table(queue, service.caller(request)), columns=COLUMNS)

    def show(run_id, request: gr.Request):
        if not run_id:
            return "", None, "", gr.LinePlot(visible=False)
        try:
            view = service.run_view(access.job_for(queue, run_id, service.caller(request)).run_dir)
        except access.AccessError as exc:
            return str(exc), None, "", gr.LinePlot(visible=False)
        frame = pd.DataFrame(view["loss"], columns=["step", "loss", "kind"])
        # DPO/ORPO runs: TRL's rewards of chosen and rejected answers, their margin and accuracy
        rewards = pd.DataFrame(view["rewards"], columns=["step", "value", "kind"])
        return (detail_markdown(view), frame, "\n".join(view["log"]),
                gr.LinePlot(rewards, visible=bool(view["rewards"])))

    def refresh(run_id, shown="", request: gr.Request = None):
        """The table, and the selected run's detail unless it is what the page already shows
        (redrawing an unchanged plot every tick makes it flicker)."""
        ids = [j.run_id for j in access.visible_jobs(queue, service.caller(request))]
        selected = run_id if run_id in ids else (ids[-1] if ids else None)
        detail = show(selected, request)
        sig = (f"{selected}|{hash(detail[0])}|{len(detail[1]) if detail[1] is not None else 0}|{hash(detail[2])}"
               f"|{hash(tuple(ids))}")
        picked = gr.Dropdown(choices=ids)  # the runs to compare: offered from the same list
        if sig == shown:  # nothing new: an update would redraw the plot and close an open run list
            detail, picked = (gr.skip(), gr.skip(), gr.skip(), gr.skip()), gr.skip()
        return (table(request), gr.Dropdown(choices=ids, value=selected), *detail, sig, picked)

    def act(action, run_id, request: gr.Request):
        if run_id:
            caller = service.caller(request)
            try:  # Queue checks access (access.job_for) before it changes anything
                getattr(queue, action)(run_id, user=caller.user, admin=caller.admin)
            except (PermissionError, ValueError) as exc:
                gr.Warning(access.redact(str(exc)))
        return refresh(run_id, "", request)

    jobs = gr.Dataframe(pd.DataFrame([], columns=COLUMNS), interactive=False)  # filled per caller on load
    with gr.Row():
        # custom values: the API takes any run id (the backend checks it); the UI lists the queue
        run_id = gr.Dropdown([], label=t("run"), allow_custom_value=True)
        cancel = gr.Button(t("cancel"), variant="stop")
        resume = gr.Button(t("resume"))
        delete = gr.Button(t("delete"))
        download = gr.Button(t("download"))
    archive = gr.File(label=t("download"), interactive=False, height=80)
    detail = gr.Markdown()
    curve = gr.LinePlot(x="step", y="loss", color="kind", label=t("loss"), height=300)
    log = gr.Textbox(label=t("log"), lines=10, max_lines=10)
    rewards = gr.LinePlot(x="step", y="value", color="kind", label="rewards (DPO/ORPO)", height=300, visible=False)
    shown = gr.State("")
    with gr.Accordion(t("compare"), open=False):
        picked = gr.Dropdown([], multiselect=True, allow_custom_value=True, label=t("compare_runs"))
        compare = gr.Button(t("compare"))
        with gr.Row():
            curves = gr.LinePlot(x="step", y="loss", color="line", label=t("loss"), height=320, scale=1,
                                 elem_id="compare-plot")
            settings_table = gr.Dataframe(headers=["run", "state", *service.COMPARE_SETTINGS], interactive=False,
                                          scale=1)
        compare_result = gr.JSON(visible=False)  # the series as numbers, for API clients
        with gr.Row():
            dashboard = gr.Button(t("trackio"), scale=0)
            dashboard_link = gr.Markdown()
    outputs = [jobs, run_id, detail, curve, log, rewards, shown, picked]
    timer = gr.Timer(2.0)
    # off the queue: a page's polling keeps answering while playground requests fill the queue's bound
    timer.tick(refresh, [run_id, shown], outputs, api_visibility="private", show_progress="hidden", queue=False)
    run_id.change(show, [run_id], [detail, curve, log, rewards], api_visibility="private")

    def do_cancel(run_id, request: gr.Request):
        return act("cancel", run_id, request)

    def do_resume(run_id, request: gr.Request):
        return act("resume", run_id, request)

    def do_delete(run_id, request: gr.Request):
        return act("delete", run_id, request)

    def do_download(run_id, request: gr.Request):
        if not run_id:
            return None
        try:
            return service.archive(job_of(queue, run_id, request).run_dir)
        except ValueError as exc:
            raise error(exc)

    def do_dashboard(request: gr.Request):
        """A link to Trackio's dashboard; it shows every user's runs, so it is the admin's only."""
        if not service.caller(request).admin:
            return "Trackio's dashboard shows every user's runs: only the admin opens it."
        try:
            board = trackers.trackio_dashboard()
        except trackers.TrackerError as exc:
            return str(exc)
        return f"[Trackio dashboard]({board['url']}) (runs trained with report_to trackio; started in {board['seconds']} s)"

    dashboard.click(do_dashboard, None, [dashboard_link], api_visibility="private")

    def do_compare(run_ids, request: gr.Request):
        """Train and eval loss of each picked run on one plot, and their key settings."""
        ids = list(dict.fromkeys(run_ids or []))
        if not ids:
            raise gr.Error("pick runs to compare")
        result = service.compare_runs({r: job_of(queue, r, request).run_dir for r in ids})
        frame = pd.DataFrame(result["series"], columns=["run", "step", "loss", "kind"])
        frame["line"] = frame["run"] + " " + frame["kind"]
        return frame, pd.DataFrame(result["settings"]), result

    compare.click(do_compare, [picked], [curves, settings_table, compare_result], api_name="compare")
    download.click(do_download, [run_id], [archive], api_name="download")
    cancel.click(do_cancel, [run_id], outputs, api_name="cancel")
    resume.click(do_resume, [run_id], outputs, api_name="resume")
    delete.click(do_delete, [run_id], outputs, api_name="delete")
    return refresh, outputs, run_id, shown
