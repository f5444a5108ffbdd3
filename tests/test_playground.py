"""backend/playground.py on a tiny trained run: the base side is the base alone, the tuned side the
adapter alone, streaming, multi-turn, checkpoints, batch comparison, blind votes to DPO pairs."""

import json
import random

import pytest
from conftest import alone

from backend import models, playground


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
    assert summary == {"votes": 4, "tuned": 2, "base": 0, "tie": 1, "both_bad": 1,
                       "tuned_win_rate": pytest.approx(2.5 / 3)}
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
