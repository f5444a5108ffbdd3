"""The checkpoint advisor: which of a run's checkpoints learned the task and kept the rest.

After training, each complete checkpoint gets three numbers:

* ``eval_loss``: the validation loss the Trainer logged at that step (no extra cost: checkpoints and
  evaluations fall on the same steps);
* ``learned``: how close greedy answers to the validation prompts (at most ``PROMPTS`` of them, the
  training split's when there is no validation split; a raw-text document: its first half of words
  completed, its second half the reference) come to their references, as token-level F1:
  the overlap of the answer's and the reference's tokens (the model's own tokenizer, so Chinese
  counts as well as English), averaged over prompts. F1 rewards saying what the reference says and
  penalises padding it with other text, is cheap, and needs no second model; eval loss alone cannot
  tell whether the greedy answer is right;
* ``kept`` of ``n``: the forgetting meter on its shipped questions (``backend.forgetting``), measured
  only where it can change the choice (``measure_kept``): the final checkpoint reuses the run's own
  meter result, and an earlier one is measured only if it could win. A row not measured says
  ``kept: null``; the choice is the one measuring every row would give (tested).

The recommendation: among checkpoints that learned (F1 at least ``LEARNED`` of the best one's) and
keep at least ``KEEP`` of what the base knew, the one that learned most (F1 within ``TIE`` of the
best counts as a tie; then the lower eval loss, then the later step). When none of those keeps
enough, the one of them that keeps most, with what to change. The table
and the choice go to ``status.json`` (``checkpoints``, ``recommended``, ``recommended_reason``);
Playground, Export and the CLI use ``recommended`` by default (``checkpoint_for``).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from .runs import RunFolder

KEEP = 0.9
PROMPTS = 8
MAX_NEW_TOKENS = 48
TIE = 0.02
LEARNED = 0.8  # "learned": an F1 at least this share of the best checkpoint's
RESULT = "result"  # the run's final adapter/ or model/ folder


def token_f1(answer: str, reference: str, tokenizer) -> float:
    """Token-level F1 of ``answer`` against ``reference`` (bags of the tokenizer's tokens, lower case)."""
    a = Counter(tokenizer(answer.lower(), add_special_tokens=False)["input_ids"])
    r = Counter(tokenizer(reference.lower(), add_special_tokens=False)["input_ids"])
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def _prompt(messages: list[dict]) -> dict:
    """A validation row as ``{prompt, reference}``: the last question and its answer; a raw-text
    document's first half of words as a completion prompt, the rest as the reference."""
    from .data import is_document

    if is_document(messages):
        words = messages[0]["content"].split()
        half = max(1, len(words) // 2)
        return {"prompt": " ".join(words[:half]), "reference": " ".join(words[half:]), "completion": True}
    return {"prompt": [m for m in messages if m["role"] == "user"][-1]["content"],
            "reference": [m for m in messages if m["role"] == "assistant"][-1]["content"]}


def _rows(prompts: list[dict], side: str) -> list[tuple]:
    return [(side, p["prompt"] if p.get("completion") else [{"role": "user", "content": p["prompt"]}])
            for p in prompts]


def _mean_f1(answers: list[str], prompts: list[dict], tokenizer) -> float:
    scores = [token_f1(a, p["reference"], tokenizer) for a, p in zip(answers, prompts)]
    return round(sum(scores) / len(scores), 3) if scores else 0.0


def learned_scores(run_dir, checkpoints: list[str], prompts: list[dict]) -> dict[str, float]:
    """Each checkpoint's learned score: the mean token F1 of its greedy answers (``checkpoint_answers``)
    against the ``{prompt, reference}`` rows' references."""
    answers, tokenizer = checkpoint_answers(run_dir, checkpoints, prompts)
    return {name: _mean_f1(answers[name], prompts, tokenizer) for name in checkpoints}


def checkpoint_answers(run_dir, checkpoints: list[str], prompts: list[dict]) -> tuple[dict[str, list[str]], object]:
    """Each checkpoint's greedy answers to ``prompts``, and the tokenizer. A LoRA/QLoRA run loads its
    base once with every checkpoint's adapter on it and answers all of them in one batched
    ``generate`` (peft's mixed-adapter batches) instead of loading the base and decoding once per
    checkpoint. Full, DoRA and AdaLoRA runs (no mixed batches) load each checkpoint in turn."""
    from . import playground

    if not checkpoints:
        return {}, None
    spec = RunFolder(run_dir).spec()
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
    if spec.model.method == "full" or spec.lora.use_dora or spec.lora.use_adalora:
        answers = {}
        for name in checkpoints:
            loaded = playground.load_run(run_dir, name)
            answers[name] = playground.generate_rows(loaded, _rows(prompts, "tuned"), **settings)
        return answers, loaded.tokenizer
    loaded = playground.load_run(run_dir, checkpoints[0])
    adapters = {checkpoints[0]: loaded.adapter}
    for name in checkpoints[1:]:
        loaded.base.load_adapter(str(playground.result_dir(run_dir, name)), adapter_name=name)
        adapters[name] = name
    rows = [row for adapter in adapters.values() for row in _rows(prompts, adapter)]
    flat = playground.generate_rows(loaded, rows, **settings)
    n = len(prompts)
    return {name: flat[i * n:(i + 1) * n] for i, name in enumerate(checkpoints)}, loaded.tokenizer


def _kept_share(r) -> float:
    if r.get("kept") is None:
        return 0.0  # not measured: never counted as keeping enough
    return r["kept"] / r["n"] if r["n"] else 1.0


def _order(r):  # among near-ties in learning: the lower eval loss, then the later step
    return (r["eval_loss"] if r["eval_loss"] is not None else float("inf"), -r["step"])


def _learned(rows: list[dict]) -> list[dict]:
    """The rows that learned: F1 at least ``LEARNED`` of the best one's (an early checkpoint that keeps
    everything but learned nothing is no choice)."""
    best = max(r["learned"] for r in rows)
    return [r for r in rows if r["learned"] >= LEARNED * best]


def recommend(rows: list[dict]) -> tuple[str | None, str]:
    """The checkpoint to use, and why, from rows ``{checkpoint, step, eval_loss, learned, kept, n}``."""
    if not rows:
        return None, "no checkpoints were measured"
    learned = _learned(rows)
    good = [r for r in learned if _kept_share(r) >= KEEP]
    if good:
        top = max(r["learned"] for r in good)
        pick = min((r for r in good if r["learned"] >= top - TIE), key=_order)
        return pick["checkpoint"], (f"{pick['checkpoint']} (step {pick['step']}) learned best (F1 {pick['learned']:.2f}) "
                                    f"among the checkpoints that keep at least {KEEP:.0%} of the general answers "
                                    f"the base knew ({pick['kept']} of {pick['n']})")
    pick = max(learned, key=lambda r: (_kept_share(r), r["learned"]))
    return pick["checkpoint"], (f"every checkpoint that learned forgets: none keeps {KEEP:.0%} of the general "
                                f"answers the base knew; {pick['checkpoint']} keeps most ({pick['kept']} of "
                                f"{pick['n']}). " + advice())


def measure_kept(rows: list[dict], measure) -> list[dict]:
    """Fill in ``kept``/``n`` (``measure(row) -> {"kept", "n"}``) only on the rows that can change
    ``recommend``'s choice: the meter costs as much as a short run on CPU, and a run that keeps
    enough at its best-learned checkpoint needs no other measured. Rows already measured are reused.

    The checkpoints that learned are measured from the best-learned down until one keeps enough
    (every one when none does: then the choice is the one that keeps most). Of its near-ties in
    learning, only those that ``recommend`` would prefer to it are measured, best first, until one
    keeps enough. A row left unmeasured could not have been chosen."""
    def keeps(r) -> bool:
        if r.get("kept") is None:
            r.update(measure(r))
        return _kept_share(r) >= KEEP

    if not rows:
        return rows
    learned = sorted(_learned(rows), key=lambda r: (-r["learned"], _order(r)))
    top = next((r for r in learned if keeps(r)), None)
    if top is not None:
        for r in sorted((r for r in learned if r["learned"] >= top["learned"] - TIE), key=_order):
            if keeps(r):  # the best-ordered near-tie that keeps enough is the choice; later ones cannot be
                break
    return rows


def advice(spec=None) -> str:
    """What to change when a run forgets, concretely."""
    steps = []
    if spec is None or not (spec.data.mix_data and spec.data.mix_ratio):
        steps.append("turn replay on (--set mix_data=replay --set mix_ratio=1)")
    elif spec.data.mix_ratio < 2:
        steps.append(f"mix in more replay rows (mix_ratio={spec.data.mix_ratio:g} -> {spec.data.mix_ratio * 2:g})")
    lr = spec.train.learning_rate if spec is not None else None
    steps.append(f"lower learning_rate{f' ({lr:g} -> {lr / 2:g})' if lr else ''}")
    epochs = spec.train.num_train_epochs if spec is not None else None
    steps.append(f"train fewer epochs{f' (num_train_epochs={epochs:g} -> {max(epochs - 1, 1):g})' if epochs else ''}")
    return "Try: " + "; ".join(steps) + "."


def _eval_losses(run: RunFolder) -> dict[int, float]:
    return {m["step"]: m["eval_loss"] for m in run.metrics() if "eval_loss" in m}


def advise(run_dir, result_forgetting: dict | None = None) -> dict:
    """Measure every complete checkpoint of the run, pick one, and record both in ``status.json``.

    ``result_forgetting``: the meter's result on the run's final weights, reused for the checkpoint
    at the final step (the same weights)."""
    from . import forgetting, playground
    from .data import load_split

    run = RunFolder(run_dir)
    t0 = time.time()
    status = run.status()
    train_rows, val_rows = load_split(run.data_dir, rows=True)
    source = [r for r in (val_rows or train_rows) if not r.get("mixed_from")][:PROMPTS]
    prompts = [_prompt(r["messages"]) for r in source]
    losses = _eval_losses(run)
    final_step = status.get("step")
    rows = []
    names = [folder.name for folder in run.checkpoints()]
    for name, learned in learned_scores(run.path, names, prompts).items():
        step = int(name.rsplit("-", 1)[1])
        reuse = result_forgetting if step == final_step and not status.get("best_step") else None
        rows.append({"checkpoint": name, "step": step, "eval_loss": losses.get(step), "learned": learned,
                     "kept": reuse and reuse["kept"], "n": reuse and reuse["n"]})

    def meter(r):
        result = forgetting.meter(playground.load_run(run.path, r["checkpoint"]), None)
        return {"kept": result["kept"], "n": result["n"]}

    measure_kept(rows, meter)
    return record(run.path, rows, advisor_seconds=round(time.time() - t0, 1))


def record(run_dir, rows: list[dict], **extra) -> dict:
    """Choose from the measured ``rows`` and write the table and the choice to ``status.json``."""
    run = RunFolder(run_dir)
    choice, reason = recommend(rows)
    if choice is not None and choice == rows[-1]["checkpoint"] and run.result_dir() and \
            not run.status().get("best_step"):
        choice = RESULT  # the final checkpoint holds the result's weights: use the result folder
    reason = reason.replace(advice(), advice(run.spec()))  # concrete for this run's settings
    fields = {"checkpoints": rows, "recommended": choice, "recommended_reason": reason, **extra}
    run.set_status(**fields)
    return fields


def checkpoint_for(run_dir) -> str | None:
    """The checkpoint Playground, Export and the CLI use by default: the recommended one, or None
    (the run's final result) when the run records none or recommends its result."""
    recommended = RunFolder(run_dir).status().get("recommended")
    if not recommended or recommended == RESULT:
        return None
    if not (RunFolder(run_dir).checkpoints_dir / recommended).exists():
        return None  # deleted since: fall back to the result
    return recommended


def table(status: dict) -> str:
    """The checkpoints as a markdown table, the recommended one marked."""
    rows = status.get("checkpoints") or []
    if not rows:
        return ""
    pick = status.get("recommended")
    last = rows[-1]["checkpoint"]
    lines = ["| checkpoint | eval loss | learned (F1) | kept |", "|---|---|---|---|"]
    for r in rows:
        mark = pick == r["checkpoint"] or (pick == RESULT and r["checkpoint"] == last)
        loss = f"{r['eval_loss']:.3f}" if r["eval_loss"] is not None else "-"
        kept = f"{r['kept']} of {r['n']}" if r.get("kept") is not None else "not needed"
        lines.append(f"| {'**' + r['checkpoint'] + '** (recommended)' if mark else r['checkpoint']} | {loss} | "
                     f"{r['learned']:.2f} | {kept} |")
    if any(r.get("kept") is None for r in rows):
        lines.append("\n*not needed*: the meter was not run there; that checkpoint could not have been chosen.")
    return "\n".join(lines)


def folder_of(run_dir, checkpoint: str | None) -> Path | None:
    """The weights folder of ``checkpoint`` (None: the result)."""
    run = RunFolder(run_dir)
    return run.checkpoints_dir / checkpoint if checkpoint else run.result_dir()
