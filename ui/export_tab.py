"""Export tab: the result as a zip, LoRA merged into the base, push to the Hugging Face Hub."""

from __future__ import annotations

import gradio as gr

from backend import export, service

from .i18n import t
from .playground_tab import run_dir_of

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def create_export_tab(queue):
    run = gr.Dropdown([], label=t("run"), allow_custom_value=True)
    with gr.Row():
        zip_btn = gr.Button(t("zip"))
        zip_file = gr.File(label=t("zip"), interactive=False, height=80)
    with gr.Row():
        merge_dir = gr.Textbox(label=t("merge_dir"), placeholder="(empty: RUN_DIR/merged)")
        dtype = gr.Dropdown(DTYPES, value="auto", label=t("dtype"))
        merge_btn = gr.Button(t("merge"))
    with gr.Row():
        repo_id = gr.Textbox(label=t("repo_id"))
        token = gr.Textbox(label=t("hf_token"), type="password")
        what = gr.Radio(["adapter", "merged"], value="adapter", label=t("what"))
        private = gr.Checkbox(True, label=t("private"))
        push_btn = gr.Button(t("push"))
    message = gr.Markdown()

    def owned_run_dir(run_value, request):
        run_dir = run_dir_of(queue, run_value)
        try:
            job = queue.get(run_value)
        except ValueError:
            return run_dir  # a folder path typed by hand
        if job.owner and job.owner != service.user_of(request) and not service.is_admin(request):
            raise gr.Error("only the run's owner (or an admin) may export it")
        return run_dir

    def do_zip(run_value, request: gr.Request = None):
        try:
            return export.zip_result(owned_run_dir(run_value, request))
        except ValueError as exc:
            raise gr.Error(str(exc))

    def do_merge(run_value, out_dir, dtype_name, request: gr.Request = None, progress=gr.Progress()):
        run_dir = owned_run_dir(run_value, request)
        progress(0, desc="merging")
        try:
            path = export.merge(run_dir, out_dir or f"{run_dir}/merged", None if dtype_name == "auto" else dtype_name)
        except ValueError as exc:
            raise gr.Error(str(exc))
        return f"Merged model saved to `{path}`."

    def do_push(run_value, repo, token_value, what_value, is_private, request: gr.Request = None,
                progress=gr.Progress()):
        run_dir = owned_run_dir(run_value, request)
        progress(0, desc="uploading")
        try:
            url = export.push(run_dir, repo, token_value, what=what_value, private=is_private)
        except ValueError as exc:
            raise gr.Error(str(exc))
        return f"Pushed to {url}"

    zip_btn.click(do_zip, [run], [zip_file], api_name="export_zip")
    merge_btn.click(do_merge, [run, merge_dir, dtype], [message], api_name="export_merge")
    push_btn.click(do_push, [run, repo_id, token, what, private], [message], api_name="export_push")
    return run
