"""The server under load, launched on loopback as ``python app.py`` launches it (``app.launch``) with a
small queue (``STUDIO_QUEUE_MAX=3``). A training job of a tiny random model runs in the worker; its
tokens/s is measured alone (before and after), then while 10 clients ask the playground for base-vs-tuned answers of a
finished run at once (each again as soon as answered, or a second after "queue full") and another
client polls the job's status. Every request gets an answer or an explicit "queue full"
(gradio_client's ``QueueError``, HTTP 503) within its timeout: nothing hangs; with more clients than
the queue holds, some are told the queue is full (status polls too while it is full: the bound counts
every waiting request). The training's tokens/s under that load is printed beside the one without
(``pytest -s``), not asserted: it depends on the machine."""

import threading
import time

import pytest
from conftest import free_port

from backend import playground
from backend.jobs import Queue, Worker
from backend.presets import build_spec
from backend.runs import RunFolder

QUEUE_MAX = 3
CLIENTS = 10
ALONE_S = 8.0  # seconds of training measured without load
LOAD_S = 12.0  # seconds of load
TIMEOUT_S = 60.0  # the longest any one request may take: beyond it, it hangs
BACKOFF_S = 1.0  # a client told "queue full" asks again after this long
SETTINGS = ("", 48, 0.0, 1.0, 50, 1.0, 0)  # system, max_new_tokens, temperature, top_p, top_k, rep. penalty, seed


def finished_run(queue, model_dir, data) -> str:
    """The id of a completed LoRA run of the tiny model in ``queue`` (an adapter saved as training would
    leave it): the app names runs by id only."""
    from conftest import completed_job
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    job = completed_job(queue, build_spec({"model": str(model_dir), "data": str(data), "method": "lora"}),
                        train=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(job.run.adapter_dir)
    job.run.set_status("completed", step=1, total_steps=1)
    return job.run_id


def throughput(records: list[dict]) -> tuple[float, int]:
    """(tokens per second over these consecutive log records, steps): each record's tokens/s times the
    time since the record before it, summed, over the summed time."""
    pairs = [(b["tokens_per_second"], b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(records, records[1:])
             if "tokens_per_second" in b]
    seconds = sum(dt for _, dt in pairs)
    return (sum(tps * dt for tps, dt in pairs) / seconds if seconds > 0 else 0.0), len(pairs)


def loss_records(run: RunFolder) -> list[dict]:
    return [m for m in run.metrics() if "loss" in m]


def measure_alone(training: RunFolder) -> tuple[float, int]:
    """``throughput`` over at least ``ALONE_S`` seconds and at least 2 steps: on a loaded machine a step
    can take longer than the window, so the window waits for the steps rather than count what fits."""
    start = len(loss_records(training))
    time.sleep(ALONE_S)
    wait_for(lambda: len(loss_records(training)) >= start + 2, timeout=120, what="2 training steps")
    return throughput(loss_records(training)[start - 1:])


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_a_full_queue_answers_busy_and_training_goes_on(tmp_path, monkeypatch, tiny_model_dir, tiny_data):
    from gradio_client import Client
    from gradio_client.utils import QueueError

    import app
    from backend import paths

    monkeypatch.setenv("STUDIO_LOCAL_HOME", str(paths.local_home()))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_QUEUE_MAX", str(QUEUE_MAX))
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    monkeypatch.setattr(app, "ON_SPACES", False)
    queue = Queue(tmp_path / "jobs.sqlite3", tmp_path / "home" / "runs")
    done_run = finished_run(queue, tiny_model_dir, tiny_data)
    spec = build_spec({"model": str(tiny_model_dir), "data": str(tiny_data), "method": "lora", "max_steps": 3000,
                       "save_steps": 3000, "val_size": 0, "warmup_steps": 0, "logging_steps": 1,
                       "measure_forgetting": False})
    job = queue.submit(spec, name="long training")  # minutes on a CPU; cancelled at the end
    training = RunFolder(job.run_dir)
    worker = Worker(queue, devices=["cpu"], poll_s=0.2).start()
    port = free_port()
    demo = app.build_ui(queue)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    clients = []
    try:
        assert demo._queue.max_size == QUEUE_MAX
        probe = Client(url, verbose=False)
        clients.append(probe)
        # load the finished run into the playground's cache while the trainer starts
        first = probe.submit(done_run, "", "Who are you?", False, [], [], *SETTINGS, api_name="/side_by_side")
        left, right, *_ = first.result(timeout=TIMEOUT_S)
        assert left[-1]["role"] == right[-1]["role"] == "assistant"

        wait_for(lambda: len(loss_records(training)) >= 5 or queue.get(job.run_id).state not in ("queued", "running"),
                 timeout=90, what="the training to log its first steps")
        assert queue.get(job.run_id).state == "running", training.log_path.read_text()[-2000:]

        # tokens/s without load
        alone, alone_steps = measure_alone(training)

        # tokens/s while 10 clients hit the playground and one polls the status
        users = [Client(url, verbose=False) for _ in range(CLIENTS)]
        clients += users
        outcomes, polls, lock = [], [], threading.Lock()
        go = threading.Barrier(CLIENTS + 2, timeout=60)  # the clients, the poller, this thread
        end = [0.0]

        def attempt(call) -> str:
            """One request: "answer", "busy" (the queue's bound), "hang", or the error (asserted on later)."""
            try:
                return call()
            except QueueError:
                return "busy"
            except TimeoutError:
                return "hang"
            except Exception as exc:
                return f"error: {type(exc).__name__}: {exc}"

        def ask(client):
            go.wait()
            while True:
                t0 = time.time()

                def side_by_side():
                    client.submit(done_run, "", "Who are you?", False, [], [], *SETTINGS,
                                  api_name="/side_by_side").result(timeout=TIMEOUT_S)
                    return "answer"

                outcome = attempt(side_by_side)
                with lock:
                    outcomes.append((outcome, time.time() - t0))
                if time.time() >= end[0] or outcome == "hang":
                    return
                if outcome == "busy":
                    time.sleep(BACKOFF_S)  # as a person would click again, not at once

        def poll():
            go.wait()
            while time.time() < end[0]:
                t0 = time.time()

                def status_call():
                    status = probe.submit(job.run_id, api_name="/status").result(timeout=TIMEOUT_S)
                    return "answer" if status.get("state") == "running" else f"error: {status}"

                outcome = attempt(status_call)
                polls.append((outcome, time.time() - t0))
                time.sleep(0.5)

        threads = [threading.Thread(target=ask, args=(c,), daemon=True) for c in users]
        threads.append(threading.Thread(target=poll, daemon=True))
        for thread in threads:
            thread.start()
        start = len(loss_records(training))
        t_load = time.time()
        end[0] = t_load + LOAD_S
        go.wait()
        for thread in threads:
            thread.join(LOAD_S + 2 * TIMEOUT_S)
        load_s = time.time() - t_load
        loaded, loaded_steps = throughput(loss_records(training)[start - 1:])
        assert not any(t.is_alive() for t in threads), "a request never came back"

        after = probe.submit(job.run_id, api_name="/status").result(timeout=TIMEOUT_S)  # the load over: answers again
        assert after["state"] == "running", after
        again, again_steps = measure_alone(training)  # without load again: the machine may have changed meanwhile
        baseline = (alone + again) / 2

        kinds = {k: sum(o == k for o, _ in outcomes) for k in ("answer", "busy", "hang")}
        poll_kinds = {k: sum(o == k for o, _ in polls) for k in ("answer", "busy", "hang")}
        busy_s = [s for o, s in outcomes if o == "busy"]
        print(f"\nqueue max {QUEUE_MAX}, {CLIENTS} playground clients for {load_s:.1f} s: {len(outcomes)} requests, "
              f"{kinds['answer']} answered, {kinds['busy']} told 'queue full' "
              f"(in {max(busy_s, default=0):.2f} s at most); status polls: {poll_kinds}")
        print(f"training tokens/s alone {alone:.0f} ({alone_steps} steps), under load {loaded:.0f} ({loaded_steps} "
              f"steps), alone again {again:.0f} ({again_steps} steps): under load / alone {loaded / baseline:.2f}, "
              f"drop {100 * (1 - loaded / baseline):.0f}%")
        assert not [o for o, _ in outcomes + polls if o not in ("answer", "busy")], outcomes + polls
        assert kinds["busy"] >= 1 and kinds["answer"] >= 1, kinds
        assert queue.get(job.run_id).state == "running"  # the load did not stop the training
        assert min(alone_steps, again_steps) >= 2 and loaded_steps >= 1
    finally:
        for client in clients:
            client.close()
        demo.close()
        if queue.get(job.run_id).state in ("queued", "running"):
            queue.cancel(job.run_id)
            wait_for(lambda: queue.get(job.run_id).state not in ("queued", "running"), timeout=30,
                     what="the cancelled training to stop")
        worker.stop()
        playground.CACHE.release()
