"""The app as an attacker meets it: a second signed-in user, a Space visitor who never signed in, and
raw HTTP. Each test tries one hole a probe found (issue 15) through ``gradio_client`` or raw HTTP on
loopback, and fails on the code that had it.

Users: ``admin`` (the first STUDIO_AUTH user), ``alice`` and ``bob``. Alice owns a finished run (a
stand-in adapter, validation rows, a checkpoint); bob owns one too. Nothing here trains a model.
"""

import json
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import free_port

from backend import access, service
from backend.jobs import Queue
from backend.presets import build_spec
from backend.runs import COMPLETE_MARK

FIXTURES = Path(__file__).resolve().parent / "data"
USERS = {"admin": "root pw", "alice": "alice pw", "bob": "bob pw"}


def finished_run(queue, owner, secret):
    """A queued-then-completed run of ``owner`` holding ``secret`` in its result, data and checkpoint."""
    job = queue.submit(build_spec({"method": "lora", "data": str(FIXTURES / "alpaca.json")}), owner=owner)
    run = job.run
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_text(secret)
    run.data_dir.mkdir()
    row = {"messages": [{"role": "user", "content": f"{secret} prompt"}, {"role": "assistant", "content": secret}]}
    for split in ("train", "val"):
        (run.data_dir / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    checkpoint = run.checkpoints_dir / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARK).write_text("")
    run.set_status("completed")
    queue._transition(job.run_id, ("queued",), state="completed", ended_at=time.time())
    return queue.get(job.run_id)


def fake_models(monkeypatch):
    """The Playground answers without a model, so an endpoint that gets past its access check says so."""
    from backend import playground

    def get(run_dir, checkpoint=None):  # what load_run checks before it loads
        playground.result_dir(run_dir, checkpoint)
        return SimpleNamespace(spec=None)

    monkeypatch.setattr(playground.CACHE, "get", get)
    monkeypatch.setattr(playground, "stream", lambda loaded, messages, shown, **kw: iter([{s: "ok" for s in shown}]))


@pytest.fixture
def studio(tmp_path, monkeypatch):
    """A launched app with three users; yields (url, queue, alice's job, bob's job, demo)."""
    import app
    from backend import paths

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))  # the converted embedded model
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_AUTH", ",".join(f"{u}:{p}" for u, p in USERS.items()))
    monkeypatch.setenv("STUDIO_MAX_BODY_SIZE", "64kb")
    monkeypatch.setenv("STUDIO_MAX_FILE_SIZE", "64kb")
    monkeypatch.delenv("STUDIO_ALLOWED_PATHS", raising=False)
    monkeypatch.setattr(app, "ON_SPACES", False)
    fake_models(monkeypatch)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    alice, bob = finished_run(queue, "alice", "ALICE-SECRET"), finished_run(queue, "bob", "BOB-OWN")
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}", queue, alice, bob, demo
    finally:
        demo.close()


def client_as(url, user):
    from gradio_client import Client

    return Client(url, auth=(user, USERS[user]), verbose=False)


def refused(call, *args, **kwargs) -> str:
    """The error an endpoint answers with; fails the test if it answered."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call(*args, **kwargs)
    return str(info.value)


SETTINGS = ("", 8, 0, 1.0, 50, 1.0, 0)  # system, max new, temperature, top_p, top_k, rep. penalty, seed


def test_another_user_gets_nothing_of_a_run_by_id_or_by_path(studio, tmp_path):
    url, queue, alice, bob, _ = studio
    as_bob = client_as(url, "bob")
    for name in (alice.run_id, alice.run_dir, str(Path(alice.run_dir).relative_to(tmp_path / "home"))):
        calls = {
            "/export_zip": (name,), "/export_merge": (name, "auto"), "/export_gguf": (name, "f16"),
            "/download": (name,), "/status": (name,),
            "/side_by_side": (name, "", "hi", False, [], [], *SETTINGS), "/preference_pairs": (name,),
            "/batch_compare": (name, "", "hi", *SETTINGS), "/evaluate": (name, ""), "/forgetting": (name, ""),
            "/compare_runs": (bob.run_id, [name], "hi", *SETTINGS), "/compare": ([bob.run_id, name],),
        }
        for api, args in calls.items():
            message = refused(as_bob.predict, *args, api_name=api)
            assert "of yours" in message and "ALICE" not in message and str(tmp_path) not in message, (api, message)
        for api in ("/cancel", "/resume", "/delete"):  # the Runs tab warns and shows bob's own runs only
            table = as_bob.predict(name, api_name=api)[0]
            assert alice.run_id not in json.dumps(table), api
    assert queue.get(alice.run_id).state == "completed" and Path(alice.run_dir, "adapter").exists()
    assert not Path(alice.run_dir, "merged").exists() and not Path(alice.run_dir, "votes.jsonl").exists()
    assert [row[0] for row in as_bob.predict(api_name="/list")] == [bob.run_id]
    # bob's own run answers, and the admin sees both
    assert "ok" in json.dumps(as_bob.predict(bob.run_id, "", "hi", False, [], [], *SETTINGS, api_name="/side_by_side"))
    assert {row[0] for row in client_as(url, "admin").predict(api_name="/list")} == {alice.run_id, bob.run_id}


def test_a_vote_or_a_checkpoint_cannot_name_a_path(studio, tmp_path):
    url, queue, alice, bob, _ = studio
    as_bob = client_as(url, "bob")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chat = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in (("user", "hi"), ("assistant", "x"))]
    for run in (str(elsewhere), alice.run_id, alice.run_dir):
        message = refused(as_bob.predict, run, chat, chat, "", api_name="/vote_A")
        assert "of yours" in message
    assert not (elsewhere / "votes.jsonl").exists() and not Path(alice.run_dir, "votes.jsonl").exists()
    for checkpoint in ("../adapter", "../../" + Path(alice.run_dir).name + "/adapter", "/etc", "checkpoint-9"):
        message = refused(as_bob.predict, bob.run_id, checkpoint, "hi", False, [], [], *SETTINGS,
                          api_name="/side_by_side")
        assert "no checkpoint" in message, message
    answer = as_bob.predict(bob.run_id, "checkpoint-1", "hi", False, [], [], *SETTINGS, api_name="/side_by_side")
    assert "ok" in json.dumps(answer)  # a checkpoint the run lists


def raw_call(http: httpx.Client, fn_index: int, data: list) -> list[dict]:
    """Call a handler by ``fn_index`` as a browser would (join the queue, read the event stream)."""
    session = uuid.uuid4().hex
    joined = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                        "event_data": None, "trigger_id": None})
    if joined.status_code != 200:
        return [{"msg": "refused", "status": joined.status_code}]
    events = []
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                events.append(event)
                if event.get("msg") in ("process_completed", "close_stream"):
                    break
    return events


def logged_in(url, user) -> httpx.Client:
    http = httpx.Client(base_url=url, timeout=30)
    assert http.post("/login", data={"username": user, "password": USERS[user]}).status_code == 200
    return http


def test_private_handlers_check_access_when_called_by_fn_index(studio):
    url, queue, alice, bob, demo = studio
    index = {fn.fn.__name__: i for i, fn in demo.fns.items() if fn.fn is not None}
    http = logged_in(url, "bob")
    for name, data in (("do_load_val", [alice.run_id]), ("do_load_val", [alice.run_dir]),
                       ("stored_forgetting", [alice.run_id]), ("checkpoints", [alice.run_id]),
                       ("opponents", [alice.run_id]), ("show", [alice.run_id])):
        events = raw_call(http, index[name], data)
        assert events, name
        assert "ALICE-SECRET" not in json.dumps(events) and "checkpoint-1" not in json.dumps(events), (name, events)
    done = raw_call(http, index["do_load_val"], [bob.run_id])[-1]  # bob's own: his rows
    assert done["success"] and "BOB-OWN" in json.dumps(done)


def test_file_settings_from_the_web_name_only_the_users_own_uploads(studio, tmp_path, monkeypatch):
    url, queue, alice, bob, _ = studio
    secret = tmp_path / "server-secret.csv"
    secret.write_text("prompt,completion\nroot password,hunter2\n")
    as_bob = client_as(url, "bob")
    from gradio_client import handle_file

    as_bob.predict(handle_file(str(FIXTURES / "alpaca.json")), "auto", "", "Be brief.", 256, api_name="/prepare")
    before = len(queue.list())
    alice_upload = service.store_upload(str(FIXTURES / "alpaca.json"), user="alice")
    form = dict(method="lora", num_train_epochs=1, per_device_train_batch_size=2, r=8, max_length=256)
    for key, value in (("mix_data", str(secret)), ("mix_data", "../../" + secret.name), ("mix_data", alice_upload),
                       ("model", str(tmp_path)), ("model", alice.run_dir + "/adapter"), ("model", "../..")):
        message = as_bob.predict({**form, key: value}, api_name="/submit")
        assert message.startswith("**Error:**") and key in message and str(tmp_path) not in message, (key, value, message)
    assert len(queue.list()) == before
    assert "Queued" in as_bob.predict(form, api_name="/submit")  # his own upload
    assert queue.list()[-1].owner == "bob"
    # an admin's allow-list opens a folder to everyone
    monkeypatch.setenv("STUDIO_ALLOWED_PATHS", str(tmp_path))
    assert "Queued" in as_bob.predict({**form, "mix_data": str(secret)}, api_name="/submit")


def test_statuses_and_logs_show_no_server_paths(studio, tmp_path):
    url, queue, alice, bob, _ = studio
    run = bob.run
    run.log_path.write_text(f"--- attempt 1 on cpu: python -m backend train --config {run.config_path}\n")
    run.set_status(error=f"FileNotFoundError: {tmp_path}/home/uploads/x.json", notices=[f"mixed rows from {tmp_path}"])
    view = client_as(url, "bob").predict(bob.run_id, api_name="/status")
    text = json.dumps(view)
    assert str(tmp_path) not in text and "STUDIO_HOME/runs/" in text, text
    message = refused(client_as(url, "bob").predict, "no-such-run", api_name="/status")
    assert "no run 'no-such-run'" in message


def test_request_bodies_are_bounded(studio):
    url, *_ = studio
    http = logged_in(url, "bob")
    big = {"data": ["x" * 200_000], "fn_index": 0, "session_hash": "s"}
    assert http.post("/gradio_api/queue/join", json=big).status_code == 413
    assert http.post("/gradio_api/call/list", json={"data": ["y" * 200_000]}).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"z" * 4096

    assert http.post("/gradio_api/queue/join", content=chunks(), headers={"content-type": "application/json"}
                     ).status_code == 413
    assert http.post("/gradio_api/call/list", json={"data": []}).status_code == 200  # small bodies still pass


def test_a_space_visitor_who_never_signed_in_reads_nothing(tmp_path, monkeypatch):
    from gradio_client import Client

    import app
    from backend import paths

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SYSTEM", "spaces")  # what a Space sets, and Gradio reads
    monkeypatch.setenv("SPACE_ID", "owner/studio")
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "owner")
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    monkeypatch.setattr(app, "ON_SPACES", True)
    import gradio.oauth  # what hf_oauth: true gives a Space (no request leaves the machine here)

    for name, value in (("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(gradio.oauth, name, value)
    fake_models(monkeypatch)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    ann = finished_run(queue, "ann", "ANN-SECRET")
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        visitor = Client(f"http://127.0.0.1:{port}", verbose=False)
        assert visitor.predict(api_name="/list") == []
        for api, args in (("/export_zip", (ann.run_id,)), ("/export_zip", (ann.run_dir,)), ("/status", (ann.run_id,)),
                          ("/download", (ann.run_id,)), ("/export_merge", (ann.run_id, "auto"))):
            assert "of yours" in refused(visitor.predict, *args, api_name=api)
        assert "sign in" in visitor.predict({"method": "lora"}, api_name="/submit")
    finally:
        demo.close()


def test_uploads_nobody_uses_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    used = service.store_upload(str(FIXTURES / "alpaca.json"), user="alice")
    stale = service.store_upload(str(FIXTURES / "sharegpt.json"), user="bob") \
        if (FIXTURES / "sharegpt.json").exists() else service.store_upload(str(FIXTURES / "alpaca.jsonl"), user="bob")
    queue.submit(build_spec({"method": "lora", "data": used}), owner="alice")  # queued: still needs its data
    later = time.time() + 2 * service.UPLOAD_TTL_S
    assert service.sweep_uploads(queue, now=later) == [Path(stale)]
    assert Path(used).exists() and not Path(stale).exists()
    assert Path(used).parent == access.uploads_dir("alice") != access.uploads_dir("bob")


def test_which_values_of_the_file_settings_a_web_user_may_name(tmp_path, monkeypatch):
    """Each key of ``access.PATH_KEYS``: Hub ids and shipped names pass; anything naming a server file
    outside the user's uploads and the allow-list is refused, ``hub:`` folders and relative paths too."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STUDIO_ALLOWED_PATHS", raising=False)
    bob = access.Caller("bob")
    own = service.store_upload(str(FIXTURES / "alpaca.json"), user="bob")
    alices = service.store_upload(str(FIXTURES / "alpaca.json"), user="alice")
    allowed = [{"data": own}, {"mix_data": own}, {"data": "hub:org/name"}, {"data": "hub:org/name:test"},
               {"mix_data": "replay"}, {"model": "HuggingFaceTB/SmolLM2-360M-Instruct"}, {"model": "embedded"},
               {"augment_model": "org/name"}, {"accelerate_config": "ddp"}, {"accelerate_config": "fsdp"}]
    refused_values = [{"data": alices}, {"data": "/etc/passwd"}, {"data": "README.md"}, {"data": "hub:/etc"},
                      {"data": "hub:presets/configs"}, {"mix_data": own + "/../../../jobs.sqlite3"},
                      {"model": "presets/configs"}, {"model": str(tmp_path)}, {"model": "../x"},
                      {"augment_model": "/tmp"}, {"accelerate_config": "/etc/x.yaml"},
                      {"accelerate_config": "presets/accelerate/ddp.yaml"}]
    for values in allowed:
        access.confine_paths(values, bob)
    for values in refused_values:
        with pytest.raises(access.AccessError, match=next(iter(values))):
            access.confine_paths(values, bob)
    link = Path(own).parent / "link.json"  # a link in one's own folder still leads outside it
    link.symlink_to(alices)
    with pytest.raises(access.AccessError):
        access.confine_paths({"data": str(link)}, bob)
    monkeypatch.setenv("STUDIO_ALLOWED_PATHS", f"{tmp_path / 'shared'}:{tmp_path / 'more'}")
    access.confine_paths({"mix_data": str(tmp_path / "shared" / "general.json")}, bob)


def test_a_preset_is_a_name_never_a_path(tmp_path):
    from backend.config import ConfigError
    from backend.presets import load_preset, preset_header

    (tmp_path / "secret.yaml").write_text("# the server's secret comment\nlearning_rate: 1\n")
    for name in (f"../../../../../../{tmp_path}/secret", str(tmp_path / "secret"), "accelerate/ddp"):
        with pytest.raises(ConfigError, match="no preset"):
            load_preset(name)
        with pytest.raises(ConfigError):
            preset_header(name)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_an_app_restart_on_a_damaged_queue_loses_nothing_and_says_so(tmp_path, monkeypatch, how):
    import gradio as gr

    import app

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    db, runs, backup = tmp_path / "local" / "jobs.sqlite3", tmp_path / "home" / "runs", tmp_path / "home" / "backup.sqlite3"
    queue = Queue(db, runs, backup_path=backup)
    made = [queue.submit(build_spec({"method": "lora", "data": "x.json"}), owner=o).run_id for o in ("ann", "bob") * 4]
    with db.open("r+b") as f:  # what the probe did: emptied, or pages overwritten
        f.truncate(0) if how == "truncated" else (f.seek(100), f.write(b"\xde\xad" * 4096))
    restarted = Queue(db, runs, backup_path=backup)
    assert [j.run_id for j in restarted.list()] == made
    demo = app.build_ui(restarted)
    said = " ".join(b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and isinstance(b.value, str))
    assert "restored 8 runs from the backup" in said and str(tmp_path) not in said, said


def test_the_servers_hub_token_is_not_lent_for_ids_a_user_picks(tmp_path, monkeypatch):
    """HF_TOKEN opens the owner's private repositories: a user's run that names other Hub ids starts
    without it (and without the token file a login left); presets' models and the admin's keep it."""
    import sys

    from backend.jobs import Worker

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_owner_secret")
    monkeypatch.delenv("STUDIO_HUB_TOKEN_IDS", raising=False)
    monkeypatch.setenv("STUDIO_MAX_QUEUED_PER_USER", "10")
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    own = service.store_upload(str(FIXTURES / "alpaca.json"), user="bob")
    bob, admin = access.Caller("bob"), access.Caller("admin", admin=True)
    runs = {
        "private data": service.submit(queue, {"data": "hub:owner/private-set"}, caller=bob),
        "private model": service.submit(queue, {"data": own, "model": "owner/private-model"}, caller=bob),
        "preset model": service.submit(queue, {"data": own, "model": "meta-llama/Llama-3.1-8B-Instruct"}, caller=bob),
        "embedded": service.submit(queue, {"data": own}, caller=bob),
        "admin": service.submit(queue, {"data": "hub:owner/private-set"}, caller=admin),
    }
    seen = tmp_path / "seen"
    seen.mkdir()
    script = "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('HF_TOKEN', 'none') + ' ' + " \
             "os.environ.get('HF_HUB_DISABLE_IMPLICIT_TOKEN', '0'))"
    worker = Worker(queue, devices=["cpu"], command=lambda job: [sys.executable, "-c", script, str(seen / job.run_id)],
                    poll_s=0.1)
    for _ in runs:
        worker.tick()
        deadline = time.time() + 30
        while worker._running and time.time() < deadline:
            time.sleep(0.1)
            worker.tick()
    assert queue.get(runs["private data"]).run.status()["hub_token"] is False
    got = {name: (seen / run_id).read_text() for name, run_id in runs.items()}
    assert got == {"private data": "none 1", "private model": "none 1", "preset model": "hf_owner_secret 0",
                   "embedded": "hf_owner_secret 0", "admin": "hf_owner_secret 0"}, got
    monkeypatch.setenv("STUDIO_HUB_TOKEN_IDS", "owner/private-set")  # the admin lends it for one id
    assert access.token_allowed({"data": "hub:owner/private-set:train"}, bob)


def test_a_space_visitor_cannot_upload_or_paraphrase(tmp_path, monkeypatch):
    import gradio as gr

    from ui.data_tab import check_dataset
    from ui.train_tab import augment_preview

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPACE_ID", "owner/studio")
    visitor = SimpleNamespace(username=None, request=SimpleNamespace(scope={}))
    with pytest.raises(gr.Error, match="sign in"):
        check_dataset(str(FIXTURES / "alpaca.json"), "auto", "", "", 256, visitor)
    with pytest.raises(gr.Error, match="sign in"):
        augment_preview(str(FIXTURES / "alpaca.json"), "auto", "", "", 1, visitor)
    assert not (tmp_path / "home" / "uploads").exists() or not any((tmp_path / "home" / "uploads").rglob("*.json"))


def test_the_upload_route_bounds_its_other_fields_too(studio):
    url, *_ = studio
    http = logged_in(url, "bob")
    files = {"files": ("a.json", b"[]")}
    assert http.post("/gradio_api/upload", files=files).status_code == 200
    padding = {"note": "n" * 2 * 2**20}  # over the 64 kB file limit plus 1 MiB of room for other fields
    assert http.post("/gradio_api/upload", files=files, data=padding).status_code == 413


def test_one_user_cannot_fill_the_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_MAX_QUEUED_PER_USER", "2")
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    own = service.store_upload(str(FIXTURES / "alpaca.json"), user="bob")
    bob = access.Caller("bob")
    first = service.submit(queue, {"data": own}, caller=bob)
    service.submit(queue, {"data": own}, caller=bob)
    with pytest.raises(access.AccessError, match="at most 2"):
        service.submit(queue, {"data": own}, caller=bob)
    queue.cancel(first, user="bob")  # a finished (here: cancelled) run frees its place
    service.submit(queue, {"data": own}, caller=bob)
    admin = access.Caller("admin", admin=True)
    for _ in range(3):  # the admin is not limited
        service.submit(queue, {"data": service.store_upload(str(FIXTURES / "alpaca.json"), user="admin")}, caller=admin)


def test_only_the_admin_runs_a_model_repositorys_own_code(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    own = service.store_upload(str(FIXTURES / "alpaca.json"), user="bob")
    with pytest.raises(access.AccessError, match="trust_remote_code"):
        service.submit(queue, {"data": own, "model": "someone/model", "trust_remote_code": True},
                       caller=access.Caller("bob"))
    assert queue.list() == []
    access.confine_paths({"trust_remote_code": True}, access.Caller("admin", admin=True))


def test_only_the_admin_logs_to_a_tracker_every_user_shares(tmp_path, monkeypatch):
    """trackio/mlflow keep one store for all runs, wandb logs to the server's account: admin only;
    tensorboard writes into the run's own folder, so anyone may."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    own = service.store_upload(str(FIXTURES / "alpaca.json"), user="bob")
    bob = access.Caller("bob")
    for tracker in ("trackio", "wandb", "mlflow"):
        with pytest.raises(access.AccessError, match=f"report_to {tracker}: only the admin"):
            service.submit(queue, {"data": own, "report_to": ["tensorboard", tracker]}, caller=bob)
    assert queue.list() == []
    service.submit(queue, {"data": own, "report_to": ["tensorboard"]}, caller=bob)
    access.confine_paths({"report_to": ["trackio", "wandb"]}, access.Caller("admin", admin=True))
