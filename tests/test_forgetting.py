"""backend/forgetting.py: scoring, the shipped questions, cached base answers, the meter on a tiny
trained run (a random model answers nothing right, so the questions are built from its answers),
and on the real embedded model: every shipped question answered right by the base."""

import json
import subprocess
import time

import pytest
from conftest import tiny_spec

from backend import forgetting, models, playground
from backend import train as train_mod
from backend.access import Caller


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh studio home: the base-answer cache starts empty (and the real one is left alone)."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_is_correct_matches_whole_words_case_insensitively():
    assert forgetting.is_correct("The capital of France is PARIS.", ["Paris"])
    assert forgetting.is_correct("2 + 2 = 4", ["4"])
    assert not forgetting.is_correct("The answer is 14.", ["4"])
    assert not forgetting.is_correct("Germany speaks English.", ["German"])
    assert forgetting.is_correct("It is New   Delhi.", ["New Delhi"])  # whitespace normalised
    assert forgetting.is_correct("法国的首都是巴黎。", ["巴黎"])  # no word edges in Chinese
    assert forgetting.is_correct("Water is H₂O", ["H2O", "H₂O"])
    assert not forgetting.is_correct("", ["Paris"])


def test_shipped_questions_are_well_formed():
    questions = forgetting.load_questions()
    assert 20 <= len(questions) <= 50
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        # a model that repeats the question must not pass
        assert not forgetting.is_correct(q["question"], q["answers"]), q
    with pytest.raises(ValueError, match="question 1"):
        forgetting.load_questions([{"question": "Hi?", "answers": []}])


def test_score_counts_only_what_the_base_knew():
    qs = [{"question": "A?", "answers": ["yes"]}, {"question": "B?", "answers": ["yes"]},
          {"question": "C?", "answers": ["yes"]}, {"question": "D?", "answers": ["yes"]}]
    base = ["yes", "Yes!", "no", "no"]
    tuned = ["yes", "no idea", "no", "yes"]  # A kept, B lost, C never known, D gained (not counted)
    assert forgetting.score(qs, base, tuned) == {
        "kept": 1, "n": 2, "total": 4, "changed": [{"question": "B?", "base": "Yes!", "tuned": "no idea"}]}
    assert forgetting.summary({"kept": 1, "n": 2}) == "kept 1 of 2 general answers"
    assert forgetting.summary(None) == "forgetting not measured"


def test_base_answers_are_computed_once_per_key(tiny_model_dir, tmp_path, monkeypatch, home):
    qs = tmp_path / "qs.json"
    qs.write_text(json.dumps([{"question": "Who are you?", "answers": ["x"]},
                              {"question": "你是谁？", "answers": ["x"]}]), encoding="utf-8")
    calls = []
    real = forgetting._answers
    monkeypatch.setattr(forgetting, "_answers", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = forgetting.base_answers(str(tiny_model_dir), qs, "Be brief.")
    assert len(first) == 2 and calls == ["base"]
    assert forgetting.cache_path().parent.parent == home

    def no_loading(*a, **k):
        raise AssertionError("loaded the model although the answers are cached")

    monkeypatch.setattr(models, "load_base", no_loading)
    assert forgetting.base_answers(str(tiny_model_dir), qs, "Be brief.") == first
    assert calls == ["base"]
    entry, = json.loads(forgetting.cache_path().read_text(encoding="utf-8")).values()
    assert entry["answers"] == first and entry["questions"] == ["Who are you?", "你是谁？"]
    with pytest.raises(AssertionError, match="loaded the model"):  # another system prompt: another key
        forgetting.base_answers(str(tiny_model_dir), qs, "Be verbose.")
    qs.write_text(json.dumps([{"question": "Hi?", "answers": ["x"]}]), encoding="utf-8")
    with pytest.raises(AssertionError, match="loaded the model"):  # other questions: another key
        forgetting.base_answers(str(tiny_model_dir), qs, "Be brief.")


def test_meter_on_a_trained_run_finds_the_lost_answer(loaded, lora_run, home):
    # The random base answers nonsense; accept exactly its answer to Q1, so the base "knows" Q1 and
    # the tuned model (which learned "I am Zed...") has lost it. Q2 the base gets wrong, the tuned
    # model right: not counted. The meter's base side must equal the run's own base side.
    system = loaded.spec.data.system_prompt
    prompt = "Who are you? (3)"
    both = playground.compare(loaded, prompt, max_new_tokens=forgetting.MAX_NEW_TOKENS)
    assert both["base"] and "Zed" in both["tuned"] and "Zed" not in both["base"]
    questions = [{"question": prompt, "answers": [both["base"]]}, {"question": prompt, "answers": ["Zed"]},
                 {"question": "What is the capital of France?", "answers": ["Paris"]}]
    result = forgetting.meter(loaded, lora_run, questions)
    assert result == {"kept": 0, "n": 1, "total": 3, "checkpoint": None,
                      "changed": [{"question": prompt, "base": both["base"], "tuned": both["tuned"]}]}
    record = forgetting.read(lora_run)
    assert {k: record[k] for k in result} == result and record["time"] <= time.time()
    key = forgetting.cache_key(str(models.resolve_model(loaded.spec.model.model)), [q["question"] for q in questions],
                               system, loaded.spec.model.chat_template, forgetting._precision_tag("lora"))
    assert json.loads(forgetting.cache_path().read_text(encoding="utf-8"))[key]["answers"][0] == both["base"]
    # Accepting the tuned answer too: kept.
    questions[0]["answers"].append("Zed")
    assert forgetting.meter(loaded, None, questions)["kept"] == 1


def test_drift_is_the_mean_kl_from_the_base_on_the_base_answers(loaded, home):
    import dataclasses

    import torch
    import torch.nn.functional as F

    from backend import template

    questions = [{"question": "Who are you? (3)", "answers": ["x"]}, {"question": "Hi there", "answers": ["x"]}]
    system, tok = loaded.spec.data.system_prompt, loaded.tokenizer
    answers = forgetting.base_answers(str(models.resolve_model(loaded.spec.model.model)), questions, system,
                                      loaded.spec.model.chat_template, "lora", loaded=loaded)
    by_hand = []
    for q, a in zip(questions, answers):
        prompt = template.prompt_ids(tok, [{"role": "user", "content": q["question"]}], system)
        ids = torch.tensor([prompt + tok(a, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            tuned = loaded.base(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            with loaded.base.disable_adapter():
                base = loaded.base(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        by_hand.append(F.kl_div(tuned, base, log_target=True, reduction="none").sum(-1).mean().item())
    got = forgetting.drift(loaded, questions)
    assert got > 0.01 and got == pytest.approx(sum(by_hand) / 2, rel=1e-4)
    # The base against itself has not moved.
    alone = forgetting.standalone(str(models.resolve_model(loaded.spec.model.model)), system,
                                  loaded.spec.model.chat_template, "lora", False)
    assert forgetting.drift(dataclasses.replace(alone, tuned=alone.base), questions) == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_every_shipped_question_is_answered_right_by_the_embedded_model(monkeypatch, tmp_path):
    model_path = models.resolve_model(None)  # in the real studio home: converted once
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "fresh"))  # no cached answers
    questions = forgetting.load_questions()
    answers = forgetting.base_answers(model_path)
    wrong = [(q["question"], a) for q, a in zip(questions, answers) if not forgetting.is_correct(a, q["answers"])]
    assert not wrong, f"{len(wrong)} shipped questions answered wrong by the base model: {wrong}"


def test_a_run_measures_forgetting_after_training_and_survives_a_failing_meter(tmp_path, tiny_model_dir, tiny_data,
                                                                                home, monkeypatch):
    from backend.runs import RunFolder

    spec = tiny_spec(tiny_model_dir, tiny_data, max_steps=2, measure_forgetting=True)
    run = train_mod.train(spec, tmp_path / "measured")
    record, status = forgetting.read(run.path), RunFolder(run.path).status()
    assert record["total"] == len(forgetting.load_questions()) and record["checkpoint"] is None
    assert (status["forgetting_kept"], status["forgetting_n"]) == (record["kept"], record["n"])

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(forgetting, "meter", broken)
    run = train_mod.train(spec, tmp_path / "failed-meter")
    status = RunFolder(run.path).status()
    assert status["state"] == "completed" and (run.path / "adapter").is_dir()
    assert "forgetting meter failed: RuntimeError: out of memory" in status["notices"]
    assert forgetting.read(run.path) is None


def test_the_result_is_in_the_playground_while_the_meter_asks_its_questions(tmp_path, tiny_model_dir, tiny_data,
                                                                              home, monkeypatch):
    from backend import service
    from backend.jobs import Queue
    from backend.runs import RunFolder
    from ui.runs_tab import detail_markdown

    queue = Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "runs")
    job = queue.submit(tiny_spec(tiny_model_dir, tiny_data, max_steps=2, measure_forgetting=True))
    queue.claim("cpu", lambda j: subprocess.Popen(["true"]))  # the job is running, as under the worker
    seen = {}
    meter = forgetting.meter

    def watched(loaded, run_dir, **kw):
        seen["status"] = RunFolder(run_dir).status()
        seen["listed"] = service.finished_runs(queue, Caller("", admin=True))
        seen["detail"] = detail_markdown(service.run_view(run_dir))
        return meter(loaded, run_dir, **kw)

    monkeypatch.setattr(forgetting, "meter", watched)
    train_mod.train(RunFolder(job.run_dir).spec(), job.run_dir)
    assert queue.get(job.run_id).state == "running"
    assert seen["status"]["state"] == "completed" and seen["status"]["forgetting"] == "measuring"
    assert seen["listed"] == [job.run_id]
    assert "Forgetting: asking the general questions" in seen["detail"]
    assert "Forgetting: kept" in detail_markdown(service.run_view(job.run_dir))


def test_a_meter_stopped_by_the_process_ending_is_said_so(tmp_path, tiny_model_dir, tiny_data, home):
    from backend import service
    from backend.jobs import Queue
    from backend.runs import RunFolder
    from ui.runs_tab import detail_markdown

    queue = Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "runs")
    job = queue.submit(tiny_spec(tiny_model_dir, tiny_data, max_steps=2, measure_forgetting=True))
    queue.claim("cpu", lambda j: subprocess.Popen(["true"]))
    RunFolder(job.run_dir).set_status("completed", forgetting="measuring")  # then the process was killed
    queue.finish(job.run_id, returncode=-9)
    assert queue.get(job.run_id).state == "completed"
    detail = detail_markdown(service.run_view(job.run_dir))
    assert "asking the general questions" not in detail and "Measure forgetting in the Playground asks again" in detail
