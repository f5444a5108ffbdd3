"""backend/train.py on a tiny random model: the run folder, resume after SIGKILL, save/reload."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, tiny_spec, wait_for
from safetensors.torch import load_file

from backend import template
from backend import train as train_mod
from backend.config import RunSpec
from backend.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def loss_records(run):
    return [m for m in run.metrics() if "loss" in m]


def test_lora_run_folder_describes_itself(tmp_path, tiny_model_dir, tiny_data):
    spec = tiny_spec(tiny_model_dir, tiny_data)
    run = train_mod.train(spec, tmp_path / "run")

    assert RunSpec.load(run.config_path).to_dict() == spec.to_dict()  # enough to re-run
    status = run.status()
    assert status["state"] == "completed" and status["step"] == status["total_steps"] > 0
    assert "fp32" in " ".join(status["notices"])  # the CPU notice is in the status, not only the log
    losses = loss_records(run)
    assert [m["step"] for m in losses] == list(range(1, status["total_steps"] + 1))
    for key in ("epoch", "learning_rate", "tokens_per_second", "elapsed_s", "eta_s", "memory_mb"):
        assert key in losses[-1]
    assert any("eval_loss" in m for m in run.metrics())
    assert losses[-1]["loss"] < losses[0]["loss"] - 2  # it learns (from ln(vocab) ~ 10.8)
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert (run.data_dir / "train.jsonl").exists() and (run.data_dir / "val.jsonl").exists()
    assert run.checkpoints() and len(run.checkpoints()) <= spec.train.save_total_limit


def test_full_and_qlora_runs_save_their_results(tmp_path, tiny_model_dir, tiny_data):
    full = train_mod.train(tiny_spec(tiny_model_dir, tiny_data, "full", max_steps=3), tmp_path / "full")
    assert (full.model_dir / "model.safetensors").exists() and full.status()["state"] == "completed"
    qlora = train_mod.train(tiny_spec(tiny_model_dir, tiny_data, "qlora", max_steps=3), tmp_path / "q")
    assert qlora.result_dir() == qlora.adapter_dir
    assert "qlora computes in fp32" in qlora.status()["notices"][0]


def test_saved_adapter_reloads_in_a_fresh_process_with_the_same_greedy_output(
        tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    captured = {}
    save = train_mod._save_result

    def keep_model(run, spec, trainer, tokenizer):
        captured["model"], captured["tokenizer"] = trainer.model, tokenizer
        save(run, spec, trainer, tokenizer)

    monkeypatch.setattr(train_mod, "_save_result", keep_model)
    spec = tiny_spec(tiny_model_dir, tiny_data, max_steps=8)
    run = train_mod.train(spec, tmp_path / "run")

    model, tok = captured["model"].eval(), captured["tokenizer"]
    ids = torch.tensor([template.prompt_ids(tok, [{"role": "user", "content": "Who are you?"}],
                                            spec.data.system_prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, eos_token_id=sorted(template.end_of_turn_ids(tok)))
    before = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    proc = cli("generate", "--run", run.path, "--prompt", "Who are you?", "--max-new-tokens", 12, "--json")
    answers = json.loads(proc.stdout)
    assert answers["tuned"] == before
    assert answers["base"] != answers["tuned"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_data):
    sets = ["--set", "max_steps=24", "--set", "save_steps=3", "--set", "learning_rate=0.01",
            "--set", "lora_dropout=0.1", "--set", "target_modules=all-linear",
            "--set", "per_device_train_batch_size=4"]
    common = ["--data", tiny_data, "--model", tiny_model_dir, "--method", "lora", *sets]
    cli("train", *common, "--out", tmp_path / "whole")

    killed = RunFolder(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "train", *map(str, common), "--out",
                             str(killed.path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed.checkpoints_dir / "checkpoint-6" / "COMPLETE").exists(), timeout=120,
             what="the step-6 checkpoint")  # 18 steps remain: far longer than the 20 ms it polls
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed.status()["state"] == "running"  # killed mid-run, not finished
    assert killed.result_dir() is None
    step_at_kill = int(killed.latest_checkpoint().name.split("-")[1])
    assert 6 <= step_at_kill < 24

    cli("train", "--config", killed.config_path, "--resume")
    assert killed.status()["state"] == "completed" and killed.status()["resumed_from"]
    steps = [m["step"] for m in loss_records(killed)]
    assert steps == list(range(1, 25))  # contiguous, no step twice

    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed.adapter_dir / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-5)


def test_a_qlora_model_in_training_keeps_its_gradients_after_an_eval_forward(tiny_model_dir, tiny_data):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on an eval-mode forward without
    gradients (CPUs with AVX512-BF16) and its gradients are wrong after that; a model being trained
    meets such forwards (the Trainer's evaluation, the KL anchors) and must not repack."""
    torch.manual_seed(0)
    model, _ = train_mod._setup_model(tiny_spec(tiny_model_dir, tiny_data, "qlora"))
    ids = torch.tensor([list(range(1, 33))])

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert before.abs().sum() > 0
    torch.testing.assert_close(gradients(), before)


def test_loss_on_learned_positions_only_equals_the_models_own_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Answer " * i}]
             for i in range(1, 4)]
    features = [{k: e[k] for k in ("input_ids", "labels")} for e in
                (template.encode(tokenizer, c, "Sys") for c in convs)]
    batch = DataCollatorWithFlattening()(features)
    trainer = train_mod.StudioTrainer(model=model, args=TrainingArguments("/tmp/unused", use_cpu=True,
                                                                          report_to="none"))
    expected = model(**batch, use_cache=False).loss
    torch.testing.assert_close(trainer.compute_loss(model, batch), expected)
    n = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=2 * n), expected / 2)

    # Packed examples never see each other: the packed loss is the token-weighted mean of each
    # example's loss alone. (This rests on the Trainer turning the model's KV cache off,
    # args.use_cache=False: with a cache transformers skips the block-diagonal mask, and a packed row
    # attends across examples; measured on the embedded model: loss 6.46 instead of 7.87.)
    alone = [(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss,
              sum(x != -100 for x in f["labels"][1:])) for f in features]
    torch.testing.assert_close(trainer.compute_loss(model, batch), sum(loss * k for loss, k in alone) / sum(k for _, k in alone))


def test_kl_to_base_covers_the_mixed_rows_alone(tiny_model_dir, tokenizer):
    """The KL term, from base distributions computed once before training (``backend.anchor``),
    equals KL(base || tuned) summed over the learned tokens of each mixed row computed on that row
    alone when the anchors keep the whole vocabulary; with fewer tokens kept it is a lower bound."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backend import anchor

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Answer " * i}]
             for i in range(1, 5)]
    features = [{"input_ids": e["input_ids"], "labels": e["labels"], "mixed": m, "index": i} for i, (e, m) in
                enumerate(zip((template.encode(tokenizer, c, "Sys") for c in convs), [0, 1, 0, 1]))]
    vocab = model.config.vocab_size
    with torch.no_grad():
        expected = torch.zeros(())
        for f in (f for f in features if f["mixed"]):
            ids, learned = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"][1:]) != -100
            tuned = torch.log_softmax(model(input_ids=ids).logits[0, :-1][learned], dim=-1)
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=ids).logits[0, :-1][learned], dim=-1)
            expected += (base.exp() * (base - tuned)).sum()
    assert expected > 0
    got = {}
    for k in (vocab, 8):
        targets = anchor.targets(model, features, k=k)
        assert [t is not None for t in targets] == [bool(f["mixed"]) for f in features]
        batch = train_mod._Collator(targets)(features)
        inputs = {key: v for key, v in batch.items() if key not in ("labels", "mixed", "anchor_ids", "anchor_logp")}
        keep = (batch["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)
        with torch.no_grad():
            got[k] = train_mod._kl_to_base(model(**inputs, logits_to_keep=keep, use_cache=False).logits, keep, batch["mixed"],
                                           batch["anchor_ids"], batch["anchor_logp"])
    torch.testing.assert_close(got[vocab], expected, rtol=1e-4, atol=1e-5)
    assert 0 < got[8] < expected  # the top 8 and one bucket for the rest: a lower bound
    with pytest.raises(RuntimeError, match="base distributions for"):  # anchors that do not match the batch
        train_mod._kl_to_base(torch.zeros(1, len(keep), vocab), keep, batch["mixed"], batch["anchor_ids"][1:],
                              batch["anchor_logp"][1:])


def test_mix_ce_weighs_the_mixed_rows_cross_entropy_alone(tiny_model_dir, tokenizer):
    """mix_ce scales only the mixed rows' answer tokens: at 0 the loss is the task rows' summed
    cross-entropy over every learned token's count; at 1 it is the plain loss; in between, linear."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Answer " * i}]
             for i in range(1, 5)]
    features = [{"input_ids": e["input_ids"], "labels": e["labels"], "mixed": m} for e, m in
                zip((template.encode(tokenizer, c, "Sys") for c in convs), [0, 1, 0, 1])]
    batch = train_mod._Collator()(features)
    trainer = train_mod.StudioTrainer(model=model, args=TrainingArguments("/tmp/unused", use_cpu=True,
                                                                          report_to="none"))
    per_row = []
    with torch.no_grad():
        for f in features:
            out = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
            per_row.append((out.loss * sum(x != -100 for x in f["labels"][1:]), f["mixed"]))
        count = sum(sum(x != -100 for x in f["labels"][1:]) for f in features)
        task = sum(loss for loss, m in per_row if not m)
        mixed = sum(loss for loss, m in per_row if m)
        model.train()  # mix_ce applies while training only
        for weight in (0.0, 0.5, 1.0):
            trainer.mix_ce = weight
            torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), (task + weight * mixed) / count)
    assert mixed > 0 and task > 0


def test_mixed_rows_that_would_teach_nothing_are_refused():
    from backend.config import ConfigError, RunSpec

    with pytest.raises(ConfigError, match="mix_ce and mix_kl are both 0"):
        RunSpec.from_flat({"data": "x.csv", "mix_ce": 0, "mix_kl": 0}).validate()
    RunSpec.from_flat({"data": "x.csv", "mix_ce": 0, "mix_kl": 0, "mix_data": "none"}).validate()


def test_raw_text_longer_than_max_length_is_trained_on_every_token_once_per_epoch(
        tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    text = " ".join(f"word{i}" for i in range(200))  # one document, several times max_length
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    seen = []
    original = train_mod.StudioTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append((inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist(), inputs["position_ids"][0]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_mod.StudioTrainer, "compute_loss", recording)
    spec = tiny_spec(tiny_model_dir, tmp_path / "book.txt", max_length=64, num_train_epochs=2, val_size=0,
                     per_device_train_batch_size=4)
    run = train_mod.train(spec, tmp_path / "run")
    doc = template.document_ids(tokenizer, text)
    assert len(doc) > 4 * 64
    targets = sorted(t for ids, labels, _ in seen for t, lab in zip(ids, labels) if lab != template.IGNORE_INDEX)
    assert targets == sorted(doc[1:] * 2)  # every token after the first, once in each of the 2 epochs
    for ids, _, pos in seen:  # a batch of blocks, each one piece of the document: positions restart per block
        starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
        pieces = [b - a for a, b in zip(starts, starts[1:])]
        assert len(pieces) <= 4 and all(n <= 64 for n in pieces) and sum(n < 64 for n in pieces) <= 1
    assert run.status()["state"] == "completed"
