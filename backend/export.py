"""Take a finished run's result out of the studio, three ways.

``zip_result(run_dir)``
    A zip of the result as trained (``adapter/`` or ``model/``) with ``config.yaml``,
    ``metrics.jsonl`` and ``status.json``: the download button of the Runs tab.
``merge(run_dir, out_dir)``
    A standalone transformers folder that loads without peft. LoRA/QLoRA runs: the base model is
    loaded unquantised, the adapter applied and merged into it (``merge_and_unload``); a QLoRA run
    merges into a 16-bit copy of the base, not into its 4-bit weights, so its answers can differ
    slightly from the 4-bit model the adapter was trained on. Full runs: ``model/`` copied as is
    (or cast when a dtype is asked for). The merge runs on the CPU, so a training job on the GPU is
    never disturbed; peft computes the LoRA delta there in fp32.
``push(run_dir, repo_id, token)``
    The adapter (or the merged model) uploaded to a Hugging Face model repository, private unless
    asked otherwise. The token is used for the upload only: never written to disk, logged, or
    repeated in an error message.

Every export carries the run's tokenizer with the chat template the run trained with; the run's
system prompt is built into that template as the default system message (used when a
conversation brings none), so the exported model is prompted exactly as in training and the
playground. ``studio_export.json`` records the run, method, base model and dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from . import models, template
from .config import RunSpec
from .runs import COMPLETE_MARK, RunFolder

DTYPES = ("float32", "bfloat16", "float16")
WHATS = ("adapter", "merged")
MARKER = "studio_export.json"  # marks a folder written by merge(): only such a folder is overwritten
_STORED = (".safetensors", ".bin", ".pt")  # weights barely compress: store them, deflate the rest


class ExportError(ValueError):
    """An export cannot be made (no result, bad folder, token refused...); the message says why."""


# What a checkpoint holds besides the weights: needed to resume training, not in an export.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
                  "training_args.bin", COMPLETE_MARK)


def _finished(run_dir) -> tuple[RunFolder, RunSpec, Path]:
    """The run, its spec and the weights to export: the recommended checkpoint when the checkpoint
    advisor picked one (``backend.advisor``), else the final result."""
    from . import advisor

    run = RunFolder(run_dir)
    if not run.exists():
        raise ExportError(f"{run_dir} is not a run folder (no config.yaml)")
    result = advisor.folder_of(run.path, advisor.checkpoint_for(run.path))
    if result is None:
        raise ExportError(f"{run.path.name} has no result yet (state: {run.status().get('state')})")
    return run, run.spec(), result


# -- zip ----------------------------------------------------------------------------------------
def zip_result(run_dir, path=None) -> str:
    """Zip the run's result with its config, metrics and status; returns the zip's path.

    ``path``: the zip to write (replaced if it exists); default a fresh temporary folder, which
    the web server may serve from.
    """
    run, _, result = _finished(run_dir)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="studio-export-")) / f"{run.path.name}-{result.name}.zip"
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give the zip's file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no half-written zip under the real name
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            skip = shutil.ignore_patterns(*TRAINING_STATE)(str(result), [f.name for f in result.iterdir()])
            for f in sorted(result.rglob("*")):
                if f.is_file() and f.relative_to(result).parts[0] not in skip:
                    stored = zipfile.ZIP_STORED if f.suffix in _STORED else zipfile.ZIP_DEFLATED
                    zf.write(f, f"{result.name}/{f.relative_to(result).as_posix()}", compress_type=stored)
            for extra in (run.config_path, run.metrics_path, run.status_path):
                if extra.exists():
                    zf.write(extra, extra.name)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


# -- merge --------------------------------------------------------------------------------------
def default_dtype() -> str:
    """fp32 on a CPU-only machine (16-bit matmuls are ~400x slower there), else bf16 (fp16 if unsupported)."""
    return str(models.precision_for("lora").weight_dtype).removeprefix("torch.")


def merge(run_dir, out_dir, dtype: str | None = None) -> Path:
    """Write a standalone model folder (safetensors + tokenizer) for the run; returns it.

    ``dtype``: "float32", "bfloat16" or "float16" for the saved weights. Default: ``default_dtype()``
    for LoRA/QLoRA runs; a full run's weights are copied as trained unless a dtype is given.

    ``out_dir`` must be missing, empty, or an earlier export (it holds ``studio_export.json``),
    which is replaced. Any other folder is refused rather than overwritten: a wrong path must not
    delete someone's files. The new folder is written beside ``out_dir`` and swapped in at the end,
    so a failed merge leaves no half-written model behind.
    """
    run, spec, result = _finished(run_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if spec.model.method == "full":
            saved = _save_full(result, staging, dtype)
        else:
            saved = dtype or default_dtype()
            _save_merged(spec, result, staging, saved)
        run_tokenizer(spec).save_pretrained(staging)
        _write_marker(staging, run, spec, "full" if spec.model.method == "full" else "merged", saved)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_out_dir(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder")
    if any(out.iterdir()) and not (out / MARKER).exists():
        raise ExportError(f"{out} is not empty and not an earlier export: choose a new or empty folder")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _save_merged(spec: RunSpec, adapter_dir: Path, target: Path, dtype: str) -> None:
    merged_model(spec, adapter_dir, dtype).save_pretrained(target)  # safetensors (the only format transformers 5 writes)


def merged_model(spec: RunSpec, adapter_dir: Path, dtype: str):
    """The base model in ``dtype`` with the adapter at ``adapter_dir`` merged into it (on the CPU)."""
    from transformers import AutoModelForCausalLM

    model_path = models.resolve_model(spec.model.model)
    with models.load_errors(model_path):  # unquantised even for qlora: merging into 4-bit weights would round the update away
        base = AutoModelForCausalLM.from_pretrained(  # safetensors only, as models.load_base
            model_path, dtype=_torch_dtype(dtype), use_safetensors=True, **models.hub_kwargs(spec.model.trust_remote_code)
        )
    return models.load_adapter(base, adapter_dir).merge_and_unload()


def _save_full(model_dir: Path, target: Path, dtype: str | None) -> str:
    if dtype is None:
        shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(*TRAINING_STATE))
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return str(config.get("dtype") or config.get("torch_dtype") or "float32")
    from transformers import AutoModelForCausalLM

    with models.load_errors(str(model_dir)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype), use_safetensors=True)
    model.save_pretrained(target)
    return dtype


def run_tokenizer(spec: RunSpec):
    """The tokenizer as the run used it: the run's chat template with its system prompt built in."""
    tokenizer = template.setup_chat_template(
        models.load_tokenizer(models.resolve_model(spec.model.model), spec.model.trust_remote_code),
        spec.model.chat_template,
    )
    if isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, spec.data.system_prompt)
    return tokenizer


def with_default_system(chat_template: str, system_prompt: str | None) -> str:
    """``chat_template`` that puts ``system_prompt`` first when the conversation has no system
    message, as ``template.with_system`` does in training (and not the template's own default)."""
    if not system_prompt:
        return chat_template
    literal = json.dumps(system_prompt, ensure_ascii=False)  # also a valid Jinja string literal
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}" + chat_template
    )


def _base_hub_id(spec: RunSpec) -> str | None:
    """The base model's Hugging Face id, or None when it is a local folder."""
    name = spec.model.model
    if name in models.EMBEDDED_ALIASES:
        return f"HuggingFaceTB/{models.EMBEDDED_NAME}"
    if name.count("/") == 1 and not Path(os.path.expanduser(name)).exists():
        return name
    return None


def _write_marker(folder: Path, run: RunFolder, spec: RunSpec, kind: str, dtype: str | None) -> None:
    info = {
        "run": run.path.name, "kind": kind, "method": spec.model.method,
        "base_model": _base_hub_id(spec) or spec.model.model, "dtype": dtype,
        "system_prompt": spec.data.system_prompt,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MARKER).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")


# -- push ---------------------------------------------------------------------------------------
def push(run_dir, repo_id: str, token: str, what: str | None = None, private: bool = True,
         dtype: str | None = None) -> str:
    """Upload the run to the model repository ``repo_id`` (created if missing); returns its URL.

    ``what``: "adapter" (LoRA/QLoRA runs: the adapter, small, loads on top of the base) or
    "merged" (``merge`` into a temporary folder first; a full run's model). Default: the adapter
    for LoRA/QLoRA runs, the model for full runs. ``token``: a Hugging Face token with write
    access, passed explicitly (the CLI reads HF_TOKEN); there is deliberately no fallback to the
    environment here, so a web user can never push with the server's own token.
    """
    if not token:
        raise ExportError("no Hugging Face token: pass one with write access (the CLI reads HF_TOKEN); "
                          "create one at https://huggingface.co/settings/tokens")
    run, spec, result = _finished(run_dir)
    full = spec.model.method == "full"
    what = what or ("merged" if full else "adapter")
    if what not in WHATS:
        raise ExportError(f"what must be one of {', '.join(WHATS)}, not {what!r}")
    if what == "adapter" and full:
        raise ExportError(f"{run.path.name} is a full fine-tuning run: it has no adapter; push it merged")
    if what == "adapter" and dtype:
        raise ExportError("dtype applies to merged pushes only: an adapter is uploaded as trained")
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise ExportError(f"bad repository id {repo_id!r}: expected NAME or ORG/NAME ({exc})") from None

    with tempfile.TemporaryDirectory(prefix="studio-push-") as tmp:
        folder = Path(tmp) / "upload"
        if what == "merged":
            merge(run.path, folder, dtype)
        else:
            _stage_adapter(run, spec, result, folder)
        _write_model_card(folder, run, spec, what, repo_id)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, exist_ok=True, private=private)
            api.upload_folder(repo_id=url.repo_id, folder_path=folder,
                              commit_message=f"{what} from fine-tuning studio run {run.path.name}")
        except Exception as exc:  # any hub or network failure; `from None`: no chained text to leak
            raise _hub_error(exc, repo_id, token) from None
    return str(url)


def _stage_adapter(run: RunFolder, spec: RunSpec, adapter_dir: Path, folder: Path) -> None:
    shutil.copytree(adapter_dir, folder, ignore=shutil.ignore_patterns(*TRAINING_STATE))
    config_path = folder / "adapter_config.json"
    hub_id = _base_hub_id(spec)
    if hub_id and config_path.exists():  # the embedded base is saved under a local path
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = hub_id
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    run_tokenizer(spec).save_pretrained(folder)
    _write_marker(folder, run, spec, "adapter", None)


def _write_model_card(folder: Path, run: RunFolder, spec: RunSpec, what: str, repo_id: str) -> None:
    """A short README.md; the Hub rejects a card whose ``base_model`` is not a hub id (e.g. a local path)."""
    hub_id = _base_hub_id(spec)
    meta = [f"base_model: {hub_id}"] if hub_id else []
    meta += [f"library_name: {'peft' if what == 'adapter' else 'transformers'}",
             f"tags: [finetune-studio, {spec.model.method}]"]
    base = f"`{hub_id}`" if hub_id else "a local base model"
    if what == "adapter":
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({hub_id or 'BASE_MODEL'!r})\n"
                f"model = PeftModel.from_pretrained(base, {repo_id!r})")
    else:
        load = f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained({repo_id!r})"
    system = spec.data.system_prompt
    card = (
        "---\n" + "\n".join(meta) + "\n---\n\n"
        f"# {repo_id.rsplit('/', 1)[-1]}\n\n"
        f"A {spec.model.method} fine-tune of {base} (run `{run.path.name}`), "
        f"{'as a LoRA adapter' if what == 'adapter' else 'merged into standalone weights'}.\n\n"
        f"```python\n{load}\n```\n"
    )
    if system:
        card += ("\nSystem prompt used in training (the tokenizer's chat template adds it when a "
                 f"conversation has none):\n\n```text\n{system}\n```\n")
    (folder / "README.md").write_text(card, encoding="utf-8")


def _hub_error(exc: Exception, repo_id: str, token: str) -> ExportError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return ExportError(f"the Hub refused the token for {repo_id} (HTTP {status}): it needs write "
                           f"access to that namespace (https://huggingface.co/settings/tokens)")
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(token, "***")
    return ExportError(f"push to {repo_id} failed: {text}")
