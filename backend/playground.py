"""Base vs tuned generation from a run folder: side by side (streamed), several runs, batches, blind votes.

``load_run(run_dir)`` loads what the run trained, the way it trained it: LoRA/QLoRA runs load the
base once (4-bit for qlora) with the adapter on top; full runs load the tuned weights beside the
base. Prompts are rendered exactly as in training (``template.prompt_ids`` with the run's chat
template and system prompt).

Both sides of an adapter run come from ONE batched ``generate`` call: each row names its adapter
(peft's mixed-adapter batches, ``adapter_names``; ``"__base__"`` runs the base weights alone), so
the base row is never answered with the adapter still on, and both answers stream together. A full
run generates its two sides on its two models in two threads; a DoRA or AdaLoRA run (which peft's
mixed batches do not support) toggles the adapter off for the base side, then on, under the run's
lock. ``CACHE`` keeps the loaded runs (least recently used evicted); ``CACHE.release()`` frees them
when a training job needs the GPU.

Opponents: the tuned side is compared with the base model (``"base"``), or, for a run started
from another run (``from_run``: a DPO/ORPO run on an SFT run), with that parent run's result
(``"parent"``: ``parent_dir``; pass the parent's ``LoadedRun`` as ``parent=`` and name the side
``"parent"``). The parent is loaded as its own run (``CACHE.get(parent, "result")``: the final result,
which is what the child started from) and its rows are generated beside the child's, with the
same settings and the child's system prompt.

Blind A/B: ``blind_order`` shuffles which side shows as A; ``record_vote`` appends to the run's
``votes.jsonl`` (with the opponent); ``vote_summary`` gives the tuned model's win rate, overall and
per opponent; ``preference_pairs`` turns the decisive votes into ``{prompt, chosen, rejected}`` rows
for DPO.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers.generation.streamers import BaseStreamer

from . import models, template
from .config import RunSpec
from .runs import RunFolder

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
VOTES = ("A", "B", "tie", "both_bad")
OPPONENTS = ("base", "parent")  # what the tuned side is compared with: the base model, or the parent run's result


class RunError(ValueError):
    """The run folder cannot be used for this (not finished, missing result...)."""


@dataclass
class LoadedRun:
    spec: RunSpec
    tokenizer: object
    base: object          # the base model (a PeftModel for adapter runs)
    tuned: object | None  # the full fine-tuned model; None for adapter runs
    lock: threading.Lock
    run_dir: str = ""
    checkpoint: str | None = None

    @property
    def adapter(self) -> str | None:
        return None if self.tuned is not None else getattr(self.base, "active_adapter", None)

    def model_for(self, side: str):
        """(model, context) that generates as ``side``: 'base' or 'tuned' (for one side alone)."""
        if side == "tuned":
            return (self.tuned, nullcontext()) if self.tuned is not None else (self.base, nullcontext())
        if self.tuned is None and hasattr(self.base, "disable_adapter"):
            return self.base, self.base.disable_adapter()
        return self.base, nullcontext()


def list_checkpoints(run_dir) -> list[str]:
    """The run's complete checkpoints, oldest first (names like ``checkpoint-20``)."""
    return [p.name for p in RunFolder(run_dir).checkpoints()]


def resolve_checkpoint(run_dir, checkpoint: str | None) -> str | None:
    """The checkpoint to load: ``checkpoint`` by name; None: the one the checkpoint advisor
    recommended, if any (``backend.advisor``); ``"result"`` or None without a recommendation:
    the final result (returned as None)."""
    from . import advisor

    if checkpoint is None:
        return advisor.checkpoint_for(run_dir)
    return None if checkpoint == advisor.RESULT else checkpoint


def result_dir(run_dir, checkpoint: str | None = None) -> Path:
    """The weights to load: the final result (None), or one of the run's checkpoints, named only as
    the run lists it (never a path: "../adapter", "/elsewhere")."""
    run = RunFolder(run_dir)
    if not run.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    listed = list_checkpoints(run_dir) if checkpoint else []
    if checkpoint and checkpoint not in listed:
        raise RunError(f"{run_dir} has no checkpoint {checkpoint!r} (its checkpoints: {', '.join(listed) or 'none'})")
    result = run.checkpoints_dir / checkpoint if checkpoint else run.result_dir()
    if result is None or not result.exists():
        raise RunError(f"{run_dir} has no trained result yet (state: {run.status().get('state')})")
    return result


def load_run(run_dir, checkpoint: str | None = None) -> LoadedRun:
    """The run's model as it trained it: ``checkpoint`` by name, ``"result"`` for the final result,
    None for the recommended checkpoint (the final result when none is recommended)."""
    if not RunFolder(run_dir).exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    result = result_dir(run_dir, checkpoint)
    spec = RunFolder(run_dir).spec()
    model_path = models.resolve_model(spec.model.model)
    tokenizer = template.setup_chat_template(
        models.load_tokenizer(model_path, spec.model.trust_remote_code), spec.model.chat_template
    )
    base, _ = models.load_base(model_path, spec.model.method, spec.model.trust_remote_code)
    tuned = None
    if spec.model.method == "full":
        tuned, _ = models.load_base(str(result), "full")
        tuned.eval()
    else:
        base = models.load_adapter(base, result)
    base.eval()
    return LoadedRun(spec, tokenizer, base, tuned, threading.Lock(), str(run_dir), checkpoint)


def parent_dir(run_dir) -> str:
    """The folder of the run ``run_dir`` started from (its ``from_run``). The web app checks that it is
    a run of the same user (``access.parent_job``) before loading it."""
    from_run = RunFolder(run_dir).spec().model.from_run
    if not from_run:
        raise RunError(f"{Path(run_dir).name}: this run has no parent run (it did not start from another run)")
    return from_run


def has_parent(run_dir) -> bool:
    """Whether the run started from another run (the Playground then offers the parent as opponent)."""
    run = RunFolder(run_dir)
    return run.exists() and bool(run.spec().model.from_run)


class ModelCache:
    """Loaded runs by (run folder, checkpoint), least recently used evicted beyond ``size``."""

    def __init__(self, size: int | None = None):
        self.size = size or int(os.environ.get("STUDIO_PLAYGROUND_CACHE", "2"))
        self._runs: OrderedDict[tuple, LoadedRun] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_dir, checkpoint: str | None = None) -> LoadedRun:
        from . import advisor

        checkpoint = resolve_checkpoint(run_dir, checkpoint or None)
        key = (str(Path(run_dir).resolve()), checkpoint)
        with self._lock:
            if key in self._runs:
                self._runs.move_to_end(key)
                return self._runs[key]
            while len(self._runs) >= self.size:
                self._runs.popitem(last=False)
            # resolved already: None now means the final result, which load_run calls "result"
            loaded = self._runs[key] = load_run(run_dir, checkpoint or advisor.RESULT)
            return loaded

    def release(self) -> None:
        """Drop every loaded model (a training job is about to need the memory)."""
        with self._lock:
            self._runs.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CACHE = ModelCache()


# -- generation ---------------------------------------------------------------------------------
class _RowStreamer(BaseStreamer):
    """Collects each row's new tokens as ``generate`` makes them (the first ``put`` is the prompt)."""

    def __init__(self, tokenizer, rows: list[int], texts: list[str], stop_ids: set[int], on_update=None):
        self.tokenizer, self.rows, self.texts, self.stop_ids = tokenizer, rows, texts, stop_ids
        self.on_update = on_update
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.done = [False] * len(rows)
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if self.done[i] or token in self.stop_ids:
                self.done[i] = True
                continue
            self.tokens[i].append(token)
            self.texts[self.rows[i]] = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True).strip()
        if self.on_update is not None:
            self.on_update(self.texts)

    def end(self):
        pass


def _sampling(temperature: float, top_p: float, top_k: int) -> dict:
    if temperature and temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def _generate_group(loaded: LoadedRun, model, prompts: list[list[int]], adapter_names, streamer,
                    max_new_tokens, repetition_penalty, seed, sampling) -> None:
    """One batched, left-padded ``generate`` of ``prompts`` on ``model``; results go to ``streamer``."""
    ids, mask, pad = template.left_pad(loaded.tokenizer, prompts, model.device)
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.no_grad():
        torch.manual_seed(seed)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                       repetition_penalty=repetition_penalty, eos_token_id=sorted(streamer.stop_ids),
                       pad_token_id=pad, streamer=streamer, **sampling, **extra)


def generate_rows(loaded: LoadedRun, rows: list[tuple[str, list[dict] | str]], system_prompt: str | None = None,
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 50,
                  repetition_penalty: float = 1.0, seed: int = 0, on_update=None,
                  parent: LoadedRun | None = None) -> list[str]:
    """Answer every ``(side, messages)`` row at once; returns the answers. A row whose messages are a
    string is a completion: the text is continued as raw text, without the chat template or system
    prompt (``template.text_prompt_ids``, as raw-text runs train). Adapter runs: one batched
    call, each row with its adapter; full runs: one batched call per model, in parallel threads;
    DoRA and AdaLoRA runs: one call per side, in turn. Rows on side ``"parent"`` are answered by
    ``parent``'s tuned model, beside the others (``_with_parent``). ``on_update(texts)`` is called as
    tokens come."""
    system = loaded.spec.data.system_prompt if system_prompt is None else system_prompt
    if any(side == "parent" for side, _ in rows):
        if parent is None:
            raise RunError(f"{Path(loaded.run_dir).name or 'this run'}: this run has no parent run loaded")
        return _with_parent(loaded, parent, rows, on_update, system_prompt=system, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    tok = loaded.tokenizer
    prompts = [template.text_prompt_ids(tok, m) if isinstance(m, str) else template.prompt_ids(tok, m, system)
               for _, m in rows]
    stop_ids = set(template.end_of_turn_ids(tok)) | {template.document_end_id(tok)}
    if tok.eos_token_id is not None:
        stop_ids.add(tok.eos_token_id)
    texts = [""] * len(rows)
    by_side = {side: [i for i, (s, _) in enumerate(rows) if s == side] for side in ("base", "tuned")}
    groups = []  # (model, row indices, adapter names, context) per generate call
    if loaded.tuned is not None:  # full: two models, two threads
        groups = [[(model, by_side[side], None, nullcontext())]
                  for side, model in (("base", loaded.base), ("tuned", loaded.tuned)) if by_side[side]]
    elif loaded.adapter and (loaded.spec.lora.use_dora or loaded.spec.lora.use_adalora):
        # peft's mixed batches support neither DoRA nor AdaLoRA: toggle the adapter, side after side
        groups = [[(loaded.base, by_side[side], None, loaded.model_for(side)[1])
                   for side in ("base", "tuned") if by_side[side]]]
    else:  # LoRA/QLoRA: one batched call, each row names its adapter
        adapter = loaded.adapter
        # a side other than base/tuned names another adapter loaded on the model (the advisor's checkpoints)
        names = [BASE_ADAPTER if side == "base" else adapter if side == "tuned" else side
                 for side, _ in rows] if adapter else None
        groups = [[(loaded.base, list(range(len(rows))), names, nullcontext())]]

    def work(calls):
        for model, idx, names, context in calls:
            with context:
                _generate_group(loaded, model, [prompts[i] for i in idx], names,
                                _RowStreamer(tok, idx, texts, stop_ids, on_update), max_new_tokens,
                                repetition_penalty, seed, _sampling(temperature, top_p, top_k))

    with loaded.lock:
        _in_threads(work, [(calls,) for calls in groups])
    return texts


def _in_threads(work, parts: list[tuple]) -> None:
    """``work(*part)`` for every part, each in its own thread; the first error is raised here. A
    single part runs in the caller's thread: torch's OpenMP threads wait for work by spinning only
    while no more threads than cores are managed, so a second thread team (one per calling thread)
    makes every parallel region wake its threads from sleep (README: cost of the default run)."""
    if len(parts) == 1:
        work(*parts[0])
        return
    errors: list[BaseException] = []

    def guarded(*args):
        try:
            work(*args)
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=part, daemon=True) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _with_parent(loaded: LoadedRun, parent: LoadedRun, rows, on_update, **settings) -> list[str]:
    """``rows`` with the ``"parent"`` rows answered by ``parent``'s tuned side and the rest by
    ``loaded``, the two runs in two threads, with the same settings (``settings`` names the system
    prompt: ``loaded``'s unless the caller gave one)."""
    texts = [""] * len(rows)
    lock = threading.Lock()
    parts = [(parent, [i for i, (s, _) in enumerate(rows) if s == "parent"], "tuned"),
             (loaded, [i for i, (s, _) in enumerate(rows) if s != "parent"], None)]

    def work(run, idx, side):
        def update(sub):
            with lock:
                for j, i in enumerate(idx):
                    texts[i] = sub[j]
                if on_update is not None:
                    on_update(list(texts))

        answers = generate_rows(run, [(side or rows[i][0], rows[i][1]) for i in idx], on_update=update, **settings)
        with lock:
            for j, i in enumerate(idx):
                texts[i] = answers[j]

    _in_threads(work, [part for part in parts if part[1]])
    return texts


def stream_rows(loaded: LoadedRun, rows: list[tuple[str, list[dict]]], **settings) -> Iterator[list[str]]:
    """``generate_rows`` streamed: yields the answers so far as they change, then the final list."""
    updates: queue.SimpleQueue = queue.SimpleQueue()
    done = object()
    result: dict = {}

    def run():
        try:
            result["texts"] = generate_rows(loaded, rows, on_update=lambda texts: updates.put(list(texts)), **settings)
        except BaseException as exc:  # surfaced in the caller's thread
            result["error"] = exc
        finally:
            updates.put(done)

    threading.Thread(target=run, daemon=True).start()
    last = None
    while (texts := updates.get()) is not done:
        if texts != last:
            last = texts
            yield texts
    if "error" in result:
        raise result["error"]
    yield result["texts"]


def stream(loaded: LoadedRun, messages: list[dict] | dict[str, list[dict]], sides=("base", "tuned"),
           **settings) -> Iterator[dict[str, str]]:
    """Both sides at once, streamed: yields ``{side: answer so far}``. ``messages`` is one
    conversation (last turn: the user's), or one per side (each side's own multi-turn history)."""
    per_side = messages if isinstance(messages, dict) else {side: messages for side in sides}
    for texts in stream_rows(loaded, [(side, per_side[side]) for side in sides], **settings):
        yield dict(zip(sides, texts))


def compare_messages(loaded: LoadedRun, messages, sides=("base", "tuned"), **settings) -> dict:
    """The answer of each side (``messages``: one conversation, or one per side)."""
    per_side = messages if isinstance(messages, dict) else {side: messages for side in sides}
    return dict(zip(sides, generate_rows(loaded, [(side, per_side[side]) for side in sides], **settings)))


def compare(loaded: LoadedRun, prompt: str, sides=("base", "tuned"), completion: bool = False, **settings) -> dict:
    """The same prompt, settings and seed on each side; ``completion``: the prompt continued as raw text."""
    return compare_messages(loaded, prompt if completion else [{"role": "user", "content": prompt}], sides, **settings)


def is_text_run(run_dir) -> bool:
    """Whether the run trained on raw text (its saved split holds documents): the Playground then
    completes prompts by default."""
    from . import data as data_mod

    train, _ = data_mod.load_split(RunFolder(run_dir).data_dir)
    return bool(train) and data_mod.is_document(train[0])


def compare_runs(run_dirs: list, prompt: str, cache: ModelCache | None = None, **settings) -> dict:
    """One prompt on the base model and on each run's tuned model: ``{"base": ..., run_id: ...}``.
    The base answer comes from the first run (its base model, template and system prompt)."""
    cache = cache or CACHE
    out = {}
    for i, run_dir in enumerate(run_dirs):
        sides = ("base", "tuned") if i == 0 else ("tuned",)
        answers = compare(cache.get(run_dir), prompt, sides, **settings)
        if i == 0:
            out["base"] = answers["base"]
        out[Path(run_dir).name] = answers["tuned"]
    return out


# -- batch comparison ---------------------------------------------------------------------------
def default_prompts(run_dir, limit: int = 20) -> list[dict]:
    """The run's validation conversations as ``{prompt, reference}`` (the training split if the
    run kept no validation rows): the last user turn and the answer the data gives."""
    from . import data as data_mod

    train, val = data_mod.load_split(RunFolder(run_dir).data_dir)
    rows = []
    for conv in (val or train)[:limit]:
        msgs = conv["messages"] if isinstance(conv, dict) else conv
        users = [m for m in msgs if m["role"] == "user"]
        answers = [m for m in msgs if m["role"] == "assistant"]
        if users:
            rows.append({"prompt": users[-1]["content"], "reference": answers[-1]["content"] if answers else ""})
    return rows


def parse_prompts(text: str) -> list[dict]:
    """Prompts pasted one per line, or JSONL rows with ``prompt`` (and optional ``reference``)."""
    rows = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            rows.append({"prompt": str(obj["prompt"]), "reference": str(obj.get("reference", ""))})
        else:
            rows.append({"prompt": line, "reference": ""})
    return rows


def batch_compare(loaded: LoadedRun, prompts: list[dict], batch_size: int = 8, progress=None,
                  opponent: str = "base", **settings) -> list[dict]:
    """The opponent's (base, or ``"parent"`` with ``parent=`` given) and tuned answers for every
    ``{prompt, reference}``, ``batch_size`` prompts per call. ``progress(done, total)`` is called after
    each batch."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = [(side, [{"role": "user", "content": p["prompt"]}]) for p in chunk for side in (opponent, "tuned")]
        texts = generate_rows(loaded, rows, **settings)
        for i, p in enumerate(chunk):
            out.append({"prompt": p["prompt"], "reference": p.get("reference", ""),
                        opponent: texts[2 * i], "tuned": texts[2 * i + 1]})
        if progress:
            progress(len(out), len(prompts))
    return out


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: model output starting like a formula (``=HYPERLINK(...)``,
    ``+cmd|...``) gets a leading single quote, as OWASP recommends against CSV injection. Such text
    (e.g. a ``- item`` list) then reads with the quote; the JSONL download keeps every answer exact."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_table(rows: list[dict], path) -> Path:
    """The comparison as CSV (formula-like cells neutralised, ``csv_cell``) or JSONL (exact), by the
    file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["prompt", "reference", "base", "tuned"])
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# -- blind A/B ------------------------------------------------------------------------------------
def blind_order(rng: random.Random | None = None, opponent: str = "base") -> tuple[str, str]:
    """Which side shows as A and which as B (the tuned side and ``opponent``), shuffled per prompt."""
    order = [opponent, "tuned"]
    (rng or random).shuffle(order)
    return order[0], order[1]


def votes_path(run_dir) -> Path:
    return Path(run_dir) / "votes.jsonl"


def record_vote(run_dir, prompt: str, order: tuple[str, str], answers: dict, vote: str,
                user: str = "", system_prompt: str | None = None) -> dict:
    """Append one blind vote to ``RUN_DIR/votes.jsonl``: ``vote`` is A, B, tie or both_bad, about
    the answers shown as A (``order[0]``) and B (``order[1]``): the tuned side and its opponent
    (``OPPONENTS``: base or parent), recorded as ``opponent``."""
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    opponent = next((s for s in order if s != "tuned"), None)
    if opponent not in OPPONENTS or "tuned" not in order or not all(answers.get(s) is not None for s in order):
        raise ValueError("a vote needs both answers: the tuned side's and its opponent's (base or parent)")
    winner = {"A": order[0], "B": order[1]}.get(vote)
    record = {"time": time.time(), "user": user, "prompt": prompt, "system_prompt": system_prompt,
              "a": order[0], "b": order[1], "opponent": opponent, "answers": {s: answers[s] for s in order},
              "vote": vote, "winner": winner}
    with votes_path(run_dir).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return record


def load_votes(run_dir) -> list[dict]:
    path = votes_path(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tally(votes: list[dict]) -> dict:
    counts = {"tuned": 0, "base": 0, "parent": 0, "tie": 0, "both_bad": 0}
    for v in votes:
        counts[v["winner"] or v["vote"]] += 1
    compared = len(votes) - counts["both_bad"]
    rate = (counts["tuned"] + 0.5 * counts["tie"]) / compared if compared else None
    return {"votes": len(votes), **counts, "tuned_win_rate": rate}


def vote_opponent(vote: dict) -> str:
    """The side a vote compared the tuned side with (votes recorded before opponents: the base)."""
    return vote.get("opponent") or next((s for s in (vote["a"], vote["b"]) if s != "tuned"), "base")


def vote_summary(run_dir) -> dict:
    """Counts, and the tuned model's win rate over the votes that compared (a tie counts half;
    'both bad' is left out): over all votes, and per opponent in ``by_opponent`` (base, parent;
    only those voted on)."""
    votes = load_votes(run_dir)
    by = {o: _tally([v for v in votes if vote_opponent(v) == o]) for o in OPPONENTS}
    return {**_tally(votes), "by_opponent": {o: t for o, t in by.items() if t["votes"]}}


def preference_pairs(run_dir) -> list[dict]:
    """Decisive votes (A or B) between two different answers as DPO rows: ``{prompt, chosen,
    rejected}``, with ``system`` when the vote was given under another system prompt."""
    pairs = []
    for v in load_votes(run_dir):
        loser = {v["a"]: v["b"], v["b"]: v["a"]}.get(v["winner"])  # the other side shown: base or parent vs tuned
        if loser is None or v["answers"][v["winner"]] == v["answers"][loser]:  # nothing to prefer
            continue
        pair = {"prompt": v["prompt"], "chosen": v["answers"][v["winner"]], "rejected": v["answers"][loser]}
        pairs.append({**pair, "system": v["system_prompt"]} if v.get("system_prompt") else pair)
    return pairs


def export_pairs(run_dir, path=None) -> Path:
    path = Path(path or Path(run_dir) / "preference_pairs.jsonl")
    rows = preference_pairs(run_dir)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
