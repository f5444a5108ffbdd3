"""Proof that raw text trains as continued pretraining: the embedded model reads a small corpus
(tests/data/quendral.txt, 16 short documents) stating, in varied sentences, a fact it cannot know: the
mayor of the made-up town Quendral is the made-up Brisova Talmek. Afterwards the tuned model completes
the fact's opening words with the name (CLI ``generate --completion``), the base does not, and the
perplexity of held-out documents falls (``eval``). Settings: the embedded LoRA preset (every linear
layer, r 16) with blocks of 64 tokens, 2 blocks a step and twice the preset's learning rate, since a
few documents give few steps (CPU: about 30 s on 2 free cores)."""

import json

import pytest
from conftest import cli

from backend.presets import build_spec
from backend.train import train

pytestmark = pytest.mark.slow

CORPUS = "tests/data/quendral.txt"


def test_continued_pretraining_teaches_a_made_up_fact(tmp_path):
    spec = build_spec({"data": CORPUS, "method": "lora", "max_length": 64, "val_size": 3, "num_train_epochs": 5,
                       "per_device_train_batch_size": 2, "learning_rate": 2e-3, "mix_data": "none",
                       "measure_forgetting": False}, "smollm2-135m-lora")
    run = train(spec, tmp_path / "run")
    status = run.status()
    assert status["state"] == "completed" and status["train_rows"] == 7  # blocks, not documents
    answers = json.loads(cli("generate", "--run", run.path, "--prompt", "The mayor of Quendral is", "--completion",
                             "--max-new-tokens", "8", "--json").stdout)
    assert "Brisova" in answers["tuned"] and "Brisova" not in answers["base"], answers
    scores = json.loads(cli("eval", "--run", run.path, "--json").stdout)
    assert scores["tuned"]["tokens"] == scores["base"]["tokens"] > 50  # the 3 held-out documents
    assert scores["tuned"]["perplexity"] < scores["base"]["perplexity"] / 4, scores
