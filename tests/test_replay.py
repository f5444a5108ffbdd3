"""Self-replay (backend/replay.py): the shipped prompts stay apart from every question set that
measures forgetting, rows are marked in the run's data, and mixing can be turned off."""

import json
import re
from pathlib import Path

import pytest

from backend import forgetting, replay
from backend.config import ConfigError, RunSpec

HELDOUT = Path(__file__).parent / "data" / "heldout_general.json"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh studio home: the base-answer cache starts empty (and the real one is left alone)."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def normalise(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def words(text: str) -> set[str]:
    """Latin words and numbers, and single Chinese characters (Chinese has no spaces)."""
    return set(re.findall(r"[a-z0-9]+|[\u4e00-\u9fff]", text.lower()))


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word sets: catches a question reworded slightly or asked with
    another number or country, in English and Chinese alike."""
    x, y = words(a), words(b)
    return len(x & y) / len(x | y)


NEAR = 0.6


def test_the_similarity_measure_catches_near_duplicates():
    assert similarity("What is the capital of France?", "what is the capital of france") == 1
    assert similarity("What is the capital of Italy?", "What is the capital of Spain?") >= NEAR
    assert similarity("2加2等于几？", "2加3等于几？") >= NEAR
    assert similarity("What is 7 squared?", "What is 7 + 6?") >= NEAR
    assert similarity("Give three tips for sleeping better.", "What is the capital of Italy?") < 0.2


@pytest.mark.parametrize("questions", [forgetting.QUESTIONS, HELDOUT], ids=["meter", "heldout"])
def test_replay_prompts_never_overlap_a_question_set(questions):
    prompts = replay.load_prompts()
    asked = [q["question"] for q in forgetting.load_questions(questions)]
    same = {normalise(p) for p in prompts} & {normalise(q) for q in asked}
    assert not same, same
    near = [(p, q, round(similarity(p, q), 2)) for p in prompts for q in asked if similarity(p, q) >= NEAR]
    assert not near, near


def test_the_held_out_set_is_apart_from_the_meter():
    meter = {normalise(q["question"]) for q in forgetting.load_questions()}
    held = forgetting.load_questions(HELDOUT)
    assert len(held) >= 40 and not meter & {normalise(q["question"]) for q in held}
    assert any(re.search(r"[\u4e00-\u9fff]", q["question"]) for q in held)  # Chinese too


def test_the_shipped_prompts_are_many_varied_and_unique():
    prompts = replay.load_prompts()
    assert len(prompts) >= 300 and len({normalise(p) for p in prompts}) == len(prompts)
    chinese = sum(bool(re.search(r"[\u4e00-\u9fff]", p)) for p in prompts)
    assert 60 <= chinese <= len(prompts) - 150
    # a fixed order, languages interleaved, so the first chunk answered already has both
    assert prompts == replay.load_prompts()
    assert any(re.search(r"[\u4e00-\u9fff]", p) for p in prompts[:replay.CHUNK])


def test_replay_is_the_default_and_can_be_turned_off_or_replaced():
    assert RunSpec().data.mix_data == replay.NAME and RunSpec().data.mix_ratio > 0
    for off in ("none", "", None, "null"):
        assert RunSpec.from_flat({"mix_data": off}).data.mix_data is None
    assert RunSpec.from_flat({"mix_data": "general.json"}).data.mix_data == "general.json"
    with pytest.raises(ConfigError, match="mix_kl must be"):
        RunSpec.from_flat({"mix_kl": -1.0})


def test_replay_rows_are_answered_once_cached_and_marked(tiny_model_dir, tmp_path, monkeypatch, home):
    from backend import models

    spec = RunSpec.from_flat({"model": str(tiny_model_dir), "method": "lora"})
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    loads = []
    real = forgetting.standalone
    monkeypatch.setattr(forgetting, "standalone", lambda *a, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setattr(forgetting, "_answers", lambda run, side, prompts, *a, **k: [f"answer to {p}" for p in prompts])
    rows, cost = replay.rows(spec, 40, tokenizer)
    assert len(rows) == 40 and cost == {"rows": 40, "answered": 2 * replay.CHUNK, "seconds": cost["seconds"]}
    assert loads == [1]  # the base model loaded once for both chunks
    assert all(r["mixed_from"] == "replay" and r["messages"][1]["content"] == f"answer to {r['messages'][0]['content']}"
               for r in rows)
    again, cost = replay.rows(spec, 10, tokenizer)
    assert again == rows[:10] and cost["answered"] == 0 and loads == [1]  # from the cache


def test_answers_cut_at_the_token_limit_are_marked_and_do_not_teach_stopping(tiny_model_dir, tiny_data, monkeypatch, home):
    from backend import models, template
    from backend.train import _tokenize

    spec = RunSpec.from_flat({"model": str(tiny_model_dir), "method": "lora"})
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    long = " ".join(["word"] * replay.MAX_NEW_TOKENS)
    monkeypatch.setattr(forgetting, "_answers", lambda run, side, prompts, *a, **k:
                        [long if i % 2 else "Short." for i, _ in enumerate(prompts)])
    monkeypatch.setattr(forgetting, "standalone", lambda *a, **k: None)
    rows, cost = replay.rows(spec, 4, tokenizer)
    assert [bool(r.get("cut")) for r in rows] == [False, True, False, True] and cost["answered"] == replay.CHUNK
    encoded = _tokenize(tokenizer, rows, spec.data)
    eot = template.end_of_turn_ids(tokenizer)
    last = [[t for t, label in zip(e["input_ids"], e["labels"]) if label != template.IGNORE_INDEX][-1] for e in encoded]
    assert [t in eot for t in last] == [True, False, True, False]  # a cut answer's end-of-turn is not learned
    assert all(e["mixed"] == 1 for e in encoded)


def test_a_run_marks_its_replay_rows_and_kl_trains(tiny_model_dir, tiny_data, tmp_path, monkeypatch, home):
    """A short run with replay and mix_kl: replay rows in data/ carry mixed_from, the status says
    what replay cost, and the KL term joins the loss (loss differs from the same run without it)."""
    from backend.train import train

    monkeypatch.setattr(forgetting, "_answers", lambda run, side, prompts, *a, **k:
                        [f"Here is a short answer about {p[:12]}." for p in prompts])
    losses = {}
    for kl in (0.0, 5.0):
        spec = RunSpec.from_flat({"model": str(tiny_model_dir), "method": "lora", "data": str(tiny_data),
                                  "mix_kl": kl, "max_steps": 3, "per_device_train_batch_size": 8,
                                  "learning_rate": 5e-3, "measure_forgetting": False, "val_size": 0}).resolved()
        run = train(spec, tmp_path / f"kl{kl}")
        rows = [json.loads(line) for line in (run.data_dir / "train.jsonl").read_text().splitlines()]
        marked = [r for r in rows if r.get("mixed_from") == "replay"]
        assert len(marked) == 24 and len(rows) == 48
        assert run.status()["replay"]["rows"] == 24
        losses[kl] = [m["loss"] for m in run.metrics() if "loss" in m]
    assert losses[0.0][0] == pytest.approx(losses[5.0][0])  # step 1: the adapter is zero, KL is 0
    assert losses[0.0][-1] != pytest.approx(losses[5.0][-1])
