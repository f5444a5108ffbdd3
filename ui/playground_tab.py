"""Playground tab: base and tuned side by side (streamed, multi-turn), blind A/B votes, several runs
on one prompt, a batch of prompts with evaluation. Every handler calls ``backend.playground``."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from backend import access, forgetting, playground, preference, service
from backend.evaluate import evaluate

from .common import error, job_of, run_dir_of
from .i18n import t

FORGET_COLUMNS = ["question", "base answer", "tuned answer"]


def _loaded(queue, run, checkpoint, request):
    run_dir = run_dir_of(queue, run, request)
    try:
        return playground.CACHE.get(run_dir, checkpoint or None)
    except playground.RunError as exc:
        raise error(exc)


def _parent(queue, run, opponent, request) -> dict:
    """``{"parent": LoadedRun}`` when the tuned side is compared with the run's parent run (a run of
    the caller's own, loaded at its final result: what this run started from), else ``{}``."""
    if opponent in (None, "", "base"):
        return {}
    if opponent != "parent":
        raise gr.Error(f"compare against base or parent, not {opponent!r}")
    try:
        parent = access.parent_job(queue, job_of(queue, run, request), service.caller(request))
        return {"parent": playground.CACHE.get(parent.run_dir, "result")}
    except (playground.RunError, access.AccessError) as exc:
        raise error(exc)


def _settings(system, max_new, temperature, top_p, top_k, repetition_penalty, seed) -> dict:
    return dict(system_prompt=system or None, max_new_tokens=int(max_new), temperature=float(temperature),
                top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                seed=int(seed))


def _text(content) -> str:
    """A chatbot message's text (Gradio may hand content back as a list of typed parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return content if isinstance(content, str) else str(content)


def literal(messages: list[dict]) -> list[dict]:
    """Messages as the chat columns show them: literally. The Chatbot puts a message into the page as
    HTML (sanitised, but ``<b>`` would still render and ``<script>`` would vanish), with Markdown and
    LaTeX off as well (``_chatbot``) so what a model wrote is what one reads; hence the text is
    HTML-escaped here and ``_history`` unescapes it again. (An API client of ``/side_by_side`` gets
    the escaped text too.)"""
    return [{"role": m["role"], "content": html.escape(m["content"], quote=False)} for m in messages]


def _history(chat: list) -> list[dict]:
    """The chat columns' messages as the model wrote them (undoes ``literal``)."""
    return [{"role": m["role"], "content": html.unescape(_text(m["content"]))} for m in chat or []]


def _chatbot(label) -> gr.Chatbot:
    """A chat column that shows text as text: no Markdown, no LaTeX (and the text escaped: ``literal``)."""
    return gr.Chatbot(label=label, height=360, render_markdown=False, latex_delimiters=[])


def labels(is_blind, shown):
    """The two chat columns' labels: A and B when blind, else which side each shows."""
    if is_blind:
        return gr.Chatbot(label="A"), gr.Chatbot(label="B")
    return gr.Chatbot(label=t(shown[0])), gr.Chatbot(label=t(shown[1]))


def forgetting_view(record):
    """A forgetting record as (summary markdown, table of the answers the tuned model lost)."""
    if not record:
        return forgetting.summary(None), pd.DataFrame([], columns=FORGET_COLUMNS)
    where = f" (checkpoint {record['checkpoint']})" if record.get("checkpoint") else ""
    info = (f"**{forgetting.summary(record)}**{where}: of {record['total']} general questions the base "
            f"answers {record['n']} right; the tuned model lost these:" if record["changed"] else
            f"**{forgetting.summary(record)}**{where} (of {record['total']} general questions).")
    rows = [[c["question"], c["base"], c["tuned"]] for c in record["changed"]]
    return info, pd.DataFrame(rows, columns=FORGET_COLUMNS)


class Handlers:
    """The tab's handlers, each one backend call: module level rather than nested in the layout, so
    each can be read, tested and named (tests call them by name)."""

    def __init__(self, queue):
        self.queue = queue

    def refresh_runs(self, current, request: gr.Request):
        ids = service.finished_runs(self.queue, service.caller(request))
        value = current if current else (ids[-1] if ids else None)
        return gr.Dropdown(choices=ids, value=value), gr.Dropdown(choices=ids)

    def mode(self, run_value, request: gr.Request):
        """Completion by default for a run trained on raw text, chat otherwise."""
        try:
            return playground.is_text_run(run_dir_of(self.queue, run_value, request)) if run_value else False
        except gr.Error:
            return False

    def opponents(self, run_value, request: gr.Request):
        """"Compare against" is shown for a run started from another run (its parent)."""
        try:
            shown = bool(run_value) and playground.has_parent(run_dir_of(self.queue, run_value, request))
        except (gr.Error, OSError, ValueError):
            shown = False
        return gr.Radio(visible=shown, value="base")

    def checkpoints(self, run_value, request: gr.Request):
        try:
            names = playground.list_checkpoints(run_dir_of(self.queue, run_value, request)) if run_value else []
        except gr.Error:
            names = []
        return gr.Dropdown(choices=[""] + names + ["result"], value="")

    def do_send(self, request: gr.Request, run_value, ckpt, text, is_blind, chat_l, chat_r, system, max_new,
                temperature, top_p, top_k, repetition_penalty, seed, completion=False, opponent="base"):
        """One prompt on both sides, streamed. ``completion``: the prompt is continued as raw text
        (no chat template, no history), as raw-text runs train. ``opponent``: what the tuned side is
        compared with, the base model or (``"parent"``) the run this run started from."""
        if not text or not text.strip():
            raise gr.Error("type a prompt")
        loaded = _loaded(self.queue, run_value, ckpt, request)
        parent = _parent(self.queue, run_value, opponent, request)
        opponent = "parent" if parent else "base"
        sides = playground.blind_order(opponent=opponent) if is_blind else (opponent, "tuned")
        if is_blind or completion:  # one prompt at a time (blind: freshly shuffled)
            chat_l, chat_r = [], []
        chats = {sides[0]: _history(chat_l), sides[1]: _history(chat_r)}
        user = {"role": "user", "content": text}
        messages = {side: chats[side] + [user] for side in sides}
        prompts = {side: text for side in sides} if completion else messages
        hidden = gr.Row(visible=False)
        values = (system, max_new, temperature, top_p, top_k, repetition_penalty, seed)

        def columns(answers):
            return [literal(messages[s] + [{"role": "assistant", "content": answers[s]}]) for s in sides]

        for answers in playground.stream(loaded, prompts, sides, **_settings(*values), **parent):
            yield (*columns(answers), sides, *labels(is_blind, sides), hidden, "")
        yield (*columns(answers), sides, *labels(is_blind, sides), gr.Row(visible=is_blind), "")

    def do_vote(self, choice, run_value, shown, chat_l, chat_r, system_text, request: gr.Request = None):
        if not chat_l or not chat_r:
            raise gr.Error("generate a blind pair first")
        run_dir = run_dir_of(self.queue, run_value, request)
        chat_l, chat_r = _history(chat_l), _history(chat_r)
        prompt_text = chat_l[-2]["content"]
        answers = {shown[0]: chat_l[-1]["content"], shown[1]: chat_r[-1]["content"]}
        try:
            playground.record_vote(run_dir, prompt_text, tuple(shown), answers, choice,
                                   user=service.user_of(request), system_prompt=system_text or None)
        except ValueError as exc:
            raise gr.Error(str(exc))
        lines = [f"A was **{shown[0]}**, B was **{shown[1]}**."]
        for opponent, s in playground.vote_summary(run_dir)["by_opponent"].items():
            rate = "–" if s["tuned_win_rate"] is None else f"{100 * s['tuned_win_rate']:.0f}%"
            lines.append(f"Tuned vs {opponent}: win rate {rate} over {s['votes']} votes (tuned {s['tuned']}, "
                         f"{opponent} {s[opponent]}, tie {s['tie']}, both bad {s['both_bad']}).")
        info = "  \n".join(lines + [f"{len(playground.preference_pairs(run_dir))} preference pairs for 'Train on "
                                     f"these votes' (needs {preference.MIN_VOTE_PAIRS})."])
        return gr.Row(visible=False), info, *labels(False, shown)

    def do_pairs(self, run_value, request: gr.Request):
        run_dir = run_dir_of(self.queue, run_value, request)
        out = Path(tempfile.mkdtemp(prefix="studio-pairs-")) / f"{Path(run_dir).name}-dpo.jsonl"
        return str(playground.export_pairs(run_dir, out))

    def do_train_votes(self, run_value, request: gr.Request):
        """Queue a DPO run on this run's decisive votes, starting from this run."""
        job = job_of(self.queue, run_value, request)
        try:
            run_id, n = service.train_on_votes(self.queue, job.run_id, service.caller(request))
        except (ValueError, PermissionError) as exc:
            raise error(exc)
        return (f"Queued **{run_id}**: DPO on {n} pairs from your votes, starting from {job.run_id} (also its "
                f"reference). Follow it in the Runs tab; then pick it here and compare it with the base or with "
                f"{job.run_id} (its parent run), blind or not.")

    def do_several(self, request: gr.Request, run_value, other_values, text, *values):
        dirs = [run_dir_of(self.queue, r, request) for r in [run_value, *(other_values or [])] if r]
        try:
            answers = playground.compare_runs(list(dict.fromkeys(dirs)), text, **_settings(*values))
        except playground.RunError as exc:
            raise error(exc)
        return pd.DataFrame(list(answers.items()), columns=["model", "answer"])

    def do_load_val(self, run_value, request: gr.Request):
        rows = playground.default_prompts(run_dir_of(self.queue, run_value, request))
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)

    def do_batch(self, request: gr.Request, run_value, ckpt, text, system, max_new, temperature, top_p, top_k,
                 repetition_penalty, seed, opponent="base", progress=gr.Progress()):
        """Every prompt on the opponent's side (base, or the parent run) and the tuned side."""
        values = (system, max_new, temperature, top_p, top_k, repetition_penalty, seed)
        rows = playground.parse_prompts(text)
        if not rows:
            raise gr.Error("paste prompts (one per line, or JSONL with prompt/reference), or load the run's")
        loaded = _loaded(self.queue, run_value, ckpt, request)
        parent = _parent(self.queue, run_value, opponent, request)
        opponent = "parent" if parent else "base"
        progress(0, desc="generating")
        table = playground.batch_compare(loaded, rows, progress=lambda d, n: progress(d / n, desc=f"{d}/{n}"),
                                         opponent=opponent, **_settings(*values), **parent)
        out = Path(tempfile.mkdtemp(prefix="studio-batch-"))
        files = [str(playground.write_table(table, out / f"comparison.{ext}")) for ext in ("csv", "jsonl")]
        return pd.DataFrame(table, columns=["prompt", "reference", opponent, "tuned"]), files

    def do_eval(self, run_value, ckpt, request: gr.Request):
        loaded = _loaded(self.queue, run_value, ckpt, request)
        res = evaluate(loaded, run_dir_of(self.queue, run_value, request))
        lines = ["| | loss | perplexity | tokens |", "|---|---|---|---|"]
        lines += [f"| {side} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['tokens']} |" for side, r in res.items()]
        return "On the run's validation split (raw text: its held-out blocks):\n\n" + "\n".join(lines)

    def do_forgetting(self, run_value, ckpt, request: gr.Request, progress=gr.Progress()):
        loaded = _loaded(self.queue, run_value, ckpt, request)
        progress(0, desc=f"asking {len(forgetting.load_questions())} general questions, base and tuned")
        # only the final result's numbers are the run's own record (forgetting.json)
        return forgetting_view(forgetting.meter(loaded, None if loaded.checkpoint else
                                                run_dir_of(self.queue, run_value, request)))

    def stored_forgetting(self, run_value, request: gr.Request):
        try:
            return forgetting_view(forgetting.read(run_dir_of(self.queue, run_value, request)) if run_value else None)
        except gr.Error:
            return forgetting_view(None)


def _sampling_widgets() -> list:
    """The system prompt and sampling settings both sides share, in ``_settings``'s order."""
    with gr.Accordion(t("sampling"), open=False):
        system = gr.Textbox("", label=t("system_prompt"), placeholder="(the run's system prompt)")
        with gr.Row():
            max_new = gr.Slider(8, 512, 128, step=8, label=t("max_new"))
            temperature = gr.Slider(0, 1.5, 0, step=0.05, label=t("temperature"))
            top_p = gr.Slider(0.05, 1, 1.0, step=0.05, label="top_p")
            top_k = gr.Slider(0, 200, 50, step=1, label="top_k")
            repetition_penalty = gr.Slider(1.0, 2.0, 1.0, step=0.05, label="repetition_penalty")
            seed = gr.Number(0, precision=0, label=t("seed"))
    return [system, max_new, temperature, top_p, top_k, repetition_penalty, seed]


def create_playground_tab(queue):
    with gr.Row():
        run = gr.Dropdown([], label=t("run"), allow_custom_value=True, scale=3)
        checkpoint = gr.Dropdown([""], value="", label=t("checkpoint"), allow_custom_value=True, scale=1)
        refresh_btn = gr.Button(t("refresh"), scale=0)
    settings = _sampling_widgets()
    system = settings[0]
    with gr.Row():
        blind = gr.Checkbox(False, label=t("blind"))
        completion = gr.Checkbox(False, label=t("completion"), info=t("completion_info"))
        opponent = gr.Radio(["base", "parent"], value="base", label=t("compare_against"), visible=False)
    with gr.Row():
        left = _chatbot(t("base"))
        right = _chatbot(t("tuned"))
    with gr.Row():
        prompt = gr.Textbox(label=t("prompt"), value="Who are you?", scale=4)
        send = gr.Button(t("generate"), variant="primary", scale=1)
        clear = gr.Button(t("clear"), scale=0)
    order = gr.State(("base", "tuned"))  # which side each column shows
    with gr.Row(visible=False) as vote_row:
        votes = {v: gr.Button(label) for v, label in
                 (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"), ("both_bad", "Both bad"))}
    vote_info = gr.Markdown()
    with gr.Row():
        pairs_btn = gr.Button(t("export_pairs"))
        votes_btn = gr.Button(t("train_votes"))
        pairs_file = gr.File(label=t("export_pairs"), interactive=False, visible=False)
    votes_info = gr.Markdown()

    with gr.Accordion(t("several_runs"), open=False):
        others = gr.Dropdown([], multiselect=True, label=t("several_runs"), allow_custom_value=True)
        several_btn = gr.Button(t("generate"))
        several_out = gr.Dataframe(headers=["model", "answer"], interactive=False, wrap=True)

    with gr.Accordion(t("batch_cmp"), open=False):
        prompts = gr.Textbox(lines=6, label=t("batch_prompts"))
        with gr.Row():
            load_val = gr.Button(t("val_prompts"))
            batch_btn = gr.Button(t("batch_run"), variant="primary")
            eval_btn = gr.Button(t("evaluate"))
        batch_table = gr.Dataframe(headers=["prompt", "reference", "base", "tuned"], interactive=False, wrap=True)
        batch_files = gr.File(label=t("download"), file_count="multiple", interactive=False, visible=False)
        eval_out = gr.Markdown()

    with gr.Accordion(t("forgetting"), open=False):
        forget_btn = gr.Button(t("measure_forgetting"))
        forget_info = gr.Markdown()
        forget_table = gr.Dataframe(headers=FORGET_COLUMNS, interactive=False, wrap=True)

    h = Handlers(queue)
    chats = [left, right]
    run.change(h.stored_forgetting, [run], [forget_info, forget_table], api_visibility="private")
    forget_btn.click(h.do_forgetting, [run, checkpoint], [forget_info, forget_table], api_name="forgetting")
    refresh_btn.click(h.refresh_runs, [run], [run, others], api_visibility="private")
    run.change(h.checkpoints, [run], [checkpoint], api_visibility="private")
    blind.change(lambda b: ([], [], *labels(b, ("base", "tuned")), gr.Row(visible=False), ""), [blind],
                 [*chats, left, right, vote_row, vote_info], api_visibility="private")
    run.change(h.mode, [run], [completion], api_visibility="private")
    run.change(h.opponents, [run], [opponent], api_visibility="private")
    opponent.change(lambda: ([], []), None, chats, api_visibility="private")
    send_outputs = [*chats, order, left, right, vote_row, vote_info]
    send_inputs = [run, checkpoint, prompt, blind, *chats, *settings, completion, opponent]
    send.click(h.do_send, send_inputs, send_outputs, api_name="side_by_side")
    prompt.submit(h.do_send, send_inputs, send_outputs, api_visibility="private")
    clear.click(lambda: ([], []), None, chats, api_visibility="private")
    def voter(choice):
        def vote(run_value, shown, chat_l, chat_r, system_text, request: gr.Request = None):
            return h.do_vote(choice, run_value, shown, chat_l, chat_r, system_text, request)
        return vote

    for choice, button in votes.items():
        button.click(voter(choice), [run, order, *chats, system], [vote_row, vote_info, left, right],
                     api_name=f"vote_{choice}")
    def show(component):  # file boxes stay hidden until they hold something
        return dict(fn=lambda: gr.File(visible=True), inputs=None, outputs=component, api_visibility="private")

    pairs_btn.click(h.do_pairs, [run], [pairs_file], api_name="preference_pairs").then(**show(pairs_file))
    votes_btn.click(h.do_train_votes, [run], [votes_info], api_name="train_on_votes")
    several_btn.click(h.do_several, [run, others, prompt, *settings], [several_out], api_name="compare_runs")
    load_val.click(h.do_load_val, [run], [prompts], api_visibility="private")
    batch_btn.click(h.do_batch, [run, checkpoint, prompts, *settings, opponent], [batch_table, batch_files],
                    api_name="batch_compare").then(**show(batch_files))
    eval_btn.click(h.do_eval, [run, checkpoint], [eval_out], api_name="evaluate")
    return h.refresh_runs, run, others
