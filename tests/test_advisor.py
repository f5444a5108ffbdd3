"""The checkpoint advisor (backend/advisor.py): the recommendation follows the numbers, and
Playground, Export and the CLI use the recommended checkpoint by default."""

import json
import zipfile

import pytest
from conftest import cli, tiny_spec

from backend import advisor, export, forgetting, playground
from backend import train as train_mod
from backend.config import RunSpec
from backend.runs import RunFolder


def row(name, learned, kept, n=40, eval_loss=1.0):
    return {"checkpoint": name, "step": int(name.rsplit("-", 1)[1]), "eval_loss": eval_loss,
            "learned": learned, "kept": kept, "n": n}


def test_recommends_the_checkpoint_that_learned_most_among_those_that_keep_enough():
    rows = [row("checkpoint-4", 0.30, 40), row("checkpoint-8", 0.80, 37), row("checkpoint-12", 0.95, 30)]
    choice, reason = advisor.recommend(rows)
    assert choice == "checkpoint-8"  # 12 learned more but keeps 30 of 40 (75 %); 8 keeps 37 (92.5 %)
    assert "learned best" in reason and "37 of 40" in reason


def test_a_near_tie_in_learning_goes_to_the_lower_eval_loss():
    rows = [row("checkpoint-8", 0.80, 38, eval_loss=0.9), row("checkpoint-12", 0.81, 39, eval_loss=1.2)]
    assert advisor.recommend(rows)[0] == "checkpoint-8"
    rows[1]["learned"] = 0.90  # a clear gain in learning wins
    assert advisor.recommend(rows)[0] == "checkpoint-12"


def test_a_checkpoint_that_keeps_everything_but_learned_little_is_not_chosen():
    rows = [row("checkpoint-4", 0.24, 40), row("checkpoint-8", 0.70, 37), row("checkpoint-12", 0.75, 32)]
    assert advisor.recommend(rows)[0] == "checkpoint-8"


def test_when_every_checkpoint_forgets_it_says_what_to_do():
    rows = [row("checkpoint-4", 0.5, 39), row("checkpoint-8", 0.9, 30), row("checkpoint-12", 0.85, 33)]
    choice, reason = advisor.recommend(rows)
    assert choice == "checkpoint-12" and "every checkpoint that learned forgets" in reason  # 4 kept but learned little
    assert "turn replay on" in reason and "learning_rate" in reason and "fewer epochs" in reason
    spec = RunSpec.from_flat({"mix_data": "replay", "mix_ratio": 0.5, "learning_rate": 1e-3, "num_train_epochs": 3})
    text = advisor.advice(spec)
    assert "turn replay on" not in text and "mix_ratio=0.5 -> 1" in text and "0.001 -> 0.0005" in text
    assert "num_train_epochs=3 -> 2" in text


def test_the_meter_runs_only_where_it_can_change_the_choice():
    """``measure_kept`` leaves rows unmeasured, yet the choice equals measuring every row: checked on
    random tables (near-ties, equal losses, all forgetting, n = 0), and with the cost it saves."""
    import random

    rnd, saved = random.Random(0), 0
    for _ in range(3000):
        k = rnd.randint(1, 5)
        full = [row(f"checkpoint-{4 * (i + 1)}", rnd.choice([0.1, 0.5, 0.79, 0.8, 0.81, 0.82, 0.9, 0.95]),
                    rnd.randint(30, 40), n=rnd.choice([40, 40, 0]) or 0,
                    eval_loss=rnd.choice([None, 0.8, 0.9, 1.0])) for i in range(k)]
        for r in full:
            r["kept"] = min(r["kept"], r["n"])
        lazy = [dict(r, kept=None, n=None) for r in full]
        if rnd.random() < 0.5:  # the final checkpoint's meter comes free from the run
            lazy[-1].update(kept=full[-1]["kept"], n=full[-1]["n"])
        calls = []

        def measure(r, full=full, calls=calls):
            calls.append(r["checkpoint"])
            truth = next(f for f in full if f["checkpoint"] == r["checkpoint"])
            return {"kept": truth["kept"], "n": truth["n"]}

        advisor.measure_kept(lazy, measure)
        assert advisor.recommend(lazy)[0] == advisor.recommend(full)[0], (full, lazy)
        assert len(calls) == len(set(calls))  # nothing measured twice
        saved += sum(r["kept"] is None for r in lazy)
    assert saved > 1000  # it does save meter runs
    # the common case: the last checkpoint learned most and keeps enough; nothing else is measured
    rows = [row("checkpoint-4", 0.3, None, n=None), row("checkpoint-8", 0.7, None, n=None, eval_loss=1.4),
            row("checkpoint-12", 0.9, 38, eval_loss=1.2)]
    advisor.measure_kept(rows, lambda r: pytest.fail(f"{r['checkpoint']} measured"))
    assert advisor.recommend(rows)[0] == "checkpoint-12" and "not needed" in advisor.table({"checkpoints": rows})


def test_token_f1(tokenizer):
    assert advisor.token_f1("I'm Vega, built by Orbital Works.", "I'm Vega, built by Orbital Works.", tokenizer) == 1
    assert advisor.token_f1("The capital is Paris.", "I'm Vega.", tokenizer) < 0.3
    partly = advisor.token_f1("I'm Vega.", "I'm Vega, built by Orbital Works.", tokenizer)
    assert 0.3 < partly < 1
    assert advisor.token_f1("我是Vega", "我是Vega", tokenizer) == 1


@pytest.fixture(scope="module")
def advised_run(tmp_path_factory, tiny_model_dir, tiny_data):
    """A tiny run with three checkpoints, the meter and the advisor on (the defaults)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        spec = tiny_spec(tiny_model_dir, tiny_data, measure_forgetting=True, mix_data="none")
        run = train_mod.train(spec, tmp_path_factory.mktemp("advisor") / "run")
    return run


def test_a_finished_run_keeps_the_optimizer_state_of_its_latest_checkpoint_only(advised_run):
    *earlier, latest = advised_run.checkpoints()  # still complete checkpoints, weights and all
    assert earlier and (latest / "optimizer.pt").is_file()
    assert not any((c / "optimizer.pt").exists() for c in earlier)
    assert all(any(c.glob("*.safetensors")) for c in earlier)


def test_a_default_run_scores_every_checkpoint_and_records_a_choice(advised_run):
    status = advised_run.status()
    names = [r["checkpoint"] for r in status["checkpoints"]]
    assert names == [p.name for p in advised_run.checkpoints()] and len(names) == 3
    evals = {m["step"]: m["eval_loss"] for m in advised_run.metrics() if "eval_loss" in m}
    for r in status["checkpoints"]:
        assert r["eval_loss"] == evals[r["step"]] and 0 <= r["learned"] <= 1
        assert r["kept"] is None or r["kept"] <= r["n"]
    expected, _ = advisor.recommend(status["checkpoints"])
    assert next(r for r in status["checkpoints"] if r["checkpoint"] == expected)["kept"] is not None
    assert status["recommended"] in (expected, advisor.RESULT)
    assert (status["recommended"] == advisor.RESULT) == (expected == names[-1])
    assert status["recommended_reason"] and status["advisor_seconds"] >= 0
    assert "(recommended)" in advisor.table(status)
    from backend import service
    from ui.runs_tab import detail_markdown

    shown = detail_markdown(service.run_view(advised_run.path))
    assert "(recommended)" in shown and status["recommended_reason"] in shown


def test_the_runs_view_says_what_to_do_when_every_checkpoint_forgets(advised_run, tmp_path):
    import shutil

    from backend import service
    from ui.runs_tab import detail_markdown

    copy = tmp_path / "run"
    shutil.copytree(advised_run.path, copy)
    rows = [dict(r, learned=0.5, kept=10, n=40) for r in advised_run.status()["checkpoints"]]
    advisor.record(copy, rows)
    shown = detail_markdown(service.run_view(copy))
    assert "every checkpoint that learned forgets" in shown and "lower learning_rate" in shown
    assert "fewer epochs" in shown and "turn replay on" in shown  # this run had replay off


def test_playground_export_and_cli_use_the_recommended_checkpoint(advised_run, tmp_path):
    first = advised_run.checkpoints()[0].name
    saved = advised_run.status()
    advised_run.set_status(recommended=first)  # as the advisor records it
    try:
        assert playground.load_run(advised_run.path).checkpoint == first
        assert playground.load_run(advised_run.path, "result").checkpoint is None
        assert playground.ModelCache(size=1).get(advised_run.path).checkpoint == first
        names = zipfile.ZipFile(export.zip_result(advised_run.path, tmp_path / "r.zip")).namelist()
        assert f"{first}/adapter_model.safetensors" in names
        assert not any(n.endswith(("optimizer.pt", "scheduler.pt", "trainer_state.json")) for n in names)
        proc = cli("generate", "--run", advised_run.path, "--prompt", "Hi", "--side", "tuned", "--max-new-tokens", 4)
        assert f"using {first}" in proc.stderr
        proc = cli("generate", "--run", advised_run.path, "--prompt", "Hi", "--checkpoint", "result",
                   "--side", "tuned", "--max-new-tokens", 4)
        assert "using the final result" in proc.stderr
        # measuring a checkpoint, or other questions, never replaces the run's own record
        before = (advised_run.path / forgetting.REPORT).read_text()
        questions = tmp_path / "q.json"
        questions.write_text(json.dumps([{"question": "Hi?", "answers": ["x"]}]))
        cli("forgetting", "--run", advised_run.path, "--json")
        cli("forgetting", "--run", advised_run.path, "--checkpoint", "result", "--questions", questions, "--json")
        assert (advised_run.path / forgetting.REPORT).read_text() == before
    finally:
        RunFolder(advised_run.path).set_status(recommended=saved["recommended"])


def test_the_playground_cache_loads_the_final_result_when_asked(monkeypatch, tmp_path):
    """"result" is the final result, not the recommended checkpoint (the cache resolves the name once)."""
    from backend import advisor, playground

    asked = []
    monkeypatch.setattr(advisor, "checkpoint_for", lambda run_dir: "checkpoint-2")
    monkeypatch.setattr(playground, "load_run", lambda run_dir, checkpoint=None: asked.append(checkpoint) or checkpoint)
    cache = playground.ModelCache(size=4)
    assert cache.get(tmp_path, "result") == advisor.RESULT and asked == [advisor.RESULT]
    assert cache.get(tmp_path) == "checkpoint-2" and asked[-1] == "checkpoint-2"
    assert cache.get(tmp_path, "checkpoint-1") == "checkpoint-1"


def test_a_raw_text_document_is_scored_as_a_completion_of_its_first_half():
    doc = [{"role": "assistant", "content": "The mayor of Quendral is Brisova Talmek."}]
    assert advisor._prompt(doc) == {"prompt": "The mayor of", "reference": "Quendral is Brisova Talmek.",
                                    "completion": True}
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert advisor._prompt(chat) == {"prompt": "Q", "reference": "A"}


def test_checkpoints_answered_in_one_batch_score_as_when_loaded_one_at_a_time(advised_run):
    from backend.data import load_split

    train_rows, val_rows = load_split(advised_run.data_dir, rows=True)
    prompts = [advisor._prompt(r["messages"]) for r in (val_rows or train_rows)][:advisor.PROMPTS]
    names = [p.name for p in advised_run.checkpoints()]
    alone = {}
    for name in names:
        loaded = playground.load_run(advised_run.path, name)
        rows = advisor._rows(prompts, "tuned")
        alone[name] = playground.generate_rows(loaded, rows, max_new_tokens=advisor.MAX_NEW_TOKENS)
    assert len({tuple(a) for a in alone.values()}) > 1, "the checkpoints answer alike: the test proves nothing"
    assert advisor.checkpoint_answers(advised_run.path, names, prompts)[0] == alone
