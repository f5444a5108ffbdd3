"""The forgetting meter: does the tuned model still answer what the base model knew?

``general_questions.json`` ships general questions with short known answers (capitals, simple
arithmetic, simple facts), each ``{"question", "answers": [accepted substrings]}``; every one of
them is answered right by the embedded SmolLM2-135M-Instruct, greedily, under the default system
prompt (a slow test keeps the file honest). An answer is right when it contains an accepted
answer, case-insensitively; an accepted answer that starts or ends with a letter or digit must
stand as a whole word there, so "4" is not found in "14" nor "German" in "Germany".

    result = meter(playground.load_run(run_dir), run_dir)   # also writes RUN_DIR/forgetting.json
    summary(result)                                          # "kept 31 of 33"

``n`` counts the questions the BASE model gets right (with the run's system prompt, chat template
and weight precision), ``kept`` those of them the tuned model still gets right, ``changed`` lists
the lost ones with both answers. Both sides answer greedily with ``MAX_NEW_TOKENS`` new tokens.
Base answers are computed once per (model, its weight files, questions, system prompt, chat
template, precision) and cached in ``STUDIO_HOME/forgetting/base_answers.json``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import threading
import time
from pathlib import Path

from . import models, playground, template
from .config import RunSpec
from .paths import studio_home
from .runs import write_atomic

QUESTIONS = Path(__file__).with_name("general_questions.json")
MAX_NEW_TOKENS = 32
# Prompts per generate call. Greedy decoding of a small model reads every weight once per token
# whatever the batch, so one call for the 40 questions beats three of 16 on CPU.
BATCH = 64
REPORT = "forgetting.json"


# -- questions and scoring ----------------------------------------------------------------------
def load_questions(questions=None) -> list[dict]:
    """The questions: a list of ``{"question", "answers"}``, a JSON file of them, or the shipped set."""
    if questions is None or isinstance(questions, (str, Path)):
        path = Path(questions or QUESTIONS)
        questions = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, q in enumerate(questions, 1):
        if not (isinstance(q, dict) and str(q.get("question", "")).strip() and q.get("answers")
                and all(isinstance(a, str) and a.strip() for a in q["answers"])):
            raise ValueError(f"question {i}: expected {{\"question\": text, \"answers\": [text, ...]}}, got {q!r}")
        out.append({"question": q["question"].strip(), "answers": [a.strip() for a in q["answers"]]})
    return out


def _pattern(accepted: str) -> str:
    def word_edge(ch: str) -> bool:
        return ch.isascii() and ch.isalnum()

    return ("(?<![a-z0-9])" if word_edge(accepted[0]) else "") + re.escape(accepted.lower()) + \
        ("(?![a-z0-9])" if word_edge(accepted[-1]) else "")


def is_correct(answer: str, accepted: list[str]) -> bool:
    """``answer`` contains one of ``accepted`` (case-insensitive; whole words at letter/digit edges)."""
    text = " ".join((answer or "").lower().split())
    return any(a and re.search(_pattern(" ".join(a.split())), text) for a in accepted)


# -- base answers, cached -----------------------------------------------------------------------
def _precision_tag(method: str) -> str:
    """How the base weights are loaded for ``method`` on this machine (answers differ by dtype)."""
    if method == "qlora":
        return "nf4"
    prec = models.precision_for(method)
    return f"{prec.device}-{str(prec.weight_dtype).removeprefix('torch.')}"


def _model_stamp(model_path: str) -> list:
    """A local folder's weight files (name, size, mtime): retrained weights in the same folder miss the cache."""
    folder = Path(model_path)
    if not folder.is_dir():
        return []  # a hub id
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(model_path: str, prompts: list[str], system_prompt: str | None,
              chat_template: str | None = None, precision: str = "", max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    what = {"model": str(model_path), "weights": _model_stamp(model_path), "prompts": prompts,
            "system_prompt": system_prompt, "chat_template": chat_template, "precision": precision,
            "max_new_tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_path() -> Path:
    return studio_home() / "forgetting" / "base_answers.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache_entry(key: str, entry: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Held across read-modify-write: two processes (two runs, two test workers) adding entries at
    # once would otherwise each write back the file without the other's entry.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = _read_cache()
        cache[key] = entry
        write_atomic(path, json.dumps(cache, ensure_ascii=False, indent=1))


def _answers(loaded: playground.LoadedRun, side: str, prompts: list[str], system_prompt: str | None,
             batch_size: int = BATCH, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of one side of ``loaded`` to every prompt, ``batch_size`` per ``generate``."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [(side, [{"role": "user", "content": p}]) for p in prompts[start:start + batch_size]]
        out += playground.generate_rows(loaded, rows, system_prompt=system_prompt,
                                        max_new_tokens=max_new_tokens, temperature=0.0)
    return out


def standalone(model_path: str, system_prompt: str | None, chat_template: str | None, method: str,
                trust_remote_code: bool) -> playground.LoadedRun:
    """The base model alone, wrapped so ``playground.generate_rows`` can answer with it."""
    tokenizer = template.setup_chat_template(models.load_tokenizer(model_path, trust_remote_code), chat_template)
    model, _ = models.load_base(model_path, method, trust_remote_code)
    spec = RunSpec()
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, system_prompt=system_prompt))
    return playground.LoadedRun(spec, tokenizer, model.eval(), None, threading.Lock())


def base_answers(model_path: str, questions=None, system_prompt: str | None = RunSpec().data.system_prompt,
                 chat_template: str | None = None, method: str = "lora", trust_remote_code: bool = False,
                 loaded: playground.LoadedRun | None = None, batch_size: int = BATCH) -> list[str]:
    """The base model's greedy answers to ``questions`` (default: the shipped set), one per question."""
    prompts = [q["question"] for q in load_questions(questions)]
    return cached_base_answers(model_path, prompts, system_prompt, chat_template, method, trust_remote_code,
                               loaded, batch_size)


def cached_base_answers(model_path: str, prompts: list[str], system_prompt: str | None,
                        chat_template: str | None = None, method: str = "lora", trust_remote_code: bool = False,
                        loaded=None, batch_size: int = BATCH, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The base model's greedy answers to ``prompts``, computed once and cached (the module
    docstring; ``backend.replay`` uses it too). On a cache miss the answers come from ``loaded``'s
    base side when given (the run's model is already in memory; a function returning one is called
    only then), else the base model is loaded for ``method`` (which fixes its precision) and freed
    afterwards."""
    key = cache_key(model_path, prompts, system_prompt, chat_template, _precision_tag(method), max_new_tokens)
    hit = _read_cache().get(key)
    if hit and len(hit.get("answers", [])) == len(prompts):
        return hit["answers"]
    run = loaded() if callable(loaded) else loaded
    run = run or standalone(model_path, system_prompt, chat_template, method, trust_remote_code)
    answers = _answers(run, "base", prompts, system_prompt, batch_size, max_new_tokens)
    _write_cache_entry(key, {"model": str(model_path), "system_prompt": system_prompt, "precision": _precision_tag(method),
                             "time": time.time(), "questions": prompts, "answers": answers})
    return answers


# -- the meter ----------------------------------------------------------------------------------
def score(questions: list[dict], base: list[str], tuned: list[str]) -> dict:
    """``{"kept", "n", "total", "changed"}`` from both sides' answers (see the module docstring)."""
    kept, n, changed = 0, 0, []
    for q, b, t in zip(questions, base, tuned, strict=True):
        if not is_correct(b, q["answers"]):
            continue
        n += 1
        if is_correct(t, q["answers"]):
            kept += 1
        else:
            changed.append({"question": q["question"], "base": b, "tuned": t})
    return {"kept": kept, "n": n, "total": len(questions), "changed": changed}


def meter(loaded: playground.LoadedRun, run_dir=None, questions=None, batch_size: int = BATCH) -> dict:
    """How many of the general questions the base model gets right the tuned model still gets right.

    Uses the run's system prompt, chat template and precision; with ``run_dir`` the result is also
    written to ``RUN_DIR/forgetting.json``.
    """
    questions = load_questions(questions)
    spec = loaded.spec
    system = spec.data.system_prompt
    base = base_answers(models.resolve_model(spec.model.model), questions, system, spec.model.chat_template,
                        spec.model.method, spec.model.trust_remote_code, loaded=loaded, batch_size=batch_size)
    tuned = _answers(loaded, "tuned", [q["question"] for q in questions], system, batch_size)
    result = score(questions, base, tuned)
    result["checkpoint"] = loaded.checkpoint
    if run_dir is not None:
        path = Path(run_dir) / REPORT
        write_atomic(path, json.dumps({**result, "time": time.time()}, ensure_ascii=False, indent=1))
    return result


def read(run_dir) -> dict | None:
    """The run's last meter result (``RUN_DIR/forgetting.json``), or None."""
    try:
        return json.loads((Path(run_dir) / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary(result: dict | None) -> str:
    """One line for the Runs view and the CLI: ``kept 31 of 33 general answers``."""
    if not result:
        return "forgetting not measured"
    return f"kept {result['kept']} of {result['n']} general answers"


# -- drift: the meter's continuous companion ----------------------------------------------------
def drift(loaded: playground.LoadedRun, questions=None) -> float:
    """How far the tuned model moved from the base where the base knows what it would say: the
    mean over ``questions`` of the per-token KL(base || tuned), teacher-forced on the base's own
    greedy answer (cached, as for the meter). 0 for an unchanged model. kept k of n moves only when
    a greedy answer flips, so two runs that keep the same count may have drifted very differently
    (a run that barely trained flips little and still drifts); this separates them."""
    import torch
    import torch.nn.functional as F

    questions = load_questions(questions)
    spec, tok = loaded.spec, loaded.tokenizer
    system = spec.data.system_prompt
    base = base_answers(models.resolve_model(spec.model.model), questions, system, spec.model.chat_template,
                        spec.model.method, spec.model.trust_remote_code, loaded=loaded)
    total = 0.0
    with loaded.lock, torch.no_grad():
        for q, answer in zip(questions, base, strict=True):
            prompt = template.prompt_ids(tok, [{"role": "user", "content": q["question"]}], system)
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            ids = torch.tensor([prompt + answer_ids])
            logp = {}
            for side in ("base", "tuned"):
                model, context = loaded.model_for(side)
                with context:
                    logits = model(input_ids=ids.to(model.device)).logits[0, len(prompt) - 1:-1]
                logp[side] = logits.float().log_softmax(-1).cpu()
            total += F.kl_div(logp["tuned"], logp["base"], log_target=True, reduction="none").sum(-1).mean().item()
    return total / len(questions)
