"""Export tab: the result as a zip, LoRA merged into the base, push to the Hugging Face Hub, GGUF for Ollama."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend import access, export, gguf_export

from .common import error, job_of, run_download
from .i18n import t

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def create_export_tab(queue):
    run = gr.Dropdown([], label=t("run"), allow_custom_value=True)
    with gr.Row():
        zip_btn = gr.Button(t("zip"))
        zip_file = gr.File(label=t("zip"), interactive=False, height=80)
    with gr.Row():
        dtype = gr.Dropdown(DTYPES, value="auto", label=t("dtype"))
        merge_btn = gr.Button(t("merge"))
    with gr.Row():
        repo_id = gr.Textbox(label=t("repo_id"))
        token = gr.Textbox(label=t("hf_token"), type="password")
        what = gr.Radio(["adapter", "merged"], value="adapter", label=t("what"))
        private = gr.Checkbox(True, label=t("private"))
        push_btn = gr.Button(t("push"))
    with gr.Row():
        quant = gr.Dropdown(list(gguf_export.QUANTS), value="f16", label=t("quant"))
        gguf_btn = gr.Button(t("gguf"))
    with gr.Row():
        gguf_file = gr.File(label=t("gguf_file"), interactive=False, height=80)
        modelfile_file = gr.File(label=t("modelfile"), interactive=False, height=80)
    message = gr.Markdown()

    # the server picks every output location: the zip is a download, the merged model goes to the
    # run's own folder (RUN_DIR/merged), and the page names it relative to the studio's home
    def do_zip(run_value, request: gr.Request):
        try:
            return export.zip_result(job_of(queue, run_value, request).run_dir)
        except ValueError as exc:
            raise error(exc)

    def do_merge(run_value, dtype_name, request: gr.Request, progress=gr.Progress()):
        run_dir = job_of(queue, run_value, request).run_dir
        progress(0, desc="merging")
        try:
            path = export.merge(run_dir, f"{run_dir}/merged", None if dtype_name == "auto" else dtype_name)
        except ValueError as exc:
            raise error(exc)
        return f"Merged model saved to `{access.redact(str(path))}` (push it to the Hub below, as merged)."

    def do_push(run_value, repo, token_value, what_value, is_private, request: gr.Request,
                progress=gr.Progress()):
        run_dir = job_of(queue, run_value, request).run_dir
        progress(0, desc="uploading")
        try:
            url = export.push(run_dir, repo, token_value, what=what_value, private=is_private)
        except ValueError as exc:
            raise error(exc)
        return f"Pushed to {url}"

    def do_gguf(run_value, quant_name, request: gr.Request, progress=gr.Progress()):
        run_dir = job_of(queue, run_value, request).run_dir
        folder = f"{run_dir}/gguf/{quant_name}"  # the server's choice, as the merge's RUN_DIR/merged
        try:
            report = gguf_export.export_gguf(run_dir, f"{folder}/{Path(run_dir).name}-{quant_name}.gguf", quant_name,
                                             ollama_dir=folder, progress=lambda f, text: progress(f, desc=text))
        except ValueError as exc:
            raise error(exc)
        differs = "".join(f"\n- answered differently: {p!r}" for p in report["parity"]["differs"])
        text = (f"GGUF saved to `{access.redact(report['gguf'])}` with an Ollama `Modelfile` beside it "
                f"(download both into one folder, then `ollama create NAME -f Modelfile` there)."
                f"\n\n{gguf_export.summary(report)}{differs}")
        return text, run_download(report["gguf"], run_dir), run_download(report["modelfile"], run_dir)

    zip_btn.click(do_zip, [run], [zip_file], api_name="export_zip")
    merge_btn.click(do_merge, [run, dtype], [message], api_name="export_merge")
    push_btn.click(do_push, [run, repo_id, token, what, private], [message], api_name="export_push")
    # outputs: the message first, as before, then the two downloads
    gguf_btn.click(do_gguf, [run, quant], [message, gguf_file, modelfile_file], api_name="export_gguf")
    return run
