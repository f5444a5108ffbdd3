"""What the web app and its API call: plain functions over the backend, no gradio.

Each function takes plain values (strings, numbers, dicts) and returns plain values, so a UI
handler is one call and the same functions serve the named API endpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import yaml

from . import access, advisor, data, export, forgetting, models, preference, template, trackers
from .access import Caller
from .config import SECTIONS, STAGE_DEFAULTS, ConfigError, RunSpec
from .paths import studio_home
from .presets import build_spec
from .runs import RunFolder, overfitting_signal

# what a DPO/ORPO run's Runs view draws, as TRL logs it (train and eval)
REWARD_CURVES = tuple(f"{p}rewards/{k}" for p in ("", "eval_") for k in ("chosen", "rejected", "margins", "accuracies"))
UPLOAD_TTL_S = 24 * 3600  # default of STUDIO_UPLOAD_TTL: an upload no run uses is deleted after this
QUEUED_PER_USER = 3  # default of STUDIO_MAX_QUEUED_PER_USER: one user's runs waiting or running at once


def store_upload(path: str, user: str = "") -> str:
    """Copy an upload into the user's own ``STUDIO_HOME/uploads/<user>/`` (named by content hash)
    so queued runs can read it after the web server's temporary files are gone, and only its
    uploader may name it in a run (``access.confine_paths``). The content is checked by ``data``,
    not the extension alone."""
    src = Path(path)
    if src.suffix.lower() not in data.SUFFIXES:
        raise data.DataError(f"{src.name}: unsupported file type (expected {', '.join(data.SUFFIXES)})")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    folder = access.uploads_dir(user)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest}-{src.name}"
    if not target.exists():
        shutil.copyfile(src, target)
    else:
        target.touch()  # used again: the sweep counts its age from now
    return str(target)


def upload_ttl_s() -> float:
    value = os.environ.get("STUDIO_UPLOAD_TTL", "").strip()
    return float(value) if value else UPLOAD_TTL_S


def sweep_uploads(queue, ttl_s: float | None = None, now: float | None = None) -> list[Path]:
    """Delete uploads older than ``ttl_s`` that no queued or running run still reads (a run copies
    its data into ``RUN_DIR/data/`` when it starts). Returns what was deleted."""
    ttl_s = upload_ttl_s() if ttl_s is None else ttl_s
    now = time.time() if now is None else now
    root = studio_home() / "uploads"
    in_use = set()
    for job in queue.list():
        if job.state in ("queued", "running") or (job.state in ("interrupted", "failed", "cancelled")
                                                   and not job.run.data_dir.exists()):
            try:
                d = job.run.spec().data
            except (OSError, ValueError):
                continue
            in_use |= {str(Path(p).resolve()) for p in (d.data, d.mix_data) if p}
    deleted = []
    for path in root.glob("*/*") if root.exists() else []:
        if path.is_file() and now - path.stat().st_mtime > ttl_s and str(path.resolve()) not in in_use:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def preview(path: str, fmt: str = "auto", mapping: str = "", model: str | None = None,
            system_prompt: str | None = None, max_length: int = 1024) -> dict:
    """The dataset summary (``prepare --json``) rendered with the model's chat template."""
    tokenizer = template.setup_chat_template(models.load_tokenizer(models.resolve_model(model or None)))
    return data.prepare(path, fmt=fmt, mapping=data.parse_mapping(mapping) or None, tokenizer=tokenizer,
                        max_length=int(max_length), system_prompt=system_prompt).summary


def check_upload(path: str, user: str, fmt: str = "auto", mapping: str = "", system_prompt: str | None = None,
                 max_length: int = 1024) -> tuple[str, dict]:
    """Store a web upload for ``user`` and summarise it; a file that does not read as a dataset
    is deleted again (nothing of a rejected upload stays). Returns (stored path, summary)."""
    stored = store_upload(path, user=user)
    try:
        return stored, preview(stored, fmt, mapping, None, system_prompt, max_length)
    except BaseException:  # whatever went wrong, nothing of it stays
        Path(stored).unlink(missing_ok=True)
        raise


def make_spec(values: dict, preset: str | None = None, caller: Caller | None = None, queue=None) -> RunSpec:
    """A resolved RunSpec from form values (flat keys as in ``--set``); empty values are dropped.
    ``caller``: a web user, whose file settings are confined (``access.confine_paths``) and whose
    ``from_run`` is a run id of theirs in ``queue`` (``access.run_keys``); None for the machine's
    owner (the CLI)."""
    clean = {k: v for k, v in values.items() if v not in (None, "")}
    if clean.get("model") in ("embedded", "default"):
        clean.pop("model")
    if caller is not None:
        clean = access.run_keys(queue, clean, caller)
    spec = build_spec(clean, preset or None)
    if caller is not None:
        access.confine_paths(flat_settings(spec), caller)
    return spec


def flat_settings(spec: RunSpec) -> dict:
    """The spec as flat keys (as ``--set`` names them)."""
    return {k: v for section in spec.to_dict().values() if isinstance(section, dict) for k, v in section.items()}


def cli_command(spec: RunSpec, out: str = "runs/my-run") -> str:
    """The equivalent ``python -m backend train`` command: only keys that differ from the preset."""
    args = ["python", "-m", "backend", "train", "--data", spec.data.data or "DATA", "--out", out,
            "--method", spec.model.method]
    if spec.model.model:
        args += ["--model", spec.model.model]
    if spec.model.stage != "sft":
        args += ["--stage", spec.model.stage]
    if spec.model.from_run:
        args += ["--from", spec.model.from_run]
    if spec.preset:
        args += ["--preset", spec.preset]
    plain = {"method": spec.model.method, "stage": spec.model.stage,
             **({"model": spec.model.model} if spec.model.model else {})}
    reference = build_spec(plain, spec.preset).to_dict()
    for section in SECTIONS:
        for key, value in spec.to_dict()[section].items():
            if key not in ("data", "method", "model", "stage", "from_run") and reference[section][key] != value:
                args += ["--set", f"{key}={json.dumps(value, ensure_ascii=False)}"]
    return shlex.join(args)


def config_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)


def run_view(run_dir: str | Path, log_lines: int = 20) -> dict:
    """Everything the Runs tab shows for one run, read from its folder."""
    run = RunFolder(run_dir)
    status = run.status()
    metrics = run.metrics()
    log = run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-log_lines:] \
        if run.log_path.exists() else []
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    return {
        "state": status.get("state"), "step": step, "total_steps": total,
        "progress": step / total if total else 0.0, "eta_s": status.get("eta_s"),
        "elapsed_s": status.get("elapsed_s"), "tokens_per_second": status.get("tokens_per_second"),
        "peak_memory_mb": status.get("peak_memory_mb"), "estimated_peak_mb": status.get("estimated_peak_mb"),
        "error": access.redact(status.get("error")),
        "notices": [access.redact(n) for n in status.get("notices") or []] + [w for w in [overfitting_signal(metrics)] if w],
        "best_step": status.get("best_step"), "stopped_early": status.get("stopped_early"),
        "loss": [{"step": m["step"], "loss": m["loss"], "kind": "train"} for m in metrics if "loss" in m]
        + [{"step": m["step"], "loss": m["eval_loss"], "kind": "eval"} for m in metrics if "eval_loss" in m],
        "rewards": [{"step": m["step"], "value": m[k], "kind": k} for m in metrics for k in REWARD_CURVES if k in m],
        "log": [access.redact(line) for line in log], "result": run.result_dir().name if run.result_dir() else None,
        "forgetting": forgetting.read(run_dir), "forgetting_state": status.get("forgetting"),
        "checkpoints": advisor.table(status), "recommended": status.get("recommended"),
        "recommended_reason": status.get("recommended_reason"), "replay": status.get("replay"),
    }


COMPARE_SETTINGS = ("method", "r", "learning_rate", "num_train_epochs", "mix_data", "mix_ratio")  # replay: mix_*


def compare_runs(runs: dict[str, str | Path]) -> dict:
    """Several runs side by side, from their folders (``{run_id: run_dir}``; the caller checked access):
    ``series``, one row per logged point ``{run, step, loss, kind}`` (kind: train or eval) for one
    plot, and ``settings``, one row per run with its key settings."""
    series, table = [], []
    for run_id, run_dir in runs.items():
        run = RunFolder(run_dir)
        series += [{"run": run_id, "step": m["step"], "loss": m[key], "kind": kind}
                   for m in run.metrics() for key, kind in (("loss", "train"), ("eval_loss", "eval")) if key in m]
        flat = flat_settings(run.spec()) if run.exists() else {}
        table.append({"run": run_id, "state": run.status().get("state"),
                      **{k: flat.get(k) for k in COMPARE_SETTINGS}})
    return {"series": series, "settings": table}


def finished_runs(queue, caller: Caller) -> list[str]:
    """``caller``'s runs with a result to load, oldest first: those whose run folder says completed
    (the job itself stays running while the forgetting meter asks its questions)."""
    return [j.run_id for j in access.visible_jobs(queue, caller)
            if j.state == "completed" or (j.run_dir and RunFolder(j.run_dir).status().get("state") == "completed")]


def jobs_table(queue, caller: Caller) -> list[list]:
    """One row per job ``caller`` may see, for the Runs table: run id, state, owner, progress, created."""
    rows = []
    for job in access.visible_jobs(queue, caller):
        status = job.run.status()
        step, total = status.get("step") or 0, status.get("total_steps") or 0
        progress = f"{step}/{total}" if total else "–"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at)) if job.created_at else ""
        rows.append([job.run_id, job.state, job.owner, progress, created])
    return rows


def submit(queue, values: dict, preset: str | None = None, caller: Caller | None = None,
           row_tokens: int | None = None) -> str:
    """Queue a run from form values for ``caller`` (its owner; None: the machine's owner, unconfined);
    returns its run id. ``row_tokens``: the dataset's typical long row (p95), for the memory
    estimate recorded beside the measured peak."""
    spec = make_spec(values, preset, caller, queue)
    if not spec.data.data:
        raise data.DataError("no dataset: upload one in the Data tab first")
    trackers.check(spec.train.report_to)  # a missing tracker is said now, not when the run starts
    if caller is not None and not caller.admin:  # one user cannot hold the only worker for everyone
        limit = int(os.environ.get("STUDIO_MAX_QUEUED_PER_USER") or QUEUED_PER_USER)
        waiting = [j for j in queue.list(owner=caller.user) if j.state in ("queued", "running")]
        if len(waiting) >= limit:
            raise access.AccessError(f"you have {len(waiting)} runs queued or running (at most {limit}): "
                                     "wait for one to finish, or cancel one")
    lend = caller is None or access.token_allowed(flat_settings(spec), caller)
    # hub_token False: the worker starts it without the server's token (in status.json before the row exists)
    job = queue.submit(spec, owner=caller.user if caller else "", status={} if lend else {"hub_token": False})
    try:  # recorded so the Runs tab can show it next to the measured peak
        from . import memory

        if not lend:  # its config would be fetched with the server's token
            raise ValueError("the model's config is not fetched with the server's token for this run")
        job.run.set_status(estimated_peak_mb=round(memory.estimate_for_spec(spec, row_tokens=row_tokens).total / 2**20))
    except Exception as exc:  # an estimate must never block a run
        job.run.add_notices([f"no memory estimate: {exc}"])
    return job.run_id


def train_on_votes(queue, run_id: str, caller: Caller) -> tuple[str, int]:
    """Queue a DPO run from the blind votes on ``run_id``, starting from that run (its result is the
    reference): the decisive votes become pairs in the caller's uploads. Returns (new run id, pairs).
    Fewer than ``preference.MIN_VOTE_PAIRS`` pairs are refused. The learning rate is stage dpo's
    default (``config.STAGE_DEFAULTS``, set for a few tens of pairs), never the parent's SFT rate."""
    from . import playground

    job = access.job_for(queue, run_id, caller)
    pairs = playground.preference_pairs(job.run_dir)
    if len(pairs) < preference.MIN_VOTE_PAIRS:
        raise ValueError(f"{len(pairs)} decisive votes on {job.run_id}; training on votes needs at least "
                         f"{preference.MIN_VOTE_PAIRS} (A or B better; ties, 'both bad' and equal answers do not count)")
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    folder = access.uploads_dir(caller.user)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-votes-{job.run_id}.jsonl"
    path.write_text(text, encoding="utf-8")
    parent = job.run.spec()
    values = {"stage": "dpo", "from_run": job.run_id, "data": str(path), "method": parent.model.method,
              "system_prompt": parent.data.system_prompt, "max_length": parent.data.max_length,
              "learning_rate": STAGE_DEFAULTS["dpo"][parent.model.method]}
    return submit(queue, values, caller=caller), len(pairs)


def archive(run_dir: str | Path) -> str:
    """A zip of the run's result (adapter or model), config and metrics, for download."""
    return export.zip_result(run_dir)


def estimate_markdown(spec: RunSpec, row_tokens: int | None = None) -> str:
    """The pre-flight memory and disk estimate beside what this machine has free.

    ``row_tokens``: a typical long row of the dataset (its p95 length); without it every row is
    taken as ``max_length`` tokens long (an upper bound)."""
    from . import memory
    from .presets import model_config as shipped_config

    try:  # a preset's model ships its config.json: no network needed
        spec = preference.start_point(spec)  # from_run: the model it trains on
        config = shipped_config(spec.model.model) or models.load_config(
            models.resolve_model(spec.model.model), spec.model.trust_remote_code)
    except (models.ModelError, ConfigError) as exc:
        return f"estimate unavailable: {exc}"
    device = models.device()
    est = memory.estimate_for_spec(spec, config, device, row_tokens)
    free, total, name = memory.device_free_memory()
    disk_free = memory.free_disk(studio_home())
    gb = 2**30
    fits = "fits" if est.fits(free) else "**will likely not fit: lower batch or max length, or use QLoRA**"
    disk = "fits" if est.disk_total < disk_free else "**not enough free disk**"
    basis = f"rows of ~{row_tokens} tokens" if row_tokens else f"rows of max_length={spec.data.max_length} tokens"
    return (f"Estimated peak memory **{est.total / gb:.1f} GB** ({basis}) on {name} "
            f"({free / gb:.1f} of {total / gb:.1f} GB free): {fits}.  \n"
            f"Checkpoints and result: ~{est.disk_total / gb:.2f} GB ({disk_free / gb:.0f} GB free): {disk}."
            + replay_note(spec))


def replay_note(spec: RunSpec, train_rows: int | None = None) -> str:
    """What mixing general rows adds to a run, for the Train and Data tabs."""
    from . import replay

    d = spec.data
    if not (d.mix_data and d.mix_ratio):
        return "  \nNo general data mixed in (mix_data is off): nothing protects the model's general answers."
    rows = f"{round(d.mix_ratio * train_rows)} rows" if train_rows else f"{d.mix_ratio:g} rows per training row"
    if d.mix_data != replay.NAME:
        return f"  \nMixed in against forgetting: {rows} of {d.mix_data}."
    return (f"  \nReplay against forgetting: {rows} of the base model's own answers to shipped general prompts "
            f"(training takes about {1 + d.mix_ratio:g}x as many rows; replay rows are up to "
            f"{replay.MAX_NEW_TOKENS} answer tokens). The base model answers the prompts once per model, "
            f"{replay.CHUNK} at a time, and later runs reuse them.")


def user_of(request) -> str:
    """Who asks: the env-var login's user, or on a Space the Hugging Face account signed in through
    OAuth (the session Gradio keeps for ``hf_oauth``); "" for nobody."""
    if getattr(request, "username", None):
        return request.username
    underlying = getattr(request, "request", None) or request  # a gr.Request wraps the HTTP request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else getattr(underlying, "session", None)
    info = (session or {}).get("oauth_info") or {}
    if info.get("expires_at") and info["expires_at"] < time.time():
        return ""
    return (info.get("userinfo") or {}).get("preferred_username") or ""


def auth_credentials() -> list[tuple[str, str]]:
    """``STUDIO_AUTH``: ``user:password``, or several separated by commas
    (``alice:pw1,bob:pw2``; a password cannot hold a comma). The first user is the admin."""
    pairs = []
    for item in (os.environ.get("STUDIO_AUTH") or "").split(","):
        user, sep, password = item.strip().partition(":")
        if item.strip():
            if not sep or not user or not password:
                raise ValueError("STUDIO_AUTH must be user:password[,user:password...]")
            pairs.append((user, password))
    return pairs


def is_admin(request) -> bool:
    """Self-hosted: with no login (one person's machine) everyone is; with ``STUDIO_AUTH`` its first
    user. On a Space: the Space's owner, signed in."""
    user = user_of(request)
    if os.environ.get("SPACE_ID"):
        return bool(user) and user == os.environ.get("SPACE_AUTHOR_NAME")
    credentials = auth_credentials()
    return not credentials or user == credentials[0][0]


def caller(request) -> Caller:
    """The ``access.Caller`` behind a web request."""
    return Caller(user=user_of(request), admin=is_admin(request))


def hardware_summary() -> str:
    """One line for the Train tab: the GPUs here, or that there is none and what is worth running then."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
        more = " (a run may use several: `num_processes`)" if count > 1 else ""
        return f"**Hardware:** {count} GPU{'s' if count > 1 else ''}: {names}{more}."
    from .memory import device_free_memory

    ram = device_free_memory("cpu")[1] / 2**30
    return (f"**CPU only** ({os.cpu_count()} cores, {ram:.0f} GB RAM), no GPU: training computes in fp32 and is "
            "slow. What works here: LoRA on the embedded model (or another small one), a short max_length, "
            "few epochs. 7B models, QLoRA's 4-bit savings and full fine-tuning of large models need a GPU.")
