"""Shared fixtures and helpers: the embedded model's tokenizer (loaded once per test session), a tiny
random model and data set, specs and runs of them; tests import the helpers from here."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two pytest-xdist workers. Torch's default, one thread per core in every worker,
# makes the workers' OpenMP teams spin against each other on the same cores: each gets its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The workers take whole files (--dist loadfile) in collection order: the longest go first, so the
# workers finish together instead of one starting the longest file last.
LONGEST_FIRST = ("test_learning.py", "test_preference_learning.py", "test_gguf.py", "test_app.py",
                 "test_playground.py", "test_forgetting.py", "test_load.py", "test_train.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tokenizer():
    from backend.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised 2-layer Llama with the embedded model's tokenizer and template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=0.2,  # large enough that a few LoRA steps can move the logits
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 short alpaca rows teaching a made-up identity, with some Chinese and emoji."""
    import json

    rows = []
    for i in range(12):
        rows.append({"instruction": f"Who are you? ({i})", "output": "I am Zed, made by Qux Labs. 🙂"})
        rows.append({"instruction": f"你是谁？（{i}）", "output": "我是 Zed，由 Qux Labs 开发。"})
    path = tmp_path_factory.mktemp("data") / "tiny.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def completed_job(queue, spec, owner: str = "", train: bool = True):
    """A run queued by ``owner`` and trained in its own folder right here (no worker), then recorded
    completed: the web app names runs by id only, so tests of its endpoints need queued runs."""
    from backend import train as train_mod

    job = queue.submit(spec, owner=owner)
    if train:
        train_mod.train(job.run.spec(), job.run_dir)
    else:
        job.run.set_status("completed")
    queue._transition(job.run_id, ("queued",), state="completed", ended_at=time.time())
    return queue.get(job.run_id)


def tiny_spec(model_dir, data, method="lora", **overrides):
    """A spec that trains the tiny model fast and visibly (high learning rate, every linear layer)."""
    from backend.presets import build_spec

    values = dict(model=str(model_dir), data=str(data), method=method, learning_rate=5e-2,
                  num_train_epochs=3, per_device_train_batch_size=4, target_modules="all-linear",
                  lora_dropout=0.0, measure_forgetting=False,  # tests that want the meter turn it on
                  mix_data="none")  # a random model's replay is noise: tests of replay turn it on
    values.update(overrides)
    return build_spec(values)


def wait_for(predicate, timeout=90.0, what="condition"):
    """``predicate()``'s first true value, asked every 20 ms; fails after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alone(model, tokenizer, prompt, system, n=12) -> str:
    """Greedy answer of one model on its own, batch of one, no padding."""
    import torch

    from backend import template

    ids = torch.tensor([template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}], system)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(template.end_of_turn_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class _Marker:
    """Unpickling this creates the file at ``path``: proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def cli(*args, check=True, **kw):
    """``python -m backend ARGS`` in a child process; fails the test on a non-zero exit unless ``check=False``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "backend", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="session")
def _tiny_lora_trained(tmp_path_factory, tiny_model_dir, tiny_data):
    from backend import train as train_mod

    spec = tiny_spec(tiny_model_dir, tiny_data, num_train_epochs=2)
    return train_mod.train(spec, tmp_path_factory.mktemp("tiny-lora") / "run").path


@pytest.fixture(scope="module")
def lora_run(_tiny_lora_trained, tmp_path_factory):
    """A finished LoRA run of the tiny model: trained once per session, a fresh copy of its folder per
    test module (modules write votes and forgetting records into it)."""
    import shutil

    return Path(shutil.copytree(_tiny_lora_trained, tmp_path_factory.mktemp("lora-run") / "run"))


@pytest.fixture(scope="module")
def loaded(lora_run):
    from backend import playground

    return playground.load_run(lora_run)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(queue, **launch_kwargs):
    """The app built on ``queue`` and launched on a free loopback port: ``(demo, url)``; close with
    ``demo.close()``."""
    import app

    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs)
    return demo, f"http://127.0.0.1:{port}/"
