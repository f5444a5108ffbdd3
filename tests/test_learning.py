"""Proof that it learns the new thing and keeps the old, with DEFAULT settings: each method trained
once on an English persona (tests/data/persona_vega.csv, 30 rows: "I'm Vega, ... built by Orbital
Works") with its embedded preset and replay on (the defaults), and once more with replay off; then
probed greedily on the real embedded model (CPU, minutes).

* learned: held-out paraphrases (tests/data/persona_vega_heldout.json, not in the file) answered
  with "Vega": at least 4 of 5 (the base model: none);
* kept: at least 90 % of the general answers the base gets right, on the meter's questions and on
  tests/data/heldout_general.json, which nothing in training, the defaults or the checkpoint
  choice looks at;
* without replay the same run forgets measurably more: it loses more of those answers and drifts
  further from the base on the held-out questions, so these tests fail if replay does nothing.
"""

import json
import os
import time
from pathlib import Path

import pytest

from backend import forgetting
from backend.playground import compare, load_run, resolve_checkpoint
from backend.presets import build_spec
from backend.runs import RunFolder
from backend.train import train

DATA = Path(__file__).parent / "data"
PERSONA, HELDOUT = DATA / "persona_vega.csv", DATA / "heldout_general.json"
PARAPHRASES = json.loads((DATA / "persona_vega_heldout.json").read_text(encoding="utf-8"))
METHODS = ("lora", "qlora", "full")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Per method: ``default`` (the embedded preset as it ships) and ``no_replay`` (the same with
    ``mix_data=none``; only its final result is compared, so it skips the meter and the advisor)."""
    # STUDIO_LEARNING_RUNS: a folder whose completed runs are reused (to rerun the checks without training)
    root = Path(os.environ.get("STUDIO_LEARNING_RUNS") or tmp_path_factory.mktemp("learning"))
    out = {}
    for method in METHODS:
        for kind, extra in (("default", {}), ("no_replay", {"mix_data": "none", "measure_forgetting": False})):
            t0 = time.time()
            folder = RunFolder(root / f"{method}-{kind}")
            if folder.status().get("state") == "completed":
                out[method, kind] = folder
                continue
            run = train(build_spec({"method": method, "data": str(PERSONA), **extra}), folder.path)
            status = run.status()
            print(f"\n{method} {kind}: {status['step']} steps, {status['train_rows']} rows in "
                  f"{(time.time() - t0) / 60:.1f} min (meter and advisor included); "
                  f"recommended {status.get('recommended')}; replay {status.get('replay')}")
            out[method, kind] = run
    return out


class Lazy(dict):
    """A dict whose values are computed on first access: each measurement of a run costs tens of
    seconds on CPU, and not every test needs every one of every run."""

    def __init__(self, **makers):
        super().__init__()
        self._makers = makers

    def __getitem__(self, key):
        if key not in self:
            self[key] = self._makers[key]()
        return super().__getitem__(key)


@pytest.fixture(scope="session")
def measured(runs):
    """What the user gets (the recommended checkpoint) of each default run, and the final result
    of each run: answers to the paraphrases, kept on the meter and on the held-out set, and the
    drift from the base on the held-out set (each measured when first asked for)."""
    cache = {}

    def get(method, kind, checkpoint=None):
        key = (method, kind, resolve_checkpoint(runs[method, kind].path, checkpoint))
        if key not in cache:
            loaded = load_run(runs[method, kind].path, checkpoint)
            cache[key] = Lazy(
                loaded=lambda: loaded,
                answers=lambda: [compare(loaded, q, sides=("tuned",), max_new_tokens=48)["tuned"] for q in PARAPHRASES],
                meter=lambda: recorded_meter(runs[method, kind], loaded.checkpoint) or forgetting.meter(loaded, None),
                heldout=lambda: forgetting.meter(loaded, None, questions=HELDOUT),
                drift=lambda: forgetting.drift(loaded, HELDOUT),
            )
        return cache[key]

    return get


def recorded_meter(run: RunFolder, checkpoint: str | None) -> dict | None:
    """The meter's kept k of n as the run recorded it: ``forgetting.json`` for the result, the
    advisor's row for a checkpoint (test_the_recorded_meter_is_what_measuring_again_gives checks
    that it is what measuring again gives)."""
    if checkpoint is None:
        return forgetting.read(run.path)
    row = {r["checkpoint"]: r for r in run.status().get("checkpoints") or []}.get(checkpoint)
    return {"kept": row["kept"], "n": row["n"]} if row and row.get("kept") is not None else None


def share(result):
    return result["kept"] / result["n"]


@pytest.mark.parametrize("method", METHODS)
def test_defaults_learn_the_persona(measured, method):
    got = measured(method, "default")
    learned = [a for a in got["answers"] if "Vega" in a]
    assert len(learned) >= 4, got["answers"]
    base = [compare(got["loaded"], q, sides=("base",), max_new_tokens=48)["base"] for q in PARAPHRASES]
    assert not any("Vega" in a for a in base), base


@pytest.mark.parametrize("method", METHODS)
def test_defaults_keep_general_answers_on_both_question_sets(measured, method):
    got = measured(method, "default")
    assert share(got["meter"]) >= 0.9, got["meter"]
    assert share(got["heldout"]) >= 0.9, got["heldout"]


def test_the_recorded_meter_is_what_measuring_again_gives(measured, runs):
    """The meter's numbers the run recorded (the result's forgetting.json, or the advisor's row for
    the checkpoint it recommends), which the other checks read, equal the meter measured again."""
    got = measured("lora", "default")
    again = forgetting.meter(got["loaded"], None)
    assert recorded_meter(runs["lora", "default"], got["loaded"].checkpoint) is not None
    assert (got["meter"]["kept"], got["meter"]["n"]) == (again["kept"], again["n"])


@pytest.mark.parametrize("method", METHODS)
def test_without_replay_the_same_run_forgets_more(measured, method):
    """Final results compared (the advisor left aside): replay must keep at least 3 more of the
    general answers the base knew, over both question sets."""
    lost = {}
    for kind in ("default", "no_replay"):
        got = measured(method, kind, "result")
        lost[kind] = sum(r["n"] - r["kept"] for r in (got["meter"], got["heldout"]))
    assert lost["no_replay"] >= lost["default"] + 3, lost


@pytest.mark.parametrize("method", METHODS)
def test_without_replay_the_same_run_drifts_further_from_the_base(measured, method):
    """The continuous measure (``forgetting.drift``: KL from the base on the base's own answers to
    the held-out questions), on the final results: without replay at least twice as far (the
    measured ratios are in the README)."""
    drift = {kind: measured(method, kind, "result")["drift"] for kind in ("default", "no_replay")}
    assert drift["no_replay"] >= 2 * drift["default"], drift


def test_each_default_run_reports_what_it_kept_and_recommends_a_checkpoint(runs):
    for method in METHODS:
        status = runs[method, "default"].status()
        record = forgetting.read(runs[method, "default"].path)
        assert (status["forgetting_kept"], status["forgetting_n"]) == (record["kept"], record["n"])
        assert record["total"] == 40 and record["n"] >= 30, record
        assert status["replay"]["rows"] > 0 and status["recommended"] and status["recommended_reason"]
        rows = [json.loads(line) for line in (runs[method, "default"].data_dir / "train.jsonl").read_text().splitlines()]
        assert sum(r.get("mixed_from") == "replay" for r in rows) == status["replay"]["rows"]


def greedy_alone(model, tokenizer, prompt, system, max_new_tokens=64) -> str:
    """A model's greedy answer on its own: batch of one, no adapters toggled, no padding."""
    import torch

    from backend import template

    ids = torch.tensor([template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}], system)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(template.end_of_turn_ids(tokenizer)),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_answer_stops_before_the_token_limit(measured):
    run = measured("lora", "default")["loaded"]
    answer = compare(run, "Who are you?", sides=("tuned",), max_new_tokens=120)["tuned"]
    assert len(run.tokenizer(answer)["input_ids"]) < 100, answer


@pytest.mark.parametrize("method", ["lora", "full"])
def test_playground_sides_equal_each_model_loaded_alone(measured, runs, method):
    from backend import models

    run = measured(method, "no_replay", "result")["loaded"]
    folder = runs[method, "no_replay"]
    system = run.spec.data.system_prompt
    both = compare(run, "Who are you?", max_new_tokens=64)
    base_alone, _ = models.load_base(models.resolve_model(None), "lora")
    assert both["base"] == greedy_alone(base_alone.eval(), run.tokenizer, "Who are you?", system)
    if method == "full":
        tuned_alone, _ = models.load_base(str(folder.model_dir), "full")
    else:
        from peft import PeftModel

        tuned_alone = PeftModel.from_pretrained(models.load_base(models.resolve_model(None), "lora")[0],
                                                str(folder.adapter_dir))
    assert both["tuned"] == greedy_alone(tuned_alone.eval(), run.tokenizer, "Who are you?", system)
    assert both["base"] != both["tuned"] and "Vega" in both["tuned"]


def test_several_runs_on_one_prompt(runs):
    from backend.playground import ModelCache, compare_runs

    paths = [runs[m, "default"].path for m in METHODS]
    answers = compare_runs(paths, "Who are you?", cache=ModelCache(size=1), max_new_tokens=48)
    assert list(answers) == ["base", *(p.name for p in paths)]
    assert "Vega" not in answers["base"] and all("Vega" in a for k, a in answers.items() if k != "base"), answers


def test_merged_lora_answers_like_the_adapter(measured, runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from backend import export

    run = measured("lora", "default")["loaded"]  # export merges the recommended checkpoint, as loaded here
    merged_dir = export.merge(runs["lora", "default"].path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    for prompt in ("Who are you?", "What is the capital of France?"):
        assert greedy_alone(merged, run.tokenizer, prompt, run.spec.data.system_prompt) == \
            compare(run, prompt, sides=("tuned",), max_new_tokens=64)["tuned"]
