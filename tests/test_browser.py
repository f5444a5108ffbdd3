"""A real headless Chromium drives the app: upload, preview, queue a short run of the embedded
model, watch it reach completed with the loss plot drawn, then compare base and tuned side by side
in the Playground; screenshots are saved."""

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import serve

from backend.jobs import Queue, Worker

FIXTURES = Path(__file__).resolve().parent / "data"
SHOTS = Path(os.environ.get("SCREENSHOT_DIR", Path(__file__).resolve().parents[1] / "runs" / "screenshots"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None,
                       reason="Debian's chromium is not installed (scripts/ensure_chromium.sh)"),
]


def test_upload_queue_and_watch_a_run_in_the_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    queue = Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "runs")
    worker = Worker(queue, poll_s=0.5).start()
    demo, url = serve(queue)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(str(FIXTURES / "alpaca.json"))
            expect(page.get_by_text("3 rows")).to_be_visible(timeout=60_000)
            expect(page.locator("mark").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "data.png"), full_page=True)

            page.get_by_role("tab", name="Train").click()
            page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
            page.get_by_role("button", name="Queue run").click()
            expect(page.get_by_text("Queued")).to_be_visible(timeout=30_000)

            page.get_by_role("tab", name="Runs").click()
            # the run's detail line ("**completed** · step ..."); the table may hold hidden copies of cells
            expect(page.locator("strong", has_text="completed").first).to_be_visible(timeout=300_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)
            lines = page.locator(".vega-embed:visible .mark-line path")  # train and eval loss curves
            expect(lines.nth(1)).to_be_visible(timeout=30_000)  # retried: the plot may be redrawing
            page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

            # the completed run side by side: the tab picks the newest completed run
            page.get_by_role("tab", name="Playground").click()
            page.get_by_role("button", name="Generate both").click()
            answers = page.locator(".bot-row:visible")
            expect(answers).to_have_count(2, timeout=120_000)
            expect(answers.nth(0)).not_to_be_empty(timeout=120_000)  # streamed: the rows come first
            expect(answers.nth(1)).not_to_be_empty(timeout=120_000)
            # streamed: wait until the server has no generation running (a pause in the stream on a
            # busy machine is not its end), then until the page shows the last chunk
            for _ in range(240):
                page.wait_for_timeout(500)
                if all(job is None for job in demo._queue.active_jobs):
                    break
            texts = None
            for _ in range(20):
                page.wait_for_timeout(500)
                if texts == (texts := answers.all_inner_texts()):
                    break
            assert all(len(t.strip()) > 3 for t in texts), texts
            page.screenshot(path=str(SHOTS / "playground.png"), full_page=True)
            browser.close()
        for _ in range(300):  # the job ends after the forgetting meter, which the playground need not wait for
            if queue.list()[-1].state != "running":
                break
            time.sleep(1)
    finally:
        demo.close()
        worker.stop()
    job = queue.list()[-1]
    assert job.state == "completed"


def test_two_runs_lines_on_the_comparison_plot(tmp_path):
    """Two finished runs (their metrics written here, no training) picked in the Runs tab's comparison:
    four lines, each run's train and eval loss."""
    from conftest import completed_job
    from playwright.sync_api import expect, sync_playwright

    from backend.presets import build_spec

    queue = Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "runs")
    ids = []
    for lr in (1e-4, 1e-3):
        job = completed_job(queue, build_spec({"method": "lora", "learning_rate": lr}), train=False)
        for step in (1, 2, 3):
            job.run.append_metrics({"step": step, "loss": lr * 1000 / step})
            job.run.append_metrics({"step": step, "eval_loss": lr * 800 / step})
        ids.append(job.run_id)
    demo, url = serve(queue)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(url)
            page.get_by_role("tab", name="Runs").click()
            page.get_by_text("Compare runs").first.click()  # the accordion
            picker = page.get_by_label("Runs to compare", exact=False)
            for run_id in ids:
                picker.click()
                page.get_by_role("option", name=run_id).click()
            page.get_by_role("button", name="Compare runs", exact=True).click()
            lines = page.locator("#compare-plot .mark-line path")
            expect(lines).to_have_count(4, timeout=60_000)
            page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
