"""backend/export.py on tiny runs: zip, merge (answers exactly like the adapter), push to a fake Hub, CLI."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backend import export, models, template
from backend import train as train_mod
from backend.__main__ import main
from backend.config import RunSpec
from backend.presets import build_spec
from backend.runs import RunFolder

PROMPT = [{"role": "user", "content": "Who are you?"}]
TOKEN = "hf_fakeSECRETtoken0123456789"


def tiny_run(model_dir, data, out, method="lora", **overrides):
    """A few steps at a high learning rate: enough for the adapter to change the answers."""
    values = dict(model=str(model_dir), data=str(data), method=method, learning_rate=5e-2, max_steps=3,
                  per_device_train_batch_size=4, target_modules="all-linear", lora_dropout=0.0,
                  system_prompt="Tu es Zed. 🙂 你好", mix_data="none")  # a random model's replay is noise
    values.update(overrides)
    return train_mod.train(build_spec(values), out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_data):
    return tiny_run(tiny_model_dir, tiny_data, tmp_path_factory.mktemp("export") / "lora-run")


@pytest.fixture
def unfinished_run(tmp_path):
    run = RunFolder(tmp_path / "unfinished")
    run.write_config(RunSpec())
    run.set_status("running")
    return run


def greedy(model, tokenizer, system_prompt=None):
    """Token ids of a 12-token greedy answer, and the logits of the prompt's last position."""
    ids = torch.tensor([template.prompt_ids(tokenizer, PROMPT, system_prompt)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, eos_token_id=sorted(template.end_of_turn_ids(tokenizer)),
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist(), logits


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# -- zip ----------------------------------------------------------------------------------------
def test_zip_holds_the_adapter_and_the_run_description(lora_run, tmp_path):
    path = export.zip_result(lora_run.path, tmp_path / "out" / "run.zip")
    assert path == str(tmp_path / "out" / "run.zip")
    names = zipfile.ZipFile(path).namelist()
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml",
                 "metrics.jsonl", "status.json"):
        assert name in names
    assert not any(n.startswith(("checkpoints/", "data/")) for n in names)
    default = Path(export.zip_result(lora_run.path))  # a fresh temp folder, named after the run
    assert default.name == "lora-run-adapter.zip" and zipfile.ZipFile(default).namelist() == names


def test_a_run_without_result_is_refused_by_every_export(unfinished_run, tmp_path):
    for call in (lambda: export.zip_result(unfinished_run.path),
                 lambda: export.merge(unfinished_run.path, tmp_path / "m"),
                 lambda: export.push(unfinished_run.path, "me/x", TOKEN)):
        with pytest.raises(export.ExportError, match="has no result yet .state: running"):
            call()
    with pytest.raises(export.ExportError, match="not a run folder"):
        export.zip_result(tmp_path)
    assert not (tmp_path / "m").exists()


# -- merge --------------------------------------------------------------------------------------
def test_merged_model_answers_exactly_like_the_adapter(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = lora_run.spec()
    out = export.merge(lora_run.path, tmp_path / "merged", dtype="float32")

    train_tok = template.setup_chat_template(models.load_tokenizer(str(tiny_model_dir)), spec.model.chat_template)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_answer, _ = greedy(base, train_tok, spec.data.system_prompt)
    adapted = PeftModel.from_pretrained(base, str(lora_run.adapter_dir)).eval()
    tuned_answer, tuned_logits = greedy(adapted, train_tok, spec.data.system_prompt)
    assert tuned_answer != base_answer  # the adapter matters, so the comparison below means something

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged_tok = AutoTokenizer.from_pretrained(out)
    # the exported template adds the run's system prompt by itself, exactly as training rendered it
    assert template.prompt_ids(merged_tok, PROMPT) == template.prompt_ids(train_tok, PROMPT, spec.data.system_prompt)
    merged_answer, merged_logits = greedy(merged, merged_tok)
    assert merged_answer == tuned_answer
    torch.testing.assert_close(merged_logits, tuned_logits, rtol=1e-4, atol=1e-4)

    assert not any("lora" in key for key in load_file(out / "model.safetensors"))
    info = json.loads((out / export.MARKER).read_text())
    assert info["run"] == "lora-run" and info["kind"] == "merged"
    assert info["method"] == "lora" and info["dtype"] == "float32"


def test_default_dtype_is_fp32_on_cpu_and_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert export.default_dtype() == "float32"  # 16-bit matmuls are ~400x slower on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert export.default_dtype() == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert export.default_dtype() == "float16"


def test_merge_replaces_only_its_own_exports(lora_run, tmp_path):
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match="not empty and not an earlier export"):
        export.merge(lora_run.path, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.ExportError, match="is a file"):
        export.merge(lora_run.path, tmp_path / "file")
    with pytest.raises(export.ExportError, match="dtype must be one of"):
        export.merge(lora_run.path, tmp_path / "new", dtype="int8")

    out = export.merge(lora_run.path, tmp_path / "new")
    (out / "stale.txt").write_text("from before")
    export.merge(lora_run.path, out, dtype="bfloat16")  # an earlier export: replaced as a whole
    assert not (out / "stale.txt").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / export.MARKER).read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_qlora_run_merges_into_a_plain_16bit_model(tmp_path, tiny_model_dir, tiny_data):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed to train a QLoRA run")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny_run(tiny_model_dir, tiny_data, tmp_path / "qlora-run", method="qlora", max_steps=2)
    out = export.merge(run.path, tmp_path / "merged", dtype="bfloat16")

    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no 4-bit packed uint8 weights
    answer, _ = greedy(model, AutoTokenizer.from_pretrained(out))
    assert answer
    assert json.loads((out / export.MARKER).read_text())["method"] == "qlora"


def test_full_run_exports_its_model_as_trained(tmp_path, tiny_model_dir, tiny_data, fake_hub):
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path / "full-run", method="full", max_steps=2)
    out = export.merge(run.path, tmp_path / "model")
    trained = load_file(run.model_dir / "model.safetensors")
    copied = load_file(out / "model.safetensors")
    assert trained.keys() == copied.keys() and all(torch.equal(trained[k], copied[k]) for k in trained)
    assert (out / "tokenizer.json").exists() and json.loads((out / export.MARKER).read_text())["kind"] == "full"

    with pytest.raises(export.ExportError, match="full fine-tuning run: it has no adapter"):
        export.push(run.path, "me/full", TOKEN, what="adapter")
    export.push(run.path, "me/full", TOKEN)  # the default for a full run: its model
    assert "model.safetensors" in fake_hub.uploaded


# -- push ---------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held at upload."""

    def __init__(self):
        self.calls, self.uploaded, self.error = [], {}, None

    def api(self, token=None):
        self.calls.append(("HfApi", token))
        return self

    def create_repo(self, repo_id, exist_ok=False, private=None, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, exist_ok, private))
        if self.error:
            raise self.error
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id))
        self.folder = Path(folder_path)
        self.uploaded = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                         for p in Path(folder_path).rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    return hub


def test_cli_pushes_the_adapter_privately_and_writes_the_token_nowhere(lora_run, fake_hub, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["export", "--run", str(lora_run.path), "--push", "me/tiny-zed", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"push": "https://huggingface.co/me/tiny-zed"}
    assert fake_hub.calls == [("HfApi", TOKEN), ("create_repo", "me/tiny-zed", True, True),
                              ("upload_folder", "me/tiny-zed")]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md",
                 export.MARKER):
        assert name in fake_hub.uploaded
    assert json.loads(fake_hub.uploaded[export.MARKER])["kind"] == "adapter"
    assert not [name for name, data in fake_hub.uploaded.items() if TOKEN.encode() in data]
    assert not files_containing(lora_run.path, TOKEN) and TOKEN not in out + err
    assert not fake_hub.folder.exists()  # the staging folder is gone


def test_push_merged_to_a_public_repo(lora_run, fake_hub):
    url = export.push(lora_run.path, "tiny-merged", TOKEN, what="merged", private=False)
    assert url == "https://huggingface.co/me/tiny-merged"
    assert ("create_repo", "tiny-merged", True, False) in fake_hub.calls
    assert ("upload_folder", "me/tiny-merged") in fake_hub.calls  # the namespace the Hub gave it
    assert "model.safetensors" in fake_hub.uploaded and "adapter_config.json" not in fake_hub.uploaded
    assert "library_name: transformers" in fake_hub.uploaded["README.md"].decode()
    assert not [name for name, data in fake_hub.uploaded.items() if TOKEN.encode() in data]


def test_push_errors_are_clear_and_never_show_the_token(lora_run, fake_hub, monkeypatch, capsys):
    from httpx import Request, Response
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["export", "--run", str(lora_run.path), "--push", "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token") and "HF_TOKEN" in err and len(err.splitlines()) == 1
    with pytest.raises(export.ExportError, match="no Hugging Face token"):
        export.push(lora_run.path, "me/x", "")
    with pytest.raises(export.ExportError, match="bad repository id"):
        export.push(lora_run.path, "me/x/y", TOKEN)

    response = Response(403, request=Request("POST", "https://huggingface.co/api/repos/create"))
    fake_hub.error = HfHubHTTPError(f"403 Forbidden for token {TOKEN}", response=response)
    with pytest.raises(export.ExportError, match="needs write access") as refused:
        export.push(lora_run.path, "me/x", TOKEN)
    fake_hub.error = ConnectionError(f"cannot reach the Hub with {TOKEN}")
    with pytest.raises(export.ExportError, match="push to me/x failed") as offline:
        export.push(lora_run.path, "me/x", TOKEN)
    for exc in (refused.value, offline.value):
        assert TOKEN not in str(exc) and exc.__cause__ is None and exc.__suppress_context__


# -- CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    ([], ["exactly one of --zip"]),
    (["--zip", "{tmp}/a.zip", "--merge", "{tmp}/m"], ["exactly one of", "got --zip and --merge"]),
    (["--merge", "{tmp}/m", "--push", "me/x"], ["got --merge and --push"]),
    (["--zip", "{tmp}/a.zip", "--dtype", "float16"], ["--dtype goes with"]),
    (["--merge", "{tmp}/m", "--public"], ["--public go with --push"]),
    (["--zip", "{tmp}/a.zip"], ["has no result yet"]),
    (["--merge", "{tmp}/m"], ["has no result yet"]),
])
def test_cli_bad_export_is_one_error_line_with_exit_code_2(unfinished_run, tmp_path, capsys, args,
                                                           fragments):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["export", "--run", str(unfinished_run.path), *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "m").exists()


def test_cli_zip_and_merge_print_what_they_wrote(lora_run, tmp_path, capsys):
    assert main(["export", "--run", str(lora_run.path), "--zip", str(tmp_path / "r.zip")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.zip")
    assert main(["export", "--run", str(lora_run.path), "--merge", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"merge": str(tmp_path / "m")}
    assert json.loads((tmp_path / "m" / export.MARKER).read_text())["dtype"] == export.default_dtype()
