"""The CLI contract: JSON output, exit code 2 with one `error:` line for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data"


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "backend", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_prepare_json_reports_the_contract_keys():
    proc = cli("prepare", FIXTURES / "alpaca.json", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    for key in ("format", "rows", "train_rows", "val_rows", "truncated", "token_lengths", "sample"):
        assert key in summary
    assert summary["format"] == "alpaca" and summary["rows"] == 3
    assert "[[" in summary["sample"] and "SmolLM" not in summary["sample"]


def test_prepare_with_mapping_and_unicode(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "你好吗？🙂", "a": "很好 👍"}, ensure_ascii=False) + "\n", encoding="utf-8")
    proc = cli("prepare", path, "--map", "prompt=q", "--map", "completion=a", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "很好 👍" in json.loads(proc.stdout)["sample"]


@pytest.mark.parametrize("args,fragments", [
    (["prepare", "missing.json"], ["missing.json"]),
    (["prepare", FIXTURES / "alpaca.json", "--map", "prompt=nope"], ["nope"]),
    (["train", "--data", FIXTURES / "alpaca.json", "--out", "{tmp}/r", "--set", "nonsense=1"], ["nonsense"]),
    (["train", "--data", FIXTURES / "alpaca.json", "--out", "{tmp}/r", "--set", "r=-4"], ["r must be"]),
    (["train", "--data", FIXTURES / "alpaca.json", "--out", "{tmp}/r", "--preset", "nope"], ["no preset"]),
    (["train", "--data", FIXTURES / "alpaca.json", "--out", "{tmp}/r", "--model", "{tmp}/nothing-here"],
     ["neither a local folder"]),
    (["train", "--out", "{tmp}/r"], ["--data"]),
    (["generate", "--run", "{tmp}", "--prompt", "hi"], ["not a run folder"]),
    (["eval", "--run", "{tmp}"], ["not a run folder"]),
    (["eval", "--run", "{tmp}/nothing-here"], ["not a run folder"]),
    (["export", "--run", "{tmp}", "--zip", "{tmp}/x.zip"], ["not a run folder"]),
    (["export", "--run", "{tmp}", "--merge", "{tmp}/merged"], ["not a run folder"]),
    (["forgetting", "--run", "{tmp}/config.yaml"], ["not a run folder"]),
    (["train", "--config", "{tmp}/nothing-here/config.yaml"], ["cannot read"]),
])
def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path, args, fragments):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    assert_user_error(cli(*args), *fragments)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_is_one_error_line(tmp_path, name):
    path = tmp_path / name
    path.write_text('[{"text": ' + "[" * 100_000 + "]" * 100_000 + "}]", encoding="utf-8")
    assert_user_error(cli("prepare", path), name, "nested too deeply")


def test_bad_data_fails_before_any_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "out', encoding="utf-8")
    proc = cli("train", "--data", bad, "--out", tmp_path / "run")
    assert_user_error(proc, "bad.jsonl", "line 2")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "line 2" in status["error"]


def test_forgetting_and_augment_commands(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    from conftest import tiny_spec

    from backend.train import train

    run = train(tiny_spec(tiny_model_dir, tiny_data, max_steps=1), tmp_path / "run").path
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    proc = cli("forgetting", "--run", run, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["total"] == 40 and result["kept"] <= result["n"]
    assert (run / "forgetting.json").exists()
    proc = cli("augment", "--data", tiny_data, "--model", tiny_model_dir, "--k", 2, "--limit", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert len(shown) == 2 and all(len(s["kept"]) + len(s["dropped"]) == 2 for s in shown)
    out = tmp_path / "augmented.jsonl"
    proc = cli("augment", "--data", tiny_data, "--model", tiny_model_dir, "--k", 1, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 24 + stats["augmented"] and stats["originals"] == 24
    assert_user_error(cli("augment", "--data", tiny_data, "--k", 0), "--k")
    assert_user_error(cli("forgetting", "--run", tmp_path / "nothing"), "not a run folder")


def run_folder(folder, model_dir):
    """A finished-looking LoRA run of ``model_dir`` (its adapter file a stand-in: the model fails first)."""
    from backend.presets import build_spec
    from backend.runs import RunFolder

    run = RunFolder(folder)
    run.write_config(build_spec({"model": str(model_dir), "data": str(FIXTURES / "alpaca.json"), "method": "lora"}))
    run.adapter_dir.mkdir(parents=True)
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"unused")
    run.set_status("completed")
    return folder


def test_a_pickle_model_is_one_error_line_from_every_command_that_loads_it(tmp_path, tiny_model_dir):
    import pickle
    import shutil

    from conftest import _Marker

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    run = run_folder(tmp_path / "run", model)
    data = FIXTURES / "alpaca.json"
    for args in (["prepare", data, "--model", model], ["train", "--data", data, "--out", tmp_path / "r", "--model", model],
                 ["generate", "--run", run, "--prompt", "hi"], ["eval", "--run", run],
                 ["export", "--run", run, "--merge", tmp_path / "merged"], ["forgetting", "--run", run],
                 ["augment", "--data", data, "--model", model, "--limit", 1]):
        assert_user_error(cli(*args), "pytorch_model.bin", "safetensors are required")
    assert not marker.exists()


def test_checkpoints_are_named_only_as_the_run_lists_them(tmp_path, tiny_model_dir):
    run = run_folder(tmp_path / "run", tiny_model_dir)
    for name in ("../adapter", str(run / "adapter"), "checkpoint-1"):
        assert_user_error(cli("forgetting", "--run", run, "--checkpoint", name), "no checkpoint", "none")


@pytest.mark.parametrize("content,fragment", [
    (None, "No such file"), ("[{\"q\": 1}]", "question 1: expected"), ("{not json", "Expecting"), ("5", "--questions")])
def test_bad_questions_file_is_one_error_line(tmp_path, tiny_model_dir, content, fragment):
    questions = tmp_path / "questions.json"
    if content is not None:
        questions.write_text(content)
    run = run_folder(tmp_path / "run", tiny_model_dir)
    assert_user_error(cli("forgetting", "--run", run, "--questions", questions), "--questions", fragment)


def test_a_run_with_a_broken_config_is_one_error_line(tmp_path, tiny_model_dir):
    run = run_folder(tmp_path / "run", tiny_model_dir)
    (run / "config.yaml").write_text("model: [\n  - : :\n")  # YAML's own message spans several lines
    for args in (["generate", "--run", run, "--prompt", "hi"], ["export", "--run", run, "--zip", tmp_path / "x.zip"],
                 ["train", "--config", run / "config.yaml", "--resume"]):
        assert_user_error(cli(*args), "not valid YAML")
