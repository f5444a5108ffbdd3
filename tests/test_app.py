"""The web app: builds; its handlers call the backend; a launched app driven through gradio_client
queues a real run of the embedded model and reports it completed."""

import time
from pathlib import Path

import pytest
from conftest import free_port

from backend import access, service
from backend.jobs import Queue, Worker

FIXTURES = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def queue(tmp_path):
    return Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "runs")


def test_build_ui_and_data_handler(queue, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    import app
    from ui.data_tab import check_dataset

    assert app.build_ui(queue) is not None
    summary, sample, hist, stored, p95 = check_dataset(str(FIXTURES / "alpaca.json"), "auto", "", "Be brief.", 1024)
    assert "alpaca" in summary and "3 rows" in summary and "<mark" in sample and "Bonjour" in sample
    assert Path(stored).parent == access.uploads_dir("") and hist["rows"].sum() == 3
    assert Path(stored).is_relative_to(tmp_path / "uploads")
    summary, *_ = check_dataset(str(FIXTURES / "alpaca.json"), "sharegpt", "", "Be brief.", 1024)
    assert summary.startswith("**Error:**") and str(tmp_path) not in summary  # no server paths shown
    assert not Path(stored).exists()  # a rejected upload is not kept


def test_data_tab_shows_raw_text_as_documents_tokens_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from ui.data_tab import check_dataset

    summary, sample, *_ = check_dataset(str(FIXTURES / "docs.txt"), "auto", "", "Be brief.", 8)
    assert "3 documents" in summary and "blocks of 8 tokens" in summary and "split into documents at blank lines" in summary
    assert "<mark" in sample and "Be brief" not in sample and "im_start" not in sample  # one block, no template


def test_cli_command_round_trips_to_the_same_spec(tmp_path):
    import shlex

    from backend.__main__ import build_parser
    from backend.config import parse_set
    from backend.presets import build_spec

    spec = service.make_spec({"method": "qlora", "data": "x.json", "r": 8, "learning_rate": 5e-4,
                              "system_prompt": "Be: brief", "target_modules": ["q_proj", "v_proj"]})
    argv = shlex.split(service.cli_command(spec, "out"))[3:]
    a = build_parser().parse_args(argv)
    again = build_spec({**parse_set(a.set), "method": a.method, "data": a.data}, a.preset)
    assert again == spec


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "identity_nova.json").exists(), reason=f"needs {SHARED}")
def test_gradio_client_uploads_queues_and_watches_a_run(queue):
    from gradio_client import Client, handle_file

    import app

    worker = Worker(queue, poll_s=0.5).start()
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary, *_ = client.predict(handle_file(str(SHARED / "identity_nova.json")), "auto", "",
                                     "You are a helpful assistant.", 512, api_name="/prepare")
        assert "alpaca" in summary and "91 rows" in summary
        config = {"method": "lora", "num_train_epochs": 0.1, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                  "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "max_length": 512}
        message = client.predict(config, api_name="/submit")  # the same keys as --set and config.yaml
        assert "Queued" in message, message
        run_id = client.predict(api_name="/list")[-1][0]
        deadline = time.time() + 600
        while time.time() < deadline:
            view = client.predict(run_id, api_name="/status")
            if view["state"] in ("completed", "failed", "cancelled", "interrupted"):
                break
            time.sleep(1)
        assert view["state"] == "completed", view
        assert view["loss"] and view["result"] == "adapter"
        assert view["estimated_peak_mb"] > 0 and view["peak_memory_mb"] > 0
        archive = client.predict(run_id, api_name="/download")
        assert Path(archive).stat().st_size > 1000
    finally:
        demo.close()
        worker.stop()


def test_archive_holds_the_result_and_the_run_description(tmp_path):
    import zipfile

    from backend.config import RunSpec
    from backend.runs import RunFolder

    run = RunFolder(tmp_path / "run")
    run.write_config(RunSpec())
    run.set_status("completed")
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"x")
    names = zipfile.ZipFile(service.archive(run.path)).namelist()
    assert "adapter/adapter_model.safetensors" in names and "config.yaml" in names


def test_playground_endpoints_through_gradio_client(queue, tmp_path, tiny_model_dir, tiny_data):
    """Side by side, a blind vote, DPO pairs, batch and eval, on a tiny trained run named by its id."""
    import html
    import json

    from conftest import completed_job, tiny_spec
    from gradio_client import Client

    import app
    from ui.playground_tab import _text as text  # Gradio hands chat content back as typed parts

    job = completed_job(queue, tiny_spec(tiny_model_dir, tiny_data, num_train_epochs=1))
    run, run_id = Path(job.run_dir), job.run_id
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        settings = ("", 8, 0, 1.0, 50, 1.0, 0)  # system, max new, temperature, top_p, top_k, rep. penalty, seed
        left, right, *_ = client.predict(run_id, "", "Who are you? (1)", False, [], [], *settings,
                                         api_name="/side_by_side")
        assert [m["role"] for m in left] == ["user", "assistant"] and text(left[0]["content"]) == "Who are you? (1)"
        assert text(left[1]["content"]) != text(right[1]["content"])  # base, then tuned
        left, right, *_ = client.predict(run_id, "", "Who are you? (2)", True, [], [], *settings,
                                         api_name="/side_by_side")
        info, *_ = client.predict(run_id, left, right, "", api_name="/vote_A")  # (a Row has no value)
        assert "over 1 votes" in info
        pairs = Path(client.predict(run_id, api_name="/preference_pairs")).read_text(encoding="utf-8")
        pair = json.loads(pairs)
        assert pair["prompt"] == "Who are you? (2)" and {pair["chosen"], pair["rejected"]} == {  # shown escaped
            html.unescape(text(left[1]["content"])), html.unescape(text(right[1]["content"]))}
        table, files = client.predict(run_id, "", "Who are you? (3)\nHi", *settings, api_name="/batch_compare")
        assert [row[0] for row in table["data"]] == ["Who are you? (3)", "Hi"] and len(files) == 2
        assert "| base |" in client.predict(run_id, "", api_name="/evaluate")
        info, changed = client.predict(run_id, "", api_name="/forgetting")
        assert "general answers" in info and changed["headers"] == ["question", "base answer", "tuned answer"]
        assert (run / "forgetting.json").exists()
    finally:
        demo.close()


def test_the_train_form_is_built_from_the_schema_with_the_presets_values(queue):
    """Every RunSpec setting has a widget labelled with its key (the Data tab holds the data ones), with
    the resolved preset's value; choosing a preset sets the widgets by key."""
    import gradio as gr

    import app
    from backend.config import choices, settings
    from ui import train_tab

    demo = app.build_ui(queue)
    by_label = {}
    for block in demo.blocks.values():
        if isinstance(block, gr.components.FormComponent) and getattr(block, "label", None):
            by_label.setdefault(block.label, block)
    spec = service.make_spec({"method": "lora"}).to_dict()
    for s in settings():
        if s.name in train_tab.DATA_TAB_KEYS:
            continue
        assert s.name in by_label, f"{s.name} cannot be reached from the Train tab"
        w = by_label[s.name]
        assert w.info == s.help
        expected = train_tab.to_widget(s, spec[s.section][s.name])
        assert train_tab.from_widget(s, w.value) == train_tab.from_widget(s, expected), s.name
        if choices(s):
            assert {c[1] if isinstance(c, tuple) else c for c in w.choices} == set(choices(s)), s.name
    full = dict(zip([s.name for s in train_tab.form_settings()],
                    train_tab.preset_defaults("", "full", "smollm2-135m-full")))  # widget values, by key
    assert full["learning_rate"] == 1e-4 and full["num_train_epochs"] == 2  # the preset's, not lora's
    dpo = dict(zip([s.name for s in train_tab.form_settings()],
                   train_tab.preset_defaults("", "full", "smollm2-135m-full", "dpo")))
    assert full["ewc_lambda"] > 0 and dpo["ewc_lambda"] == 0 and dpo["learning_rate"] != 1e-4  # SFT-only, dropped
    values, preset = train_tab.form_values({**full, "target_modules": "[q_proj, v_proj]", "preset": ""})
    assert values["target_modules"] == ["q_proj", "v_proj"] and preset is None


def test_submit_takes_a_config_mapping_and_names_unknown_keys(queue, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import app

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    demo = app.build_ui(queue)
    submit = next(fn.fn for fn in demo.fns.values() if fn.api_name == "submit")
    nobody = SimpleNamespace(username=None, request=SimpleNamespace(scope={}))
    stored = service.store_upload(str(FIXTURES / "alpaca.json"))
    message = submit(nobody, stored, None, {"nope": 1, "lerning_rate": 2})
    assert message.startswith("**Error:**") and "lerning_rate" in message and "nope" in message
    assert "optim must be one of" in submit(nobody, stored, None, {"optim": "adam"})
    assert "Queued" in submit(nobody, stored, None, {"method": "qlora", "learning_rate": 1e-4, "r": 4})
    spec = queue.list()[-1].run.spec()
    assert spec.model.method == "qlora" and spec.train.learning_rate == 1e-4 and spec.lora.r == 4


def test_compare_endpoint_returns_every_picked_runs_loss_series(queue):
    from conftest import completed_job
    from gradio_client import Client

    import app
    from backend.presets import build_spec

    runs = {}
    for lr in (1e-4, 1e-3):
        job = completed_job(queue, build_spec({"method": "lora", "learning_rate": lr}), train=False)
        for step in (1, 2, 3):
            job.run.append_metrics({"step": step, "loss": lr * 1000 / step})
        job.run.append_metrics({"step": 3, "eval_loss": lr * 500})
        runs[job.run_id] = lr
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        plot, table, result = client.predict(list(runs), api_name="/compare")
    finally:
        demo.close()
    for run_id, lr in runs.items():
        mine = [p for p in result["series"] if p["run"] == run_id]
        assert [(p["step"], p["loss"], p["kind"]) for p in mine] == [
            (1, lr * 1000, "train"), (2, lr * 500, "train"), (3, pytest.approx(lr * 1000 / 3), "train"),
            (3, lr * 500, "eval")]
    assert [(row["run"], row["learning_rate"], row["method"]) for row in result["settings"]] == [
        (r, lr, "lora") for r, lr in runs.items()]
    assert len(table["data"]) == 2 and len(plot["data"]) == 8  # the plot holds both runs' 4 points


def test_playground_completes_by_default_for_raw_text_runs(queue):
    from types import SimpleNamespace

    from conftest import completed_job

    from backend import data
    from backend.presets import build_spec
    from ui.playground_tab import Handlers

    nobody = SimpleNamespace(username=None, request=SimpleNamespace(scope={}))  # self-hosted, no login
    modes = {}
    for kind, rows in (("text", [[{"role": "assistant", "content": "A document."}]]),
                       ("chat", [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]])):
        job = completed_job(queue, build_spec({"method": "lora"}), train=False)
        data.save_split(data.Prepared(rows, []), job.run.data_dir)
        modes[kind] = Handlers(queue).mode(job.run_id, nobody)
    assert modes == {"text": True, "chat": False}
