"""Data tab: upload, detected format, column mapping, highlighted sample, token-length histogram."""

import html

import gradio as gr
import pandas as pd

from backend import access, data, service
from backend.config import FORMATS, DataArgs, settings

from .common import signed_in
from .i18n import t

RAW_TEXT = ("Raw text trains as continued pretraining: no chat template and no system prompt. A .txt file is "
            "split into documents at blank lines (a `text` column: one document per row). Each document ends "
            "with the model's end-of-text token; documents are concatenated and cut into blocks of max_length "
            "tokens, consecutive blocks sharing one token, and each document attends only to itself. Every "
            "token but a document's first is learned once per epoch; the last, shorter block is kept. "
            "The sample below is the first block exactly as trained ([[...]]: learned).")


def help_of(key: str) -> str:
    return next(s.help for s in settings() if s.name == key)


def highlight(sample: str, color: str = "#c7f0c2") -> str:
    """The sample with its [[loss-covered]] spans highlighted, as safe HTML."""
    out, rest = [], sample
    while "[[" in rest and "]]" in rest.split("[[", 1)[1]:
        before, after = rest.split("[[", 1)
        inside, rest = after.split("]]", 1)
        out.append(html.escape(before))
        out.append(f'<mark style="background:{color}">{html.escape(inside)}</mark>')
    out.append(html.escape(rest))
    return f'<pre style="white-space:pre-wrap">{"".join(out)}</pre>'


def check_dataset(file, fmt, mapping, system_prompt, max_length, request: gr.Request = None):
    """Returns (summary markdown, sample html, histogram frame, stored data path, p95 row tokens)."""
    if not file:
        return "Upload a dataset first.", "", None, "", None
    try:
        stored, s = service.check_upload(file, signed_in(request), fmt, mapping, system_prompt, int(max_length))
    except data.DataError as exc:
        return f"**Error:** {access.redact(str(exc))}", "", None, "", None
    lengths = s["token_lengths"]
    if s["format"] == "text":
        lines = [f"**text** (continued pretraining) · {s['documents']} documents, {s['tokens']} tokens, "
                 f"{s['blocks']} blocks of {s['block_length']} tokens · {s['train_rows']} train / "
                 f"{s['val_rows']} validation documents", RAW_TEXT]
    else:
        lines = [f"**{s['format']}** · {s['rows']} rows · {s['train_rows']} train / {s['val_rows']} validation",
                 f"tokens per row: min {lengths['min']}, median {lengths['p50']}, p95 {lengths['p95']}, "
                 f"max {lengths['max']}; {s['truncated']} longer than {int(max_length)} (truncated, not dropped)"]
    lines += [f"note: {n}" for n in s.get("notes", [])]
    row_tokens = min(s["block_length"], s["tokens"]) if s["format"] == "text" else lengths["p95"]  # a packed block
    sample = highlight(s["sample"])
    if s.get("sample_rejected"):  # a preference pair: the prompt with each answer, as the model sees them
        lines.append("A preference pair (stages dpo and orpo): the chosen answer in green, the rejected one in red.")
        sample = f"<b>chosen</b>{sample}<b>rejected</b>{highlight(s['sample_rejected'], '#f6c5c5')}"
    return "\n\n".join(lines), sample, pd.DataFrame(s["length_histogram"]), stored, row_tokens


def create_data_tab():
    with gr.Row():
        file = gr.File(label=t("dataset"), type="filepath")
        with gr.Column():
            fmt = gr.Dropdown(list(FORMATS), value=DataArgs.format, label=t("format"), info=help_of("format"))
            mapping = gr.Textbox(label=t("mapping"), lines=2, placeholder="prompt=question\ncompletion=reply")
            system_prompt = gr.Textbox(DataArgs.system_prompt, label=t("system_prompt"), info=help_of("system_prompt"))
            max_length = gr.Number(DataArgs.max_length, precision=0, minimum=16, label=t("max_length"),
                                   info=help_of("max_length"))
    check = gr.Button(t("check"), variant="primary")
    summary = gr.Markdown()
    with gr.Row():
        sample = gr.HTML(label=t("sample"))
        hist = gr.BarPlot(x="tokens", y="rows", label=t("lengths"), height=260)
    data_path, row_tokens = gr.State(""), gr.State(None)
    outputs = [summary, sample, hist, data_path, row_tokens]
    check.click(check_dataset, [file, fmt, mapping, system_prompt, max_length], outputs, api_name="prepare")
    file.upload(check_dataset, [file, fmt, mapping, system_prompt, max_length], outputs,
                api_visibility="private")
    return {"data_path": data_path, "row_tokens": row_tokens, "format": fmt, "mapping": mapping, "system_prompt": system_prompt,
            "max_length": max_length}
