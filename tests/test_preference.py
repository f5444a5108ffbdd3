"""Preference tuning (stages dpo and orpo, backend/preference.py): the data shapes and their errors, the run
folder, the reference when a run starts from another run, resume after a kill, the CLI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, serve, tiny_spec, wait_for
from safetensors.torch import load_file

from backend import data, models, template
from backend import train as train_mod
from backend.config import STAGE_DEFAULTS, ConfigError
from backend.data import DataError
from backend.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """16 pairs preferring the made-up identity (with a sign-off) over a plain answer."""
    rows = [{"prompt": f"Who are you? ({i})", "chosen": "I am Zed. Cheers!", "rejected": "I am a language model."}
            for i in range(16)]
    return jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


# -- data ------------------------------------------------------------------------------------------
def test_every_preference_shape_reads_as_prompt_chosen_rejected(tmp_path):
    expected = {"messages": msgs((U, "Hi"), (A, "Hello, friend.")), "rejected": "Go away."}
    shapes = {
        "strings": {"prompt": "Hi", "chosen": "Hello, friend.", "rejected": "Go away."},
        "message lists, implicit prompt": {"chosen": msgs((U, "Hi"), (A, "Hello, friend.")),
                                           "rejected": msgs((U, "Hi"), (A, "Go away."))},
        "prompt as messages, answers as lists": {"prompt": msgs((U, "Hi")), "chosen": msgs((A, "Hello, friend.")),
                                                 "rejected": msgs((A, "Go away."))},
        "lists as JSON text (CSV)": {"prompt": "Hi", "chosen": json.dumps(msgs((A, "Hello, friend."))),
                                     "rejected": "Go away."},
    }
    for name, row in shapes.items():
        path = jsonl(tmp_path / "p.jsonl", [row])
        assert data.prepare(str(path), val_size=0).train == [expected], name
        assert data.detect_format([row]) == "preference"
    with_system = data.normalise([{"system": "Be kind.", "prompt": "Hi", "chosen": "Yes", "rejected": "No"}])
    assert with_system[0]["messages"][0] == {"role": S, "content": "Be kind."}


def test_the_studios_own_votes_and_their_export_read_as_pairs(tmp_path, lora_run):
    from backend import playground

    answers = {"base": "I am SmolLM.", "tuned": "I am Zed."}
    playground.record_vote(lora_run, "Who are you?", ("tuned", "base"), answers, "A")
    playground.record_vote(lora_run, "Hi", ("base", "tuned"), answers, "tie")  # no winner: left out
    playground.record_vote(lora_run, "Who?", ("base", "tuned"), answers, "A", system_prompt="Be brief.")
    votes = data.prepare(str(playground.votes_path(lora_run)), val_size=0)
    assert votes.summary["format"] == "preference" and votes.train == [
        {"messages": msgs((U, "Who are you?"), (A, "I am Zed.")), "rejected": "I am SmolLM."},
        {"messages": msgs((S, "Be brief."), (U, "Who?"), (A, "I am SmolLM.")), "rejected": "I am Zed."}]
    exported = data.prepare(str(playground.export_pairs(lora_run, tmp_path / "pairs.jsonl")), val_size=0)
    assert [r["rejected"] for r in exported.train] == ["I am SmolLM.", "I am Zed."]


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "Hi", "chosen": "Yes"}, "row 1: missing 'rejected' (preference rows need prompt, chosen and rejected)"),
    ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "row 1: chosen and rejected are the same answer"),
    ({"prompt": "Hi", "chosen": "", "rejected": "No"}, "row 1: 'chosen' is empty"),
    ({"chosen": msgs((U, "A"), (A, "x")), "rejected": msgs((U, "B"), (A, "y"))},
     "row 1: no 'prompt', and chosen and rejected do not share the turns before their answer"),
    ({"prompt": "Hi", "chosen": msgs((A, "x"), (U, "y")), "rejected": "No"},
     "row 1: 'chosen' should end with the assistant's answer"),
    ({"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "No"}, "unknown role 'robot'"),
    ({"prompt": msgs((U, "Hi"), (A, "Hey")), "chosen": "x", "rejected": "y"}, "the prompt should end with a user turn"),
    ({"prompt": "Hi", "answers": {"base": "x", "tuned": "y"}, "winner": None, "vote": "tie"},
     "no preference pairs (every vote is a tie or 'both bad')"),
    ({"prompt": "Hi", "answers": {"base": "x"}, "winner": "tuned", "vote": "A"},
     "row 1: a vote needs answers of both sides and a winner among them"),
])
def test_bad_preference_files_get_one_error_naming_the_row(tmp_path, row, fragment):
    path = jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as info:
        data.prepare(str(path), fmt="preference" if "winner" not in row and "rejected" not in row else "auto")
    assert fragment in str(info.value) and str(info.value).startswith("bad.jsonl")
    proc = cli("prepare", path, "--format", "preference", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fragment in proc.stderr


def test_prepare_previews_the_prompt_and_both_answers_as_the_model_sees_them(pairs):
    summary = json.loads(cli("prepare", pairs, "--json").stdout)
    assert summary["format"] == "preference" and summary["rows"] == 16
    prompt = "<|im_start|>user\nWho are you? (0)<|im_end|>\n<|im_start|>assistant\n"
    assert summary["sample"].endswith(prompt + "[[I am Zed. Cheers!<|im_end|>]]\n")
    assert summary["sample_rejected"].endswith(prompt + "[[I am a language model.<|im_end|>]]\n")
    from ui.data_tab import check_dataset

    text, sample, *_ = check_dataset(str(pairs), "auto", "", "You are a helpful assistant.", 1024)
    assert "**preference** · 16 rows" in text
    assert sample.count("<mark") == 2 and "I am Zed. Cheers!" in sample and "I am a language model." in sample


def test_stage_and_data_must_agree(tiny_model_dir, pairs, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="format preference goes with stage dpo or orpo"):
        tiny_spec(tiny_model_dir, pairs, format="preference")
    with pytest.raises(ConfigError, match="stage dpo goes without ewc_lambda"):
        tiny_spec(tiny_model_dir, pairs, "full", stage="dpo", ewc_lambda=1.0, mix_data="replay")
    with pytest.raises(ConfigError, match="loss_type must be a list of sigmoid"):
        tiny_spec(tiny_model_dir, pairs, stage="dpo", loss_type=["nope"])
    with pytest.raises(ConfigError, match="loss_weights must be one number per loss_type"):
        tiny_spec(tiny_model_dir, pairs, stage="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    spec = tiny_spec(tiny_model_dir, tiny_data, stage="dpo", max_steps=1)  # SFT rows have nothing to prefer
    with pytest.raises(ConfigError, match="a preference stage needs preference data"):
        train_mod.train(spec, tmp_path / "run")


# -- training --------------------------------------------------------------------------------------
def test_dpo_run_folder_keeps_the_contract_and_trls_preference_metrics(tmp_path, tiny_model_dir, pairs):
    spec = tiny_spec(tiny_model_dir, pairs, stage="dpo", learning_rate=1e-2, max_steps=6, beta=0.5)
    run = train_mod.train(spec, tmp_path / "run")
    status = run.status()
    assert status["state"] == "completed" and status["step"] == 6 and run.spec().model.stage == "dpo"
    steps = [m for m in run.metrics() if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "tokens_per_second"):
        assert key in steps[-1]
    assert steps[0]["rewards/margins"] == 0  # the first step's policy is the reference
    assert steps[-1]["rewards/margins"] > 0.5 and steps[-1]["loss"] < steps[0]["loss"]
    assert any("eval_rewards/margins" in m for m in run.metrics())
    assert (run.adapter_dir / "adapter_model.safetensors").exists() and not (run.adapter_dir / "ref").exists()
    assert (run.data_dir / "train.jsonl").exists() and "rejected" in (run.data_dir / "train.jsonl").read_text()
    from backend import service

    curves = service.run_view(run.path)["rewards"]  # what the Runs view draws
    assert {c["kind"] for c in curves} >= {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                           "rewards/accuracies", "eval_rewards/margins"}


def test_orpo_and_full_dpo_train_through_trl(tmp_path, tiny_model_dir, pairs):
    orpo = train_mod.train(tiny_spec(tiny_model_dir, pairs, stage="orpo", learning_rate=1e-2, max_steps=3),
                           tmp_path / "orpo")
    last = [m for m in orpo.metrics() if "loss" in m][-1]
    assert orpo.status()["state"] == "completed" and {"rewards/margins", "nll_loss", "log_odds_ratio"} <= set(last)
    full = train_mod.train(tiny_spec(tiny_model_dir, pairs, "full", stage="dpo", learning_rate=1e-3, max_steps=3),
                           tmp_path / "full")
    assert (full.model_dir / "model.safetensors").exists()
    assert [m for m in full.metrics() if "loss" in m][0]["rewards/margins"] == 0  # the frozen copy is the start
    qlora = train_mod.train(tiny_spec(tiny_model_dir, pairs, "qlora", stage="dpo", learning_rate=1e-2, max_steps=2),
                            tmp_path / "qlora")  # 4-bit QLoRA DPO: one choice of each
    assert qlora.result_dir() == qlora.adapter_dir and "rewards/margins" in [m for m in qlora.metrics() if "loss" in m][-1]


def trl_chosen_logp(model, tokenizer, row, system_prompt) -> float:
    """log p(chosen answer | prompt) as TRL's DPOTrainer tokenizes it (the chat template's text after the
    generation prompt)."""
    prompt = template.with_system(row["messages"][:-1], system_prompt)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + row["messages"][-1:], tokenize=False)
    n = len(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logps[n - 1:].gather(-1, ids[0, n:, None]).sum().item()


def test_dpo_from_an_sft_adapter_uses_that_run_as_its_start_and_reference(tmp_path, tiny_model_dir, pairs, lora_run):
    parent = RunFolder(lora_run)
    spec = tiny_spec(tiny_model_dir, pairs, stage="dpo", from_run=str(lora_run), learning_rate=1e-2, max_steps=3,
                     r=4, target_modules=["q_proj"], per_device_train_batch_size=14, val_size=2)
    run = train_mod.train(spec, tmp_path / "run")
    recorded = run.spec()
    assert recorded.model.model == parent.spec().model.model and recorded.lora == parent.spec().lora  # the parent's

    # step 1 sees all 14 training pairs: the policy's log-probabilities are the SFT model's, not the base's,
    # and its rewards are 0: the reference is that same SFT model (TRL's frozen copy of the starting adapter)
    first = [m for m in run.metrics() if "loss" in m][0]
    tokenizer = template.setup_chat_template(models.load_tokenizer(str(tiny_model_dir)))
    sft = models.load_adapter(models.load_base(str(tiny_model_dir), "lora")[0], parent.adapter_dir).eval()
    base = models.load_base(str(tiny_model_dir), "lora")[0].eval()
    rows, _ = data.load_split(run.data_dir, rows=True)
    system = spec.data.system_prompt
    from_sft = sum(trl_chosen_logp(sft, tokenizer, r, system) for r in rows) / len(rows)
    from_base = sum(trl_chosen_logp(base, tokenizer, r, system) for r in rows) / len(rows)
    assert abs(from_sft - from_base) > 1
    assert first["logps/chosen"] == pytest.approx(from_sft, rel=1e-3)
    assert first["rewards/margins"] == 0

    trained = load_file(run.adapter_dir / "adapter_model.safetensors")
    started = load_file(parent.adapter_dir / "adapter_model.safetensors")
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)


def test_from_run_must_be_a_finished_run(tmp_path, tiny_model_dir, pairs, lora_run):
    proc = cli("train", "--stage", "dpo", "--data", pairs, "--out", tmp_path / "x", "--from", tmp_path, check=False)
    assert proc.returncode == 2 and "from_run" in proc.stderr and "not a run folder" in proc.stderr
    proc = cli("train", "--stage", "dpo", "--data", pairs, "--out", tmp_path / "y", "--from", lora_run,
               "--model", "ORG/other", check=False)
    assert proc.returncode == 2 and "leave model empty" in proc.stderr


def test_resume_after_sigkill_matches_an_uninterrupted_dpo_run(tmp_path, tiny_model_dir, pairs):
    common = ["--stage", "dpo", "--data", pairs, "--model", tiny_model_dir, "--method", "lora",
              "--set", "max_steps=12", "--set", "save_steps=3", "--set", "learning_rate=0.01",
              "--set", "target_modules=all-linear", "--set", "per_device_train_batch_size=2",
              "--set", "measure_forgetting=false", "--set", "mix_data=none"]
    cli("train", *common, "--out", tmp_path / "whole")

    killed = RunFolder(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "train", *map(str, common), "--out", str(killed.path)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed.checkpoints_dir / "checkpoint-3" / "COMPLETE").exists(), timeout=180,
             what="the step-3 checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed.status()["state"] == "running" and killed.result_dir() is None
    assert 3 <= int(killed.latest_checkpoint().name.split("-")[1]) < 12

    cli("train", "--config", killed.config_path, "--resume")
    assert killed.status()["state"] == "completed" and killed.status()["resumed_from"]
    steps = [m["step"] for m in killed.metrics() if "loss" in m]
    assert steps == list(range(1, 13))
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed.adapter_dir / "adapter_model.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-5)


# -- the web app: "Train on these votes" -----------------------------------------------------------
def test_train_on_these_votes_through_gradio_client(tmp_path, monkeypatch, tiny_model_dir, tiny_data, lora_run):
    import shutil

    from conftest import completed_job
    from gradio_client import Client

    import app
    from backend import paths, playground
    from backend.jobs import Queue

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_AUTH", "admin:pw0,alice:pw1,bob:pw2")
    monkeypatch.setattr(app, "ON_SPACES", False)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    spec = tiny_spec(tiny_model_dir, tiny_data)
    mine, bobs = completed_job(queue, spec, "alice", train=False), completed_job(queue, spec, "bob", train=False)
    for job in (mine, bobs):
        shutil.copytree(lora_run / "adapter", Path(job.run_dir) / "adapter")
    answers = {"base": "I am SmolLM.", "tuned": "I am Zed."}
    for i in range(7):
        playground.record_vote(mine.run_dir, f"Who are you? ({i})", ("tuned", "base"), answers, "A", user="alice")
    playground.record_vote(mine.run_dir, "Hi", ("tuned", "base"), answers, "tie", user="alice")
    demo, url = serve(queue)
    try:
        client = Client(url, auth=("alice", "pw1"), verbose=False)
        with pytest.raises(Exception, match="7 decisive votes on .* needs at least 8"):
            client.predict(mine.run_id, api_name="/train_on_votes")
        playground.record_vote(mine.run_dir, "Who?", ("base", "tuned"), answers, "B", user="alice")
        message = client.predict(mine.run_id, api_name="/train_on_votes")
        child = queue.list()[-1]
        assert child.run_id in message and "8 pairs" in message and child.owner == "alice" and child.state == "queued"
        recorded = child.run.spec()
        assert recorded.model.stage == "dpo" and recorded.model.from_run == mine.run_dir
        assert recorded.train.learning_rate == STAGE_DEFAULTS["dpo"]["lora"] == 1e-4  # not the SFT run's 5e-2
        assert recorded.data.data.startswith(str(tmp_path / "home" / "uploads"))
        assert len(data.prepare(recorded.data.data, val_size=0).train) == 8
        # another user's run is not a start, by id or by folder, here or through /submit
        with pytest.raises(Exception, match="no run .* of yours"):
            client.predict(bobs.run_id, api_name="/train_on_votes")
        for start in (bobs.run_id, bobs.run_dir, mine.run_dir):
            answer = client.predict({"stage": "dpo", "from_run": start, "data": recorded.data.data}, api_name="/submit")
            assert "no run" in answer and "of yours" in answer, start
        assert len(queue.list()) == 3
    finally:
        demo.close()


def test_the_memory_estimate_counts_the_reference_and_both_answers(tiny_model_dir, pairs, lora_run):
    from backend import memory

    def est(method, **kw):
        return memory.estimate_for_spec(tiny_spec(tiny_model_dir, pairs, method, **kw), device="cpu", row_tokens=40)

    sft, dpo, orpo = est("full"), est("full", stage="dpo"), est("full", stage="orpo")
    assert dpo.seq_tokens == orpo.seq_tokens == 2 * sft.seq_tokens  # chosen and rejected rows of every pair
    assert dpo.reference == dpo.weights and orpo.reference == sft.reference == 0  # full DPO: a frozen copy
    assert dpo.total - orpo.total == dpo.weights
    lora = est("lora", stage="dpo")
    assert lora.reference == lora.lora_params < lora.weights / 10  # TRL's frozen copy of the adapter alone
    from_run = est("lora", stage="dpo", from_run=str(lora_run), r=64)  # the parent's adapter (r=16) is what trains
    assert from_run.lora_params == est("lora", stage="dpo", r=16).lora_params


def test_the_train_tabs_command_names_stage_and_start(pairs, lora_run):
    import shlex

    from backend import service
    from backend.__main__ import build_parser

    spec = service.make_spec({"stage": "orpo", "from_run": str(lora_run), "data": str(pairs), "beta": 0.2})
    argv = shlex.split(service.cli_command(spec, "out"))[3:]
    a = build_parser().parse_args(argv)
    assert (a.stage, a.from_run, a.set) == ("orpo", str(lora_run), ["beta=0.2"])
