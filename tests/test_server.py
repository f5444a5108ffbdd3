"""The hardened server, launched on loopback exactly as ``python app.py`` launches it (``app.launch``):
the env-var login guards every endpoint that starts, cancels or downloads work; uploads have a size
limit; ``/gradio_api/file=`` serves no file outside what the app itself handed out; model output
with HTML or script in it shows as text and never runs in the page."""

import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import httpx
import pytest

from backend.jobs import Queue
from backend.presets import build_spec
from backend.runs import RunFolder

FIXTURES = Path(__file__).resolve().parent / "data"
USER, PASSWORD = "alice", "correct horse"
LIMIT = 1024  # bytes: STUDIO_MAX_FILE_SIZE=1kb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, monkeypatch, tiny_model_dir, tiny_data):
    """(base url, queue, alice's queued run, bob's run) with STUDIO_AUTH and a 1 kB upload limit."""
    import app
    from backend import paths

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))  # the converted embedded model
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))  # uploads
    monkeypatch.setenv("STUDIO_AUTH", f"{USER}:{PASSWORD}")
    monkeypatch.setenv("STUDIO_MAX_FILE_SIZE", "1kb")
    monkeypatch.setattr(app, "ON_SPACES", False)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    spec = build_spec({"model": str(tiny_model_dir), "data": str(tiny_data), "method": "lora"})
    mine, bobs = queue.submit(spec, owner=USER), queue.submit(spec, owner="bob")
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}", queue, mine, bobs
    finally:
        demo.close()


def logged_in(url) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    return client


def test_without_credentials_nothing_starts_cancels_or_downloads(server):
    url, queue, mine, _ = server
    anonymous = httpx.Client(base_url=url, timeout=30)
    for api in ("submit", "cancel", "resume", "delete", "download", "prepare", "list", "status"):
        for route in (f"/gradio_api/call/{api}", f"/gradio_api/run/{api}"):
            assert anonymous.post(route, json={"data": [mine.run_id]}).status_code == 401, route
    assert anonymous.post("/gradio_api/queue/join", json={"data": [mine.run_id], "fn_index": 0,
                                                           "session_hash": "x"}).status_code == 401
    assert anonymous.post("/gradio_api/upload", files={"files": ("a.json", b"[]")}).status_code == 401
    wrong = httpx.Client(base_url=url, timeout=30)
    assert wrong.post("/login", data={"username": USER, "password": "guess"}).status_code == 400
    assert wrong.post("/gradio_api/call/cancel", json={"data": [mine.run_id]}).status_code == 401
    assert queue.get(mine.run_id).state == "queued" and len(queue.list()) == 2


def test_with_credentials_the_same_endpoints_work(server):
    from gradio_client import Client, handle_file

    url, queue, mine, _ = server
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    summary, *_ = client.predict(file=handle_file(str(FIXTURES / "alpaca.json")), mapping="", api_name="/prepare")
    assert "3 rows" in summary, summary
    message = client.predict({}, api_name="/submit")  # the defaults, the uploaded data
    assert "Queued" in message, message
    queued = queue.list()[-1]
    assert queued.owner == USER and queued.state == "queued"

    client.predict(mine.run_id, api_name="/cancel")
    assert queue.get(mine.run_id).state == "cancelled"

    run = RunFolder(mine.run_dir)  # pretend it finished, then download it
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    archive = client.predict(mine.run_id, api_name="/download")
    assert Path(archive).stat().st_size > 0


def test_an_upload_over_the_limit_gets_413(server):
    url, *_ = server
    client = logged_in(url)
    assert client.post("/gradio_api/upload", files={"files": ("small.json", b"[]")}).status_code == 200
    big = client.post("/gradio_api/upload", files={"files": ("big.json", b"[" + b" " * LIMIT * 2 + b"]")})
    assert big.status_code == 413


class _Secret(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"metadata-secret")

    def log_message(self, *args):
        pass


def test_file_route_serves_nothing_it_should_not(server, tmp_path):
    url, queue, _, bobs = server
    client = logged_in(url)
    inner = HTTPServer(("127.0.0.1", 0), _Secret)  # stands in for a cloud metadata service
    threading.Thread(target=inner.serve_forever, daemon=True).start()
    bob_config = Path(bobs.run_dir) / "config.yaml"
    assert bob_config.exists()
    refused = [
        "/etc/passwd",
        "../../../../../../etc/passwd",
        quote("../../../../../../etc/passwd", safe=""),
        "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        str(bob_config),  # another user's run folder
        str(Path(bobs.run_dir).relative_to(Path.cwd().anchor)),
        quote("http://169.254.169.254/latest/meta-data/iam/security-credentials/", safe=""),
        f"http://127.0.0.1:{inner.server_port}/latest/meta-data/",
        quote(f"http://127.0.0.1:{inner.server_port}/latest/meta-data/", safe=""),
    ]
    try:
        for path in refused:
            response = client.get(f"/gradio_api/file={path}")
            assert response.status_code >= 400, (path, response.status_code, response.text[:200])
            assert "root:" not in response.text and "metadata-secret" not in response.text
            assert "per_device_train_batch_size" not in response.text, path  # nothing of the run's config
    finally:
        inner.shutdown()


PAYLOAD = ('Sure <b>x</b><script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
           '<a href="javascript:window.pwned = 3">click</a> done $$x^2$$ **not bold**')


def fake_generation(monkeypatch, payload=PAYLOAD):
    """The playground answers ``payload`` on both sides without a model; returns the messages it was given."""
    from backend import playground

    seen = []

    def stream(loaded, messages, shown, **kw):
        seen.append(messages)
        return iter([{s: payload[:5] for s in shown}, {s: payload for s in shown}])

    monkeypatch.setattr(playground.CACHE, "get", lambda *a, **k: object())
    monkeypatch.setattr(playground, "stream", stream)
    return seen


def test_model_output_with_html_is_shown_as_text_not_rendered(monkeypatch, tmp_path):
    """The chat columns get the answer HTML-escaped, with Markdown and LaTeX off: ``<b>x</b><script>...``
    reads as those characters; the next turn's history (and a vote) is the model's own text again."""
    import gradio as gr

    import app
    from ui.playground_tab import _history, literal

    raw = "<b>x</b><script>alert(1)</script> & 1 < 2"
    assert literal([{"role": "assistant", "content": raw}]) == [
        {"role": "assistant", "content": "&lt;b&gt;x&lt;/b&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; 1 &lt; 2"}]
    assert _history(literal([{"role": "assistant", "content": raw}])) == [{"role": "assistant", "content": raw}]
    tricky = "&lt;b&gt; is how one writes <b> & &amp;"  # text that already looks escaped survives too
    assert _history(literal([{"role": "user", "content": tricky}]))[0]["content"] == tricky

    from conftest import completed_job

    seen = fake_generation(monkeypatch, raw)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "runs")
    run_id = completed_job(queue, build_spec({"method": "lora"}), train=False).run_id
    demo = app.build_ui(queue)
    columns = [b for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
    assert len(columns) == 2
    assert all(c.render_markdown is False and c.latex_delimiters == [] and c.sanitize_html for c in columns)
    send = next(fn.fn for fn in demo.fns.values() if fn.api_name == "side_by_side")
    settings = ("", 16, 0, 1.0, 50, 1.0, 0)
    nobody = SimpleNamespace(username=None, request=SimpleNamespace(scope={}))  # self-hosted, no login
    *_, last = send(nobody, run_id, "", "<i>hi</i>", False, [], [], *settings)
    left, right = last[0], last[1]
    for chat, column in zip((left, right), columns):
        assert chat[-1]["content"] == "&lt;b&gt;x&lt;/b&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; 1 &lt; 2"
        assert chat[-2]["content"] == "&lt;i&gt;hi&lt;/i&gt;"
        assert not any("<" in m["content"] for m in chat)
        sent = column.postprocess(chat).model_dump()  # what goes to the page: still escaped
        assert "<script>" not in str(sent) and "&lt;script&gt;" in str(sent)
    *_, last = send(nobody, run_id, "", "again", False, left, right, *settings)  # the next turn
    assert seen[-1]["base"][:2] == [{"role": "user", "content": "<i>hi</i>"}, {"role": "assistant", "content": raw}]
    assert len(last[0]) == 4


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (scripts/ensure_chromium.sh)")
def test_model_output_with_html_never_runs_in_the_page(server, monkeypatch, tmp_path):
    """The Playground's chat columns get an answer full of markup: nothing runs, no element of it
    reaches the page (no script, event handler, javascript: link, not even <b>), and the answer reads
    as the model wrote it, tags and all, Markdown and LaTeX unrendered."""
    from playwright.sync_api import expect, sync_playwright

    fake_generation(monkeypatch)
    url, queue, mine, _ = server
    mine.run.set_status("completed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        page.goto(url)
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="Playground").click()
        page.get_by_label("Run", exact=True).fill(mine.run_id)  # alice's own run
        page.get_by_role("button", name="Generate both").click()
        answers = page.locator(".bot-row:visible")
        expect(answers).to_have_count(2, timeout=30_000)
        expect(answers.nth(1)).to_contain_text("**not bold**", timeout=30_000)
        page.wait_for_timeout(500)
        for i in range(2):
            content = answers.nth(i).locator(".message-content, .prose").first
            html = content.inner_html()
            for element in ("<script", "<img", "<a ", "<b>", "<strong", "katex"):
                assert element not in html, (element, html)
            assert content.locator("script, img, a, b, strong").count() == 0, html
            assert content.inner_text().strip() == PAYLOAD, content.inner_text()
        assert page.evaluate("window.pwned") is None
        browser.close()


def test_on_a_space_hugging_face_sign_in_decides_who_queues(monkeypatch, tmp_path):
    import time
    from types import SimpleNamespace

    import gradio as gr

    import app
    from backend import service

    monkeypatch.setenv("SYSTEM", "spaces")  # what a Space sets, and Gradio reads
    monkeypatch.setenv("SPACE_ID", "owner/studio")
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "owner")
    monkeypatch.setenv("STUDIO_AUTH", f"{USER}:{PASSWORD}")  # not used on a Space
    monkeypatch.setattr(app, "ON_SPACES", True)
    import gradio.oauth  # what hf_oauth: true gives a Space (read by Gradio at import)

    for name, value in (("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(gradio.oauth, name, value)

    def request(name, expires_in=3600):  # what Gradio's OAuth session holds after "Sign in with HF"
        info = {"userinfo": {"preferred_username": name}, "expires_at": time.time() + expires_in}
        return SimpleNamespace(username=None, request=SimpleNamespace(scope={"session": {"oauth_info": info}}))

    nobody = SimpleNamespace(username=None, request=SimpleNamespace(scope={}))
    assert service.user_of(request("owner")) == "owner" and service.is_admin(request("owner"))
    assert service.user_of(request("ann")) == "ann" and not service.is_admin(request("ann"))
    assert service.user_of(request("ann", expires_in=-1)) == ""
    assert service.user_of(nobody) == "" and not service.is_admin(nobody)  # self-hosted, nobody is admin

    demo = app.build_ui(Queue(tmp_path / "jobs.sqlite3", tmp_path / "runs"))
    assert any(isinstance(block, gr.LoginButton) for block in demo.blocks.values())
    submit = next(fn.fn for fn in demo.fns.values() if fn.api_name == "submit")
    assert "sign in with Hugging Face" in submit(nobody, "", None, {})
    options = {}
    app.launch(SimpleNamespace(launch=lambda **kw: options.update(kw)))
    assert options["auth"] is None


def test_the_queue_is_bounded_by_studio_queue_max(monkeypatch, tmp_path):
    """A full queue refuses the next request at once (503, "queue full"; tests/test_load.py under load)."""
    import app

    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "runs")
    monkeypatch.delenv("STUDIO_QUEUE_MAX", raising=False)
    assert app.queue_max() == 32 and app.build_ui(queue)._queue.max_size == 32
    monkeypatch.setenv("STUDIO_QUEUE_MAX", "5")
    demo = app.build_ui(queue)
    assert demo._queue.max_size == 5 and demo._queue.default_concurrency_limit == 1
    for bad in ("0", "many"):
        monkeypatch.setenv("STUDIO_QUEUE_MAX", bad)
        with pytest.raises(ValueError, match="STUDIO_QUEUE_MAX"):
            app.queue_max()
