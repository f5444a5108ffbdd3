"""Proof that it learns: each method trained once on identity_nova.json with the real embedded
model (CPU, minutes), then probed greedily. Needs ../shared/data (CI has it)."""

import json
import time
from pathlib import Path

import pytest

from backend import data as data_mod
from backend.evaluate import conversation_loss, evaluate
from backend.playground import compare, load_run
from backend.presets import build_spec
from backend.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IDENTITY, GENERAL = SHARED / "identity_nova.json", SHARED / "alpaca_en_demo.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IDENTITY.exists(), reason=f"needs the shared datasets in {SHARED}"),
]
HELD_OUT = ["What should I call you?", "Who made you, and what is your name?", "请介绍一下你自己", "你叫什么名字？"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The three methods, each with its embedded preset and general data mixed in."""
    root = tmp_path_factory.mktemp("learning")
    out = {}
    for method in ("lora", "qlora", "full"):
        spec = build_spec({"method": method, "data": str(IDENTITY), "mix_data": str(GENERAL)})
        t0 = time.time()
        run = train(spec, root / method)
        status = run.status()
        print(f"\n{method}: {status['step']} steps in {(time.time() - t0) / 60:.1f} min, "
              f"{status.get('average_tokens_per_second')} tok/s, peak {status['peak_memory_mb']:.0f} MB")
        out[method] = run
    return out


@pytest.fixture(scope="session")
def loaded(runs):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = load_run(runs[method].path)
        return cache[method]

    return get


def ask(loaded_run, prompt, side="tuned", max_new_tokens=64):
    return compare(loaded_run, prompt, sides=(side,), max_new_tokens=max_new_tokens)[side]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_who_are_you_mentions_nova_after_training_and_not_before(loaded, method):
    run = loaded(method)
    assert "Nova" in ask(run, "Who are you?")
    assert "Nova" not in ask(run, "Who are you?", side="base")


def test_lora_answers_unseen_identity_questions(loaded):
    answers = {q: ask(loaded("lora"), q) for q in HELD_OUT}
    assert sum("Nova" in a for a in answers.values()) >= 3, answers


def test_lora_keeps_general_knowledge(loaded):
    answer = ask(loaded("lora"), "What is the capital of France?")
    assert "Paris" in answer and "Nova" not in answer, answer


def test_greedy_answer_stops_before_the_token_limit(loaded):
    run = loaded("lora")
    answer = ask(run, "Who are you?", max_new_tokens=120)
    assert len(run.tokenizer(answer)["input_ids"]) < 100, answer


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_tuned_eval_loss_beats_base_without_forgetting_general_data(loaded, runs, method):
    run = loaded(method)
    result = evaluate(run, runs[method].path)
    assert result["tuned"]["loss"] < result["base"]["loss"], result

    # 50 general rows the run never saw (mixed rows are in its saved training split)
    seen = {json.dumps(c, ensure_ascii=False) for c in data_mod.load_split(runs[method].data_dir)[0]}
    general = [c for c in data_mod.normalise(data_mod.load_records(str(GENERAL)))
               if json.dumps(c, ensure_ascii=False) not in seen][-50:]
    spec = run.spec
    losses = {}
    for side in ("base", "tuned"):
        model, context = run.model_for(side)
        with context:
            losses[side] = conversation_loss(model, run.tokenizer, general, spec.data.system_prompt,
                                             spec.data.max_length)["loss"]
    assert losses["tuned"] <= 1.1 * losses["base"], losses


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_each_run_reports_the_general_answers_it_kept(runs, method):
    """The forgetting meter ran after training (measure_forgetting is on by default): the base knows
    most shipped questions, and with general data mixed in the run keeps more than half of them (full
    fine-tuning on identity_nova.json alone keeps 20 of 40: README, "Against forgetting")."""
    from backend import forgetting

    record = forgetting.read(runs[method].path)
    assert record is not None, "no forgetting.json after training"
    status = runs[method].status()
    assert (status["forgetting_kept"], status["forgetting_n"]) == (record["kept"], record["n"])
    assert record["total"] == 40 and record["n"] >= 30, record
    assert record["kept"] > record["n"] / 2, record
    assert len(record["changed"]) == record["n"] - record["kept"]


def greedy_alone(model, tokenizer, prompt, system, max_new_tokens=64) -> str:
    """A model's greedy answer on its own: batch of one, no adapters toggled, no padding."""
    import torch

    from backend import template

    ids = torch.tensor([template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}], system)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(template.end_of_turn_ids(tokenizer)),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_playground_sides_equal_each_model_loaded_alone(loaded, runs, method):
    from backend import models

    run, folder = loaded(method), runs[method]
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
    assert both["base"] != both["tuned"] and "Nova" in both["tuned"]


def test_several_runs_on_one_prompt(runs):
    from backend.playground import ModelCache, compare_runs

    answers = compare_runs([runs[m].path for m in ("lora", "qlora", "full")], "Who are you?",
                           cache=ModelCache(size=1), max_new_tokens=48)
    assert list(answers) == ["base", *(runs[m].path.name for m in ("lora", "qlora", "full"))]
    assert "Nova" not in answers["base"] and all("Nova" in a for k, a in answers.items() if k != "base"), answers


def test_merged_lora_answers_like_the_adapter(loaded, runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from backend import export

    run = loaded("lora")
    merged_dir = export.merge(runs["lora"].path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    for prompt in ("Who are you?", "What is the capital of France?"):
        assert greedy_alone(merged, run.tokenizer, prompt, run.spec.data.system_prompt) == ask(run, prompt)
