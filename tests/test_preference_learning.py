"""Proof that DPO moves the real embedded model towards what the pairs prefer (CPU, minutes: README).

The pairs (tests/data/signoff_pairs.jsonl, 22 short questions) prefer an answer that ends with the
sign-off "Cheers, Vega!" over the same answer without it. The rejected answer is the start's own
(SmolLM2-135M-Instruct, greedy, system prompt "Answer in one short sentence.", generated once and
stored; questions whose answer ran past 40 tokens left out), so the pairs differ only in the
sign-off, which the start never gives. After a short LoRA DPO run (16 steps of 4 pairs,
``loss_type [sigmoid, sft]``: the DPO loss alone, at this rate, pushed the model's own answers down
until it drifted and forgot, measured), on the held-out pairs made the same way
(tests/data/signoff_heldout.jsonl, 7) and 8 held-out questions:

* preference accuracy and mean margin (log p(chosen) - log p(rejected), ``preference.score_pairs``)
  rise above the start's;
* greedy answers to the held-out questions end with the sign-off more often than the start's;
* the forgetting meter reports the run (kept k of n general answers).
"""

import time
from pathlib import Path

import pytest

from backend import data, forgetting, preference
from backend.playground import batch_compare, load_run
from backend.presets import build_spec
from backend.train import train

DATA = Path(__file__).parent / "data"
PAIRS, HELDOUT = DATA / "signoff_pairs.jsonl", DATA / "signoff_heldout.jsonl"
SIGN_OFF = "Vega"
QUESTIONS = ["What color is grass?", "How many months are in a year?", "What is the capital of Germany?",
             "What do birds use to fly?", "What is 5 plus 5?", "Which animal barks?", "What is the opposite of up?",
             "What do you use to write on paper?"]
SYSTEM = "Answer in one short sentence."

pytestmark = pytest.mark.slow


def test_dpo_teaches_the_embedded_model_to_sign_off(tmp_path):
    t0 = time.time()
    spec = build_spec({"stage": "dpo", "method": "lora", "data": str(PAIRS), "system_prompt": SYSTEM,
                       "val_size": 0, "max_steps": 16, "per_device_train_batch_size": 4, "learning_rate": 5e-4,
                       "beta": 0.1, "loss_type": ["sigmoid", "sft"], "max_length": 128, "save_steps": 16, "advise_checkpoints": False})
    run = train(spec, tmp_path / "dpo")
    trained_s = time.time() - t0
    assert run.status()["state"] == "completed"
    steps = [m for m in run.metrics() if "loss" in m]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]

    loaded = load_run(run.path, "result")
    heldout = data.prepare(str(HELDOUT), val_size=0).train
    with loaded.base.disable_adapter():
        start = preference.score_pairs(loaded.base, loaded.tokenizer, heldout, SYSTEM)
    after = preference.score_pairs(loaded.base, loaded.tokenizer, heldout, SYSTEM)
    answers = batch_compare(loaded, [{"prompt": q} for q in QUESTIONS], max_new_tokens=48)
    signed = {side: sum(SIGN_OFF in a[side] for a in answers) for side in ("base", "tuned")}
    kept = forgetting.read(run.path)
    print(f"\nDPO sign-off: accuracy {start['accuracy']:.2f} -> {after['accuracy']:.2f}, margin "
          f"{start['margin']:.2f} -> {after['margin']:.2f}, signed {signed['base']} -> {signed['tuned']} of {len(QUESTIONS)}, "
          f"forgetting {forgetting.summary(kept)}, peak {run.status().get('peak_memory_mb')} MB, "
          f"training + meter {trained_s / 60:.1f} min, all {(time.time() - t0) / 60:.1f} min")
    for a in answers:
        print(f"  {a['prompt']!r}: base {a['base']!r} | tuned {a['tuned']!r}")

    assert after["accuracy"] > start["accuracy"] and after["margin"] > start["margin"]
    assert signed["tuned"] > signed["base"]
    assert kept and kept["n"] > 0 and run.status()["forgetting_kept"] == kept["kept"]
