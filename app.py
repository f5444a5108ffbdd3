"""The web app: wiring only. Each handler unpacks widget values and calls one backend function.

Today: the Data tab (upload, detected format, split, token lengths, the sample with the
loss-covered part marked) and a Compare tab (a finished run folder, one prompt, base and tuned
answers side by side). Training runs from the CLI until the queue lands.
"""

from __future__ import annotations

import os

import gradio as gr

from backend import data, models, template
from backend.playground import compare, load_run

_loaded: dict = {}


def prepare_upload(file, fmt, system_prompt, max_length):
    if file is None:
        return "Upload a file first.", ""
    tokenizer = template.setup_chat_template(models.load_tokenizer(models.resolve_model(None)))
    try:
        prepared = data.prepare(file, fmt=fmt, tokenizer=tokenizer, max_length=int(max_length),
                                system_prompt=system_prompt)
    except data.DataError as exc:
        return f"**Error:** {exc}", ""
    s = prepared.summary
    lines = [f"**{s['format']}**, {s['rows']} rows: {s['train_rows']} train / {s['val_rows']} validation",
             f"token lengths: {s['token_lengths']}", f"longer than {max_length} tokens: {s['truncated']}"]
    lines += [f"note: {n}" for n in s.get("notes", [])]
    return "\n\n".join(lines), s["sample"]


def answer_both(run_dir, prompt, max_new_tokens, temperature, seed):
    if not run_dir or not prompt:
        return "Give a run folder and a prompt.", ""
    if run_dir not in _loaded:
        _loaded.clear()  # keep one run in memory
        _loaded[run_dir] = load_run(run_dir)
    out = compare(_loaded[run_dir], prompt, max_new_tokens=int(max_new_tokens),
                  temperature=float(temperature), seed=int(seed))
    return out["base"], out["tuned"]


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="Fine-tuning studio") as demo:
        gr.Markdown("# Fine-tuning studio")
        with gr.Tab("Data"):
            with gr.Row():
                file = gr.File(label="Dataset (.json .jsonl .csv .parquet .txt)", type="filepath")
                with gr.Column():
                    fmt = gr.Dropdown(["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "text"],
                                      value="auto", label="Format")
                    system_prompt = gr.Textbox("You are a helpful assistant.", label="System prompt")
                    max_length = gr.Number(1024, precision=0, label="Max length (tokens)")
            check = gr.Button("Check dataset", variant="primary")
            summary = gr.Markdown()
            sample = gr.Textbox(label="First row as the model sees it ([[...]] is what the loss covers)",
                                lines=12)
            check.click(prepare_upload, [file, fmt, system_prompt, max_length], [summary, sample])
        with gr.Tab("Compare"):
            run_dir = gr.Textbox(label="Run folder")
            prompt = gr.Textbox(label="Prompt", value="Who are you?")
            with gr.Row():
                max_new = gr.Slider(8, 512, 128, step=8, label="Max new tokens")
                temperature = gr.Slider(0, 1.5, 0, step=0.05, label="Temperature (0 = greedy)")
                seed = gr.Number(0, precision=0, label="Seed")
            go = gr.Button("Generate both", variant="primary")
            with gr.Row():
                base = gr.Textbox(label="Base", lines=8)
                tuned = gr.Textbox(label="Tuned", lines=8)
            go.click(answer_both, [run_dir, prompt, max_new, temperature, seed], [base, tuned])
    return demo


if __name__ == "__main__":
    build_ui().launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860),
    )
