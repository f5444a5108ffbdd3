"""backend/playground.py on a tiny trained run: the base side is the base alone, the tuned side the
adapter alone, streaming, multi-turn, checkpoints, batch comparison, blind votes to DPO pairs; a DPO run
compared with its SFT parent run (blind or not, through the web app too)."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
from conftest import alone

from backend import models, playground
from backend.runs import RunFolder


def test_each_side_equals_its_model_loaded_alone(loaded, lora_run, tiny_model_dir):
    from peft import PeftModel

    prompt, system = "Who are you? (3)", loaded.spec.data.system_prompt
    both = playground.compare(loaded, prompt, max_new_tokens=12)
    base_alone, _ = models.load_base(str(tiny_model_dir), "lora")
    assert both["base"] == alone(base_alone.eval(), loaded.tokenizer, prompt, system)
    tuned_alone = PeftModel.from_pretrained(models.load_base(str(tiny_model_dir), "lora")[0],
                                            str(lora_run / "adapter")).eval()
    assert both["tuned"] == alone(tuned_alone, loaded.tokenizer, prompt, system)
    assert both["base"] != both["tuned"]


def test_stream_grows_both_sides_and_keeps_each_sides_history(loaded):
    steps = list(playground.stream(loaded, [{"role": "user", "content": "Who are you? (1)"}], max_new_tokens=10))
    assert len(steps) >= 2 and set(steps[-1]) == {"base", "tuned"}
    assert all(steps[-1][s].startswith(steps[0][s]) for s in ("base", "tuned"))
    # multi-turn: each side sees its own earlier answer (different prompt lengths: left padding)
    history = {s: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": steps[-1][s]},
                   {"role": "user", "content": "Who are you? (2)"}] for s in ("base", "tuned")}
    turn2 = playground.compare_messages(loaded, history, max_new_tokens=10)
    for side in ("base", "tuned"):
        alone_turn = playground.compare_messages(loaded, history[side], (side,), max_new_tokens=10)
        assert turn2[side] == alone_turn[side]


def test_checkpoints_and_cache(lora_run):
    names = playground.list_checkpoints(lora_run)
    assert names and all(n.startswith("checkpoint-") for n in names)
    cache = playground.ModelCache(size=1)
    first = cache.get(lora_run, names[0])
    assert cache.get(lora_run, names[0]) is first
    final = cache.get(lora_run)  # evicts the checkpoint
    assert final is not first and cache.get(lora_run, names[0]) is not first
    with pytest.raises(playground.RunError, match="no checkpoint"):
        playground.load_run(lora_run, "checkpoint-999")


def test_a_checkpoint_is_named_only_as_the_run_lists_it(tmp_path, tiny_model_dir, tiny_data):
    from backend.presets import build_spec
    from backend.runs import COMPLETE_MARK, RunFolder

    run = RunFolder(tmp_path / "run")
    run.write_config(build_spec({"model": str(tiny_model_dir), "data": str(tiny_data), "method": "lora"}))
    for folder in (run.adapter_dir, run.checkpoints_dir / "checkpoint-2", tmp_path / "elsewhere"):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    (run.checkpoints_dir / "checkpoint-2" / COMPLETE_MARK).touch()
    assert playground.list_checkpoints(run.path) == ["checkpoint-2"]
    for name in ("../adapter", str(run.adapter_dir), str(tmp_path / "elsewhere"), "checkpoint-2/../../adapter",
                 "checkpoint-1"):
        with pytest.raises(playground.RunError, match=r"no checkpoint .*\(its checkpoints: checkpoint-2\)"):
            playground.load_run(run.path, name)


def test_batch_comparison_with_references_to_csv_and_jsonl(loaded, lora_run, tmp_path):
    prompts = playground.default_prompts(lora_run)
    assert prompts and all(p["reference"] for p in prompts)
    prompts = (prompts + [{"prompt": "你是谁？（5）"}, {"prompt": "Who are you? (7)"}])[:3]
    seen = []
    rows = playground.batch_compare(loaded, prompts, batch_size=2, max_new_tokens=6,
                                    progress=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 3), (3, 3)]
    single = playground.compare(loaded, prompts[2]["prompt"], max_new_tokens=6)
    assert (rows[2]["base"], rows[2]["tuned"]) == (single["base"], single["tuned"])
    csv_path = playground.write_table(rows, tmp_path / "cmp.csv")
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "prompt,reference,base,tuned"
    jsonl = playground.write_table(rows, tmp_path / "cmp.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt"] for line in jsonl] == [p["prompt"] for p in prompts]
    assert playground.parse_prompts('Hello\n\n{"prompt": "Hi", "reference": "Yo"}') == [
        {"prompt": "Hello", "reference": ""}, {"prompt": "Hi", "reference": "Yo"}]


def test_formula_like_cells_are_neutralised_in_csv_and_exact_in_jsonl(tmp_path):
    import csv

    rows = [{"prompt": "=1+1", "reference": "+cmd|' /C calc'!A0", "base": "-2+3", "tuned": "@SUM(A1)"},
            {"prompt": "\tx", "reference": "\rx", "base": "=HYPERLINK(\"http://x\")", "tuned": "fine = ok"},
            {"prompt": "plain", "reference": None, "base": "", "tuned": "'quoted"}]
    with playground.write_table(rows, tmp_path / "cmp.csv").open(newline="", encoding="utf-8") as f:
        cells = list(csv.DictReader(f))
    assert cells[0] == {"prompt": "'=1+1", "reference": "'+cmd|' /C calc'!A0", "base": "'-2+3", "tuned": "'@SUM(A1)"}
    assert cells[1] == {"prompt": "'\tx", "reference": "'\rx", "base": "'=HYPERLINK(\"http://x\")",
                        "tuned": "fine = ok"}
    assert cells[2] == {"prompt": "plain", "reference": "", "base": "", "tuned": "'quoted"}  # the rest as it was
    jsonl = playground.write_table(rows, tmp_path / "cmp.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in jsonl] == rows


def test_blind_votes_round_trip_to_dpo_pairs(tmp_path):
    rng = random.Random(0)
    orders = {playground.blind_order(rng) for _ in range(20)}
    assert orders == {("base", "tuned"), ("tuned", "base")}  # both placements happen
    answers = {"base": "I am SmolLM.", "tuned": "I am Zed."}
    playground.record_vote(tmp_path, "Who are you?", ("tuned", "base"), answers, "A", user="ann")
    playground.record_vote(tmp_path, "Who?", ("base", "tuned"), answers, "B")
    playground.record_vote(tmp_path, "Hi", ("base", "tuned"), answers, "tie")
    playground.record_vote(tmp_path, "Yo", ("base", "tuned"), answers, "both_bad")
    with pytest.raises(ValueError, match="vote must be"):
        playground.record_vote(tmp_path, "x", ("base", "tuned"), answers, "C")
    summary = playground.vote_summary(tmp_path)
    counts = {"votes": 4, "tuned": 2, "base": 0, "parent": 0, "tie": 1, "both_bad": 1,
              "tuned_win_rate": pytest.approx(2.5 / 3)}
    assert summary == {**counts, "by_opponent": {"base": counts}}
    pairs = playground.preference_pairs(tmp_path)
    assert pairs == [{"prompt": "Who are you?", "chosen": "I am Zed.", "rejected": "I am SmolLM."},
                     {"prompt": "Who?", "chosen": "I am Zed.", "rejected": "I am SmolLM."}]
    out = playground.export_pairs(tmp_path, tmp_path / "pairs.jsonl")
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == pairs


def test_completion_continues_the_text_without_the_chat_template(loaded, tiny_model_dir):
    import torch

    from backend import template

    tok, prompt = loaded.tokenizer, "Once upon a time"
    both = playground.compare(loaded, prompt, completion=True, max_new_tokens=8)
    base_alone, _ = models.load_base(str(tiny_model_dir), "lora")
    ids = torch.tensor([tok(prompt)["input_ids"]])  # the text alone: no template, no system prompt
    out = base_alone.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=sorted(template.end_of_turn_ids(tok) | {template.document_end_id(tok)}))
    assert both["base"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert both != playground.compare(loaded, prompt, max_new_tokens=8)  # chat mode renders the template


def test_eval_scores_raw_text_per_document_as_training_attends(tokenizer):
    from backend import template
    from backend.evaluate import examples

    docs = [[{"role": "assistant", "content": "First document here."}],
            [{"role": "assistant", "content": "Second one."}]]
    pieces = examples(tokenizer, docs, "A system prompt", 64)  # both documents in one block
    assert pieces == [{k: template.encode(tokenizer, d)[k] for k in ("input_ids", "labels")} for d in docs]


# -- a run started from another run: compared with its parent ---------------------------------------
@pytest.fixture(scope="module")
def dpo_run(lora_run, tiny_model_dir, tmp_path_factory):
    """A LoRA DPO run started from ``lora_run`` (it trains on the SFT adapter), two steps."""
    from conftest import tiny_spec

    from backend import train as train_mod

    folder = tmp_path_factory.mktemp("dpo")
    rows = [{"prompt": f"Who are you? ({i})", "chosen": "I am Zed. Cheers!", "rejected": "I am a language model."}
            for i in range(8)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = tiny_spec(tiny_model_dir, folder / "pairs.jsonl", stage="dpo", from_run=str(lora_run), max_steps=2)
    return train_mod.train(spec, folder / "run").path


def test_the_parent_side_is_the_parent_runs_result_and_the_tuned_side_the_new_run(dpo_run, lora_run,
                                                                                 tiny_model_dir):
    from peft import PeftModel

    assert playground.parent_dir(dpo_run) == str(lora_run) and playground.has_parent(dpo_run)
    child, parent = playground.load_run(dpo_run, "result"), playground.load_run(lora_run, "result")
    prompt, system = "Who are you? (3)", child.spec.data.system_prompt

    def adapter_alone(run):
        base = models.load_base(str(tiny_model_dir), "lora")[0]
        return PeftModel.from_pretrained(base, str(run / "adapter")).eval()

    vs_parent = playground.compare(child, prompt, ("parent", "tuned"), max_new_tokens=12, parent=parent)
    assert vs_parent["parent"] == alone(adapter_alone(lora_run), child.tokenizer, prompt, system)
    assert vs_parent["tuned"] == alone(adapter_alone(dpo_run), child.tokenizer, prompt, system)
    assert vs_parent["parent"] == playground.compare(parent, prompt, max_new_tokens=12)["tuned"]
    assert vs_parent["parent"] != vs_parent["tuned"]  # DPO moved the SFT adapter it started from
    vs_base = playground.compare(child, prompt, max_new_tokens=12)
    assert vs_base["tuned"] == vs_parent["tuned"] and vs_base["base"] not in (vs_parent["parent"], vs_parent["tuned"])

    streamed = list(playground.stream(child, [{"role": "user", "content": prompt}], ("tuned", "parent"),
                                      max_new_tokens=12, parent=parent))
    assert streamed[-1] == vs_parent and all(set(s) == {"tuned", "parent"} for s in streamed)
    table = playground.batch_compare(child, [{"prompt": prompt}], opponent="parent", max_new_tokens=12, parent=parent)
    assert table == [{"prompt": prompt, "reference": "", "parent": vs_parent["parent"], "tuned": vs_parent["tuned"]}]
    assert {playground.blind_order(random.Random(i), "parent") for i in range(20)} == {("parent", "tuned"),
                                                                                      ("tuned", "parent")}
    with pytest.raises(playground.RunError, match="this run has no parent run"):
        playground.parent_dir(lora_run)
    assert not playground.has_parent(lora_run)
    with pytest.raises(playground.RunError, match="this run has no parent run"):
        playground.compare(child, prompt, ("parent", "tuned"), max_new_tokens=4)  # not loaded


def test_the_cli_generates_against_the_parent_run(dpo_run, lora_run):
    from conftest import cli

    prompt = "Who are you? (3)"
    expected = playground.compare(playground.load_run(dpo_run, "result"), prompt, ("parent", "tuned"),
                                  parent=playground.load_run(lora_run, "result"), max_new_tokens=12)
    out = cli("generate", "--run", dpo_run, "--prompt", prompt, "--against", "parent", "--max-new-tokens", 12,
              "--checkpoint", "result", "--json")
    assert json.loads(out.stdout) == expected
    proc = cli("generate", "--run", lora_run, "--prompt", prompt, "--against", "parent", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "this run has no parent run" in proc.stderr


def test_votes_record_the_opponent_and_the_summary_splits_per_opponent(tmp_path):
    from backend import data

    vs_base, vs_parent = {"base": "I am SmolLM.", "tuned": "I am Zed."}, {"parent": "I am Zed.", "tuned": "Zed. Cheers!"}
    playground.record_vote(tmp_path, "Who?", ("tuned", "base"), vs_base, "A")
    playground.record_vote(tmp_path, "Who are you?", ("parent", "tuned"), vs_parent, "B")
    playground.record_vote(tmp_path, "Hi", ("tuned", "parent"), vs_parent, "B")  # the parent's answer won
    playground.record_vote(tmp_path, "Yo", ("parent", "tuned"), vs_parent, "tie")
    with pytest.raises(ValueError, match="the tuned side's and its opponent's"):
        playground.record_vote(tmp_path, "x", ("parent", "base"), {"parent": "a", "base": "b"}, "A")
    assert [v["opponent"] for v in playground.load_votes(tmp_path)] == ["base", "parent", "parent", "parent"]
    summary = playground.vote_summary(tmp_path)
    assert (summary["votes"], summary["tuned"], summary["base"], summary["parent"]) == (4, 2, 0, 1)
    assert summary["by_opponent"] == {
        "base": {"votes": 1, "tuned": 1, "base": 0, "parent": 0, "tie": 0, "both_bad": 0, "tuned_win_rate": 1.0},
        "parent": {"votes": 3, "tuned": 1, "base": 0, "parent": 1, "tie": 1, "both_bad": 0, "tuned_win_rate": 0.5}}
    expected = [{"prompt": "Who?", "chosen": "I am Zed.", "rejected": "I am SmolLM."},
                {"prompt": "Who are you?", "chosen": "Zed. Cheers!", "rejected": "I am Zed."},
                {"prompt": "Hi", "chosen": "I am Zed.", "rejected": "Zed. Cheers!"}]
    assert playground.preference_pairs(tmp_path) == expected
    read = data.prepare(str(playground.votes_path(tmp_path)), val_size=0).train  # votes.jsonl as training data
    assert [(r["messages"][-1]["content"], r["rejected"]) for r in read] == [(e["chosen"], e["rejected"])
                                                                            for e in expected]


def test_compare_against_the_parent_run_through_gradio_client(tmp_path, monkeypatch, tiny_model_dir, tiny_data,
                                                             lora_run, dpo_run):
    import shutil

    from conftest import completed_job, serve, tiny_spec
    from gradio_client import Client

    import app
    from backend import paths
    from backend.jobs import Queue
    from ui.playground_tab import _history

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_AUTH", "admin:pw0,alice:pw1,bob:pw2")
    monkeypatch.setattr(app, "ON_SPACES", False)
    monkeypatch.setattr(playground, "CACHE", playground.ModelCache(size=2))
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    parent = completed_job(queue, tiny_spec(tiny_model_dir, tiny_data), "alice", train=False)
    shutil.copytree(lora_run / "adapter", Path(parent.run_dir) / "adapter")
    dpo_spec = RunFolder(dpo_run).spec()
    child = completed_job(queue, dataclasses.replace(dpo_spec, model=dataclasses.replace(
        dpo_spec.model, from_run=parent.run_dir)), "alice", train=False)
    shutil.copytree(dpo_run / "adapter", Path(child.run_dir) / "adapter")
    bobs = completed_job(queue, child.run.spec(), "bob", train=False)  # names alice's run as its parent
    shutil.copytree(dpo_run / "adapter", Path(bobs.run_dir) / "adapter")
    settings = ("", 12, 0, 1.0, 50, 1.0, 0)  # system, max new, temperature, top_p, top_k, rep. penalty, seed
    prompt = "Who are you? (3)"
    expected = playground.compare(playground.load_run(dpo_run, "result"), prompt, ("parent", "tuned"),
                                  parent=playground.load_run(lora_run, "result"), max_new_tokens=12)
    def answers(*chats):  # as the model wrote them (the columns show them HTML-escaped)
        return tuple(_history(chat)[-1]["content"] for chat in chats)

    demo, url = serve(queue)
    try:
        alice = Client(url, auth=("alice", "pw1"), verbose=False)
        left, right, *_ = alice.predict(child.run_id, "", prompt, False, [], [], *settings, False, "parent",
                                        api_name="/side_by_side")
        assert answers(left, right) == (expected["parent"], expected["tuned"])
        left, right, *_ = alice.predict(child.run_id, "", prompt, False, [], [], *settings,
                                        api_name="/side_by_side")  # without the new argument: the base
        assert answers(right) == (expected["tuned"],) and answers(left) != (expected["parent"],)
        left, right, *_ = alice.predict(child.run_id, "", prompt, True, [], [], *settings, False, "parent",
                                        api_name="/side_by_side")  # blind
        assert set(answers(left, right)) == {expected["parent"], expected["tuned"]}
        info, *_ = alice.predict(child.run_id, left, right, "", api_name="/vote_A")
        assert "Tuned vs parent: win rate" in info and "over 1 votes" in info
        (vote,) = playground.load_votes(child.run_dir)
        assert vote["opponent"] == "parent" and set(vote["answers"]) == {"parent", "tuned"}
        assert (vote["answers"][vote["winner"]],) == answers(left)
        table, _ = alice.predict(child.run_id, "", prompt, *settings, "parent", api_name="/batch_compare")
        assert table["headers"] == ["prompt", "reference", "parent", "tuned"]
        assert table["data"][0][2:] == [expected["parent"], expected["tuned"]]
        with pytest.raises(Exception, match="this run has no parent run"):
            alice.predict(parent.run_id, "", prompt, False, [], [], *settings, False, "parent",
                          api_name="/side_by_side")
        bob = Client(url, auth=("bob", "pw2"), verbose=False)
        with pytest.raises(Exception, match="not a run of yours"):  # its from_run is alice's run
            bob.predict(bobs.run_id, "", prompt, False, [], [], *settings, False, "parent", api_name="/side_by_side")
    finally:
        demo.close()
