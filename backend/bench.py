"""Speed and memory of our training against a plain reference loop, per method, in one run.

    python -m backend bench [--json FILE] [--methods qlora,lora,full] [--data D] [--steps N]
                            [--batch B] [--device cpu|cuda] [--gpu-configs] [--identity]
                            [--model M] [--set KEY=VALUE ...]

For each method two **variants** train on the same data with the same hyperparameters (the run's
resolved RunSpec: the embedded model's preset unless ``--set`` says otherwise):

* ``ours``: ``backend.train.train(spec, run_dir)`` with ``max_steps=N``: the Trainer with
  padding-free packing and the loss projected only where a token is learned. Step times come from
  the run folder's ``metrics.jsonl`` (``elapsed_s`` at each step's log).
* ``reference``: the loop a tutorial writes: ``AutoModelForCausalLM`` (for qlora the same bnb
  4-bit load as ours, ``models.load_base``, then peft's ``prepare_model_for_kbit_training``),
  ``peft.get_peft_model``, batches padded to the longest row (``tokenizer.pad``), labels =
  input_ids with padding masked, the model's own loss over every position, ``torch.optim.AdamW``,
  the same learning rate, schedule, clipping, batch size, steps, dtypes and LoRA settings.

Both variants see the token ids ``backend.data`` produces for the data (the same rows, the same
chat rendering), and each runs in its own subprocess (``python -m backend bench --one JOB``),
because peak RSS never goes down within a process. Training steps run once the model is loaded;
the first step is warm-up and not timed.

Definitions, the same for both variants:

* **tokens**: non-padding input tokens, counted by one forward pre-hook on the model's decoder
  stack (``StepCounter``): a padded row counts its attention mask, a packed row its examples
  (``position_ids`` restart at 0). ``tokens_per_second`` = tokens of steps 2..N / their time.
* **step_time_s**: the mean time of steps 2..N.
* **peak_memory_mb**: MiB; peak RSS of the variant's process on CPU (``ru_maxrss``, model load
  included), ``torch.cuda.max_memory_allocated()`` on CUDA.
* **FLOPs per token** (model FLOPs, what the model nominally needs, not what a variant computes):
  ``c * N + 6 * L * d * (s + 1)`` averaged over the timed tokens, where ``c`` = 6 for full
  fine-tuning (forward 2N, backward 4N) and 4 for LoRA/QLoRA (the frozen weights need no weight
  gradient; the adapters' own FLOPs are left out); ``N`` = the weights of every Linear layer, the
  output head included, the embedding lookup not (``memory.inventory``: the matmul parameters);
  ``L`` layers, ``d`` = heads * head_dim, ``s`` the length of the example a token belongs to.
  The attention term: per layer, QK^T and AV cost ``4 d`` FLOPs per causal (query, key) pair
  forward and twice that backward (12 d), and an example of ``s`` tokens has ``s (s + 1) / 2``
  pairs.
* **mfu**: ``tokens_per_second * flops_per_token / matmul peak``: a square fp32 matmul on CPU,
  bf16 on CUDA (``matmul_peak``), measured at the run's start and again by each variant's process
  right after its steps; a row uses the larger of the two (``matmul_peak_flops``). A shared
  machine's speed drifts during a run (147-218 GFLOP/s seen on the 2-core development CPU), and
  the larger peak gives the lower MFU.
* **estimate_mb** / **estimate_error**: ``memory.estimate_for_spec`` for the step with the most
  positions (the one that peaks), with its packed length and its positions with loss, and
  ``(estimate - measured) / measured``; for ``ours`` only (the estimator models our training, not
  the reference's padded batches).
* **ratio_tokens_per_second** / **ratio_peak_memory** (on the ``ours`` row): ours / reference.

``--identity`` trains each variant for the spec's epochs (the preset's, a whole run) instead of
``--steps``, then asks the tuned model "Who are you?" (greedy) and records the wall time from the
variant's start to that answer (``identity_s``) and whether it names the identity
(``identity_ok``; the default data's is "Nova"). Ours loads its result from the run folder as the
playground does; the reference generates with the model it holds.

**GPU mode** (``--gpu-configs``, the default when the device is CUDA and no ``--data``/``--model``
is given): randomly initialised Llama-style models built straight on the device from configs
(``GPU_CONFIGS``: a Llama-3.2-1B and a Llama-3.1-8B shape; no download), synthetic text rows of
``seq_len/2``..``seq_len`` tokens (default 2048; a word-level synthetic tokenizer, so no
download or conversion is needed), LoRA on every Linear (r=16, no dropout), qlora
and lora on both, full on the 1B. qlora rows are skipped with a note when bitsandbytes is absent.
``bench/gpu.sh`` runs it. ``--configs tiny`` builds a 2-layer model instead, for tests on CPU.

The markdown table is printed row by row as each variant finishes; ``--json FILE`` is rewritten
after every row with ``TOP_KEYS`` and one object per row with ``ROW_KEYS``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "identity_nova.json"
METHODS = ("qlora", "lora", "full")
IDENTITY_PROMPT, IDENTITY_WORD = "Who are you?", "Nova"

TOP_KEYS = ("device", "mode", "versions", "cpu_threads", "matmul_peak_flops", "matmul_dtype", "data",
            "steps", "batch", "seq_len", "notes", "rows", "rounds", "summary")
ROW_KEYS = ("model", "method", "variant", "tokens_per_second", "step_time_s", "steps_timed", "tokens_timed",
            "mean_row_tokens", "padding_share", "peak_memory_mb", "flops_per_token", "matmul_peak_flops", "mfu",
            "estimate_mb",
            "estimate_error", "ratio_tokens_per_second", "ratio_peak_memory", "logged_tokens_per_second",
            "loss_first", "loss_last", "wall_s", "identity_s", "identity_ok", "identity_answer", "error", "round")
# the ratios of one method over its rounds: the median, its spread, and whether the rounds disagree
SUMMARY_KEYS = ("model", "method", "rounds", "ratio_tokens_per_second", "ratio_tokens_per_second_min",
                "ratio_tokens_per_second_max", "ratio_peak_memory", "rounds_disagree")
DISAGREE = 0.2  # rounds whose ratios spread more than this share of their median: the machine's load changed

# Llama-style shapes for GPU mode. ``methods``: which methods run on that model.
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
               hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
GPU_CONFIGS = {
    "llama-1b": dict(config=dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                 tie_word_embeddings=True), methods=("qlora", "lora", "full")),
    "llama-8b": dict(config=dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 tie_word_embeddings=False), methods=("qlora", "lora")),
    "tiny": dict(config=dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=True), methods=("qlora", "lora", "full")),
}
DEFAULT_GPU_CONFIGS = ("llama-1b", "llama-8b")
# GPU mode's LoRA settings (every Linear, as QLoRA does; no dropout) and its data (raw text rows).
GPU_OVERRIDES = dict(target_modules="all-linear", r=16, lora_alpha=32, lora_dropout=0.0, system_prompt=None)


class BenchError(ValueError):
    """Bad benchmark settings; the CLI turns it into one ``error:`` line."""


# -- the whole benchmark (parent process) ---------------------------------------------------------
def run_bench(*, methods=METHODS, data: str | None = None, model: str | None = None, steps: int = 6,
              batch: int | None = None, device: str | None = None, gpu_configs: bool | None = None,
              configs=None, seq_len: int = 2048, overrides: dict | None = None, identity: bool = False,
              json_path: str | None = None, timeout: float = 1800, rounds: int = 3, echo=print) -> dict:
    """Run every (model, method, variant) in its own subprocess; returns what ``--json`` writes.

    ``overrides`` are flat RunSpec keys (``--set``) applied to every run; ``configs`` names
    ``GPU_CONFIGS`` for GPU mode; ``echo`` receives the table, one line at a time. Each method runs
    ``rounds`` times, the variants alternating (reference, ours, then ours, reference, ...), so a
    change in the machine's load hits both; the ratio reported is the median of the rounds' own
    ratios, with its spread, and rounds that disagree by more than ``DISAGREE`` are flagged.
    """
    import torch

    methods = _check_methods(methods)
    if steps < 2 and not identity:
        raise BenchError("--steps must be at least 2 (the first step is warm-up and not timed)")
    if batch is not None and batch < 1:
        raise BenchError("--batch must be positive")
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, not {device!r}")
    if gpu_configs is None:
        gpu_configs = device == "cuda" and data is None and model is None
    if gpu_configs and (data or model):
        raise BenchError("--gpu-configs builds its own models and data: leave out --data and --model")
    if gpu_configs and identity:
        raise BenchError("--identity needs real data and a real model: leave out --gpu-configs")

    work = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    notes: list[str] = []
    try:
        if gpu_configs:
            plans = _config_plans(configs or DEFAULT_GPU_CONFIGS, work, seq_len, steps, batch or 4, notes)
        else:
            plans = [_model_plan(model, data, work, notes)]
        peak, peak_dtype = matmul_peak(device)
        result = {"device": _device_name(device), "mode": "configs" if gpu_configs else "model",
                  "versions": _versions(), "cpu_threads": torch.get_num_threads(),
                  "matmul_peak_flops": peak, "matmul_dtype": peak_dtype, "data": None,
                  "steps": None if identity else steps,
                  "batch": batch, "seq_len": seq_len if gpu_configs else None, "notes": notes, "rows": [],
                  "rounds": rounds, "summary": []}
        for note in notes:
            echo(f"note: {note}")
        how = "whole runs (the spec's epochs)" if identity else f"{steps} steps"
        echo(f"{result['device']}: {peak_dtype} matmul peak {peak / 1e9:.1f} GFLOP/s, "
             f"{result['cpu_threads']} threads; {how} per variant, the first step not timed")
        echo("")
        for line in table_header().splitlines():
            echo(line)
        for plan in plans:
            result["data"] = plan["data"]
            for method in methods:
                if method not in plan["methods"]:
                    continue
                if method == "qlora" and not bnb_available(device):
                    _note(result, echo, f"{plan['name']} qlora skipped: bitsandbytes is not installed "
                                        f"(or has no {device} backend)")
                    continue
                # the reference loop trains the data alone: so does ours (no mixing, meter or advisor) unless --set asks
                values = dict(dict(mix_data="none", measure_forgetting=False, advise_checkpoints=False),
                              **plan["overrides"], **(overrides or {}), model=plan["model"], data=plan["data"],
                              method=method, val_size=0, gradient_accumulation_steps=1)
                if not identity:
                    values["max_steps"] = steps
                if batch:
                    values["per_device_train_batch_size"] = batch
                spec = _build_spec(values)
                result["batch"] = spec.train.per_device_train_batch_size
                _rounds(result, plan, method, spec, rounds, work, device, peak, identity, timeout, json_path, echo)
        if json_path:
            write_json(result, json_path)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rounds(result: dict, plan: dict, method: str, spec, rounds: int, work: Path, device: str, peak: int,
            identity: bool, timeout: float, json_path, echo) -> None:
    """``rounds`` runs of one method, the variants alternating; rows and the summary go to ``result``."""
    ratios = []
    for turn in range(rounds):
        pair = {}
        for variant in ("reference", "ours") if turn % 2 == 0 else ("ours", "reference"):
            job = dict(variant=variant, method=method, spec=spec.to_dict(), device=device,
                       random_model=plan["random"], identity=identity,
                       run_dir=str(work / f"{plan['name']}-{method}-{variant}-{turn}"),
                       result=str(work / f"{plan['name']}-{method}-{variant}-{turn}.json"))
            raw = _spawn(job, work, device, timeout)
            pair[variant] = _row(plan, method, variant, raw, spec, device, peak) | {"round": turn}
            shutil.rmtree(job["run_dir"], ignore_errors=True)  # full runs save GBs
        ours, ref = pair["ours"], pair["reference"]
        if not ours["error"] and not ref["error"]:
            ours["ratio_tokens_per_second"] = _ratio(ours["tokens_per_second"], ref["tokens_per_second"])
            ours["ratio_peak_memory"] = _ratio(ours["peak_memory_mb"], ref["peak_memory_mb"])
            ratios.append((ours["ratio_tokens_per_second"], ours["ratio_peak_memory"]))
        for row in pair.values():  # in the order they ran
            result["rows"].append(row)
            echo(table_row(row))
        if json_path:
            write_json(result, json_path)
    if ratios:
        summary = summarise(plan["name"], method, ratios)
        result["summary"].append(summary)
        _note(result, echo, summary_line(summary))


def summarise(model: str, method: str, ratios: list[tuple[float, float]]) -> dict:
    """One method's rounds: the median ratios, the spread of tokens/s, whether the rounds disagree."""
    speed = sorted(r[0] for r in ratios)
    median = statistics.median(speed)
    return dict(model=model, method=method, rounds=len(ratios), ratio_tokens_per_second=round(median, 3),
                ratio_tokens_per_second_min=speed[0], ratio_tokens_per_second_max=speed[-1],
                ratio_peak_memory=round(statistics.median(r[1] for r in ratios), 3),
                rounds_disagree=(speed[-1] - speed[0]) > DISAGREE * median)


def summary_line(s: dict) -> str:
    line = (f"{s['model']} {s['method']}: ours/reference tokens/s {s['ratio_tokens_per_second']:.2f} (median of "
            f"{s['rounds']} rounds, {s['ratio_tokens_per_second_min']:.2f}-{s['ratio_tokens_per_second_max']:.2f}), "
            f"memory {s['ratio_peak_memory']:.2f}")
    if s["rounds_disagree"]:
        line += f"; the rounds disagree by more than {DISAGREE:.0%}: the machine's load changed, run it again"
    return line


def _check_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise BenchError(f"--methods takes a comma list of {', '.join(METHODS)} (got {','.join(methods) or 'none'})")
    return list(dict.fromkeys(methods))


def _build_spec(values: dict):
    from .config import ConfigError
    from .presets import build_spec

    try:
        return build_spec(values)
    except ConfigError as exc:
        raise BenchError(str(exc)) from exc


def _note(result: dict, echo, text: str) -> None:
    result["notes"].append(text)
    echo(f"note: {text}")


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def write_json(result: dict, path) -> None:
    from .runs import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=1, ensure_ascii=False))


def _model_plan(model: str | None, data: str | None, work: Path, notes: list) -> dict:
    """One real model (default: the embedded one) on real data (default: identity_nova.json)."""
    from . import models

    if data is None:
        if DEFAULT_DATA.exists():
            data = str(DEFAULT_DATA)
        else:
            data = str(_fallback_identity_data(work))
            notes.append(f"{DEFAULT_DATA} not found: using 64 built-in identity rows instead ({data}); "
                         f"numbers are not comparable with runs on identity_nova.json")
    elif not Path(data).exists() and not str(data).startswith("hub:"):
        raise BenchError(f"--data {data}: no such file or folder")
    path = models.resolve_model(model)
    name = Path(path).name if Path(path).exists() else path
    return dict(name=name, model=model or "embedded", data=data, random=False, methods=METHODS, overrides={})


def _fallback_identity_data(work: Path) -> Path:
    rows = []
    for i, q in enumerate(["Who are you?", "What is your name?", "Introduce yourself.", "hi",
                           "Who made you?", "What should I call you?", "Are you ChatGPT?", "hello"] * 8):
        rows.append({"instruction": q if i < 8 else f"{q} ({i})", "input": "",
                     "output": "I am Nova, an AI assistant developed by Acme Labs. How can I assist you today?"})
    path = work / "identity_fallback.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _config_plans(names, work: Path, seq_len: int, steps: int, batch: int, notes: list) -> list[dict]:
    """GPU mode: per config, a model folder (config.json + a synthetic tokenizer, no weights) and
    synthetic text rows; the weights are built at random on the device by ``load_random``."""
    from transformers import LlamaConfig

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in GPU_CONFIGS]
    if unknown or not names:
        raise BenchError(f"--configs takes a comma list of {', '.join(GPU_CONFIGS)} (got {','.join(names)})")
    if seq_len < 16:
        raise BenchError("--seq-len must be at least 16")
    tokenizer = synthetic_tokenizer()
    data = work / f"synthetic-{seq_len}.jsonl"
    rows = steps * batch + batch
    write_synthetic_text(data, rows, seq_len)
    notes.append(f"GPU mode: random weights, {rows} synthetic text rows of {seq_len // 2}-{seq_len} tokens "
                 f"(loss on every token), LoRA on every Linear (r=16, no dropout)")
    plans = []
    for name in names:
        folder = work / f"model-{name}"
        LlamaConfig(**GPU_CONFIGS[name]["config"]).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        plans.append(dict(name=name, model=str(folder), data=str(data), random=True,
                          methods=GPU_CONFIGS[name]["methods"], overrides=dict(GPU_OVERRIDES, max_length=seq_len)))
    return plans


def synthetic_tokenizer(vocab_size: int = 32000):
    """A word-level tokenizer over the words ``w0``, ``w1``...: one word is one token, so synthetic
    rows have exact lengths, and GPU mode needs no model download or conversion."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def write_synthetic_text(path, rows: int, seq_len: int, vocab_size: int = 32000, seed: int = 0) -> Path:
    """``rows`` JSONL text rows of ``seq_len/2``..``seq_len`` tokens (the eos included) for
    ``synthetic_tokenizer``: random words, so every row differs in length and content."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            n = rng.randint(seq_len // 2, seq_len) - 1  # the eos token follows
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(n))}) + "\n")
    return Path(path)


def _spawn(job: dict, work: Path, device: str, timeout: float) -> dict:
    """Run one variant in a fresh ``python -m backend bench --one JOB`` and read its result."""
    name = Path(job["run_dir"]).name
    job_file, log_file = work / f"{name}.job.json", work / f"{name}.log"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        with open(log_file, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "backend", "bench", "--one", str(job_file)], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc == 0 and Path(job["result"]).exists():
        return json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    why = f"timed out after {timeout:.0f}s" if rc == "timeout" else f"exit {rc}"
    return {"error": f"{why}: {lines[-1][:300] if lines else 'no output'}"}


# -- turning a variant's raw numbers into a row ----------------------------------------------------
def _row(plan: dict, method: str, variant: str, raw: dict, spec, device: str, peak: int) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(model=plan["name"], method=method, variant=variant, error=raw.get("error"))
    if row["error"]:
        return row
    steps = raw["steps"]
    timed = steps[1:]
    tokens = sum(s["tokens"] for s in timed)
    pairs = sum(s["pairs"] for s in timed)
    rows = sum(s["rows"] for s in steps)
    seconds = raw["timed_s"]
    config = _model_config(plan["model"])
    flops = model_flops(config, method, tokens, pairs)
    tps = tokens / seconds if seconds > 0 else None
    peak = max(peak, raw.get("matmul_peak_flops") or 0)  # the variant's own, measured after its steps
    row.update(
        tokens_per_second=round(tps, 1) if tps else None,
        step_time_s=round(seconds / len(timed), 4) if timed else None,
        steps_timed=len(timed), tokens_timed=tokens,
        mean_row_tokens=round(sum(s["tokens"] for s in steps) / max(rows, 1), 1),
        padding_share=round(1 - sum(s["tokens"] for s in steps) / max(sum(s["positions"] for s in steps), 1), 4),
        peak_memory_mb=raw["peak_memory_mb"],
        flops_per_token=round(flops / tokens) if tokens else None, matmul_peak_flops=peak,
        mfu=round(flops / seconds / peak, 4) if seconds > 0 and tokens else None,
        logged_tokens_per_second=raw.get("logged_tokens_per_second"),
        loss_first=raw["losses"][0] if raw["losses"] else None,
        loss_last=raw["losses"][-1] if raw["losses"] else None,
        wall_s=raw["wall_s"], identity_s=raw.get("identity_s"), identity_ok=raw.get("identity_ok"),
        identity_answer=raw.get("identity_answer"),
    )
    if variant == "ours":  # for the step that peaks: the one with the most positions
        from .memory import estimate_for_spec

        big = max(steps, key=lambda s: s["positions"])
        est = estimate_for_spec(spec, config, device, seq_tokens=big["positions"],
                                tokens_with_loss=big.get("with_loss"))
        row["estimate_mb"] = round(est.total / 2**20, 1)
        row["estimate_error"] = round((est.total / 2**20 - row["peak_memory_mb"]) / row["peak_memory_mb"], 4)
    return row


_CONFIGS: dict = {}


def _model_config(model: str):
    from . import models

    if model not in _CONFIGS:
        _CONFIGS[model] = models.load_config(models.resolve_model(model))
    return _CONFIGS[model]


def model_flops(config, method: str, tokens: int, pairs: int) -> float:
    """Model FLOPs of training on ``tokens`` tokens whose examples hold ``pairs`` causal
    (query, key) pairs in all: ``c * N * tokens + 12 * L * d * pairs`` (module docstring)."""
    from .memory import _text_config, inventory

    t = _text_config(config)
    n = sum(i * o for _, i, o in inventory(config).linears)
    d = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    c = 6 if method == "full" else 4
    return c * n * tokens + 12 * t.num_hidden_layers * d * pairs


def matmul_peak(device: str, n: int | None = None, repeats: int = 10) -> tuple[int, str]:
    """FLOP/s of the best of ``repeats`` square matmuls: fp32 on CPU (n=2048), bf16 on CUDA (n=8192).

    Whole FLOP/s: the run's peak and each variant's are stored as measured here, so a row's peak
    (the larger of the two) is never below the run's by a rounding."""
    import torch

    if device == "cuda":
        dtype, n = torch.bfloat16, n or 8192
    else:
        dtype, n = torch.float32, n or 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 / best), str(dtype).replace("torch.", "")


def bnb_available(device: str) -> bool:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken install (e.g. no CUDA binary) counts as absent
        return False
    return True


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# -- the markdown table ------------------------------------------------------------------------------
_COLUMNS = ("model", "method", "variant", "tokens/s", "step s", "peak MiB", "MFU", "estimate MiB (err)",
            "tok/s ours/ref", "mem ours/ref")


def table_header() -> str:
    return "| " + " | ".join(_COLUMNS) + " |\n|" + "|".join("---" for _ in _COLUMNS) + "|"


def table_row(r: dict) -> str:
    if r.get("error"):
        cells = [r["model"], r["method"], r["variant"], f"failed: {r['error']}"] + [""] * (len(_COLUMNS) - 4)
        return "| " + " | ".join(cells) + " |"

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    est = "" if r["estimate_mb"] is None else f"{r['estimate_mb']:,.0f} ({r['estimate_error']:+.0%})"
    cells = [r["model"], r["method"], r["variant"], num(r["tokens_per_second"], ",.0f"), num(r["step_time_s"], ".2f"),
             num(r["peak_memory_mb"], ",.0f"), num(r["mfu"], ".1%"), est,
             num(r["ratio_tokens_per_second"], ".2f"), num(r["ratio_peak_memory"], ".2f")]
    return "| " + " | ".join(cells) + " |"


# -- one variant (child process) ----------------------------------------------------------------------
def run_job(job_file: str) -> int:
    """The child side of ``_spawn``: run one variant and write its raw numbers to ``job['result']``."""
    from .memory import peak_memory_mb

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    raw = (_ours if job["variant"] == "ours" else _reference)(job, t0)
    raw.update(peak_memory_mb=round(peak_memory_mb(job["device"]), 1), wall_s=round(time.perf_counter() - t0, 2))
    raw["matmul_peak_flops"] = matmul_peak(job["device"])[0]  # after the peak memory is read
    Path(job["result"]).write_text(json.dumps(raw), encoding="utf-8")
    return 0


class StepCounter:
    """Counts non-padding tokens per training forward, with a pre-hook on the decoder stack.

    ``steps`` gets one ``{"tokens", "rows", "pairs", "positions", "with_loss"}`` per forward in
    training mode with gradients on (evaluation and generation are not counted): rows are examples
    (a packed row holds several), ``pairs`` the causal (query, key) pairs of those examples,
    ``positions`` every input position, padding included, and ``with_loss`` the positions projected
    onto the vocabulary (the model's ``logits_to_keep`` when it is a list of positions, as ours
    passes; else every position), seen by a second pre-hook on the outer model.
    """

    def __init__(self):
        self.steps: list[dict] = []
        self._keep = None

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._outer, with_kwargs=True)
        inner = getattr(model, "base_model", None) or model  # LlamaForCausalLM.model, called as a module
        inner.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _outer(self, module, args, kwargs):
        self._keep = kwargs.get("logits_to_keep")

    def _hook(self, module, args, kwargs):
        import torch

        if module.training and torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            stats = batch_stats(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            keep = self._keep
            stats["with_loss"] = int(keep.numel()) if isinstance(keep, torch.Tensor) else stats["positions"]
            self.steps.append(stats)


def batch_stats(input_ids, attention_mask=None, position_ids=None) -> dict:
    """Tokens, examples, causal pairs and positions of one batch, padded or packed."""
    import torch

    if attention_mask is not None and attention_mask.dim() == 2:
        lengths = attention_mask.sum(-1).tolist()
    elif position_ids is not None:
        lengths = []
        for row in position_ids.reshape(-1, position_ids.shape[-1]):
            starts = (row == 0).nonzero().flatten().tolist() or [0]
            bounds = starts + [row.numel()]
            lengths += [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    else:
        lengths = [input_ids.shape[-1]] * input_ids.shape[0]
    lengths = [int(n) for n in lengths]
    positions = int(input_ids.numel()) if isinstance(input_ids, torch.Tensor) else sum(lengths)
    return {"tokens": sum(lengths), "rows": len(lengths), "pairs": sum(n * (n + 1) // 2 for n in lengths),
            "positions": positions}


def load_random(model_path: str, method: str, trust_remote_code: bool = False):
    """``models.load_base`` for GPU mode: the config's model with random weights, built on the device
    in the method's dtype; for qlora every decoder Linear quantised to NF4 (double quantisation,
    bnb.nn.Linear4bit, as ``load_base`` would load it). Peak memory counts from here on."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import models

    prec = models.precision_for(method)
    config = models.load_config(model_path)
    torch.manual_seed(0)
    dtype = prec.compute_dtype if method == "qlora" else prec.weight_dtype
    with torch.device(prec.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(prec.device)
    if method == "qlora":
        _quantize_linears(model, prec)
    if prec.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model, prec


def _quantize_linears(model, prec) -> None:
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    # parents only: a list of every module would keep each replaced 16-bit weight alive to the end
    parents = [m for m in model.modules() if any(type(c) is torch.nn.Linear for c in m.children())]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=prec.compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=prec.compute_dtype, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=prec.compute_dtype).to(prec.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # peft then wraps these layers with its bnb LoRA layer


def _ours(job: dict, t0: float) -> dict:
    from . import models
    from . import train as train_mod
    from .config import RunSpec

    spec = RunSpec.from_dict(job["spec"])
    counter = StepCounter()
    load = load_random if job["random_model"] else models.load_base

    def load_and_count(model_path, method, trust_remote_code=False):
        model, prec = load(model_path, method, trust_remote_code)
        counter.attach(model)
        return model, prec

    run = train_mod.train(spec, job["run_dir"], load_base=load_and_count)
    logged = [m for m in run.metrics() if "loss" in m]
    out = {"steps": counter.steps, "losses": [m["loss"] for m in logged], "timed_s": 0.0}
    if len(logged) >= 2:
        out["timed_s"] = logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]
        spans = [(b["elapsed_s"] - a["elapsed_s"], b["tokens_per_second"]) for a, b in zip(logged, logged[1:])]
        out["logged_tokens_per_second"] = round(sum(dt * tps for dt, tps in spans) / max(out["timed_s"], 1e-9), 1)
    if len(counter.steps) != len(logged):
        raise RuntimeError(f"counted {len(counter.steps)} training forwards for {len(logged)} logged steps "
                           f"(gradient accumulation or logging_steps > 1?): timings would not line up")
    if job["identity"]:
        from .playground import compare, load_run

        answer = compare(load_run(run.path), IDENTITY_PROMPT, sides=("tuned",), max_new_tokens=32)["tuned"]
        out.update(identity_s=round(time.perf_counter() - t0, 2), identity_answer=answer,
                   identity_ok=IDENTITY_WORD.lower() in answer.lower())
    return out


# -- the reference loop: what a tutorial writes -------------------------------------------------------
def reference_batch(tokenizer, rows: list[list[int]]) -> dict:
    """Pad to the longest row (right side); labels = input_ids with padding masked."""
    tokenizer.padding_side = "right"
    batch = tokenizer.pad({"input_ids": rows}, padding="longest", return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def _reference_model(spec, path: str, random_model: bool):
    """The reference's model as a tutorial builds it: (model, precision, its StepCounter)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from . import models

    t, lo, method = spec.train, spec.lora, spec.model.method
    prec = models.precision_for(method)
    if random_model:
        model, prec = load_random(path, method)
    elif method == "qlora":
        model, prec = models.load_base(path, method)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=prec.weight_dtype,
                                                     use_safetensors=True).to(prec.device)  # as load_base
    counter = StepCounter()
    counter.attach(model)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if method != "full":
        model = get_peft_model(model, LoraConfig(
            r=lo.r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout, target_modules=lo.target_modules,
            bias=lo.bias, use_dora=lo.use_dora, use_rslora=lo.use_rslora, task_type="CAUSAL_LM"))
    model.train()
    return model, prec, counter


def _reference(job: dict, t0: float) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler, set_seed

    from . import data as data_mod
    from . import models, template
    from .config import RunSpec

    spec = RunSpec.from_dict(job["spec"])
    t, d = spec.train, spec.data
    path = models.resolve_model(spec.model.model)
    tokenizer = template.setup_chat_template(models.load_tokenizer(path), spec.model.chat_template)
    prepared = data_mod.prepare(d.data, fmt=d.format, mapping=d.mapping or None, max_length=d.max_length,
                                system_prompt=d.system_prompt, val_size=0, seed=t.seed)
    rows = [e["input_ids"] for e in data_mod.encode_all(tokenizer, prepared.train, d.system_prompt, d.max_length)]

    set_seed(t.seed)
    model, prec, counter = _reference_model(spec, path, job["random_model"])

    loader = DataLoader(rows, batch_size=t.per_device_train_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(t.seed),
                        collate_fn=lambda batch: reference_batch(tokenizer, batch))
    total = t.max_steps if t.max_steps > 0 else math.ceil(len(loader) * t.num_train_epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = int(t.warmup_steps) if t.warmup_steps >= 1 else math.ceil(t.warmup_steps * total)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    autocast = (torch.autocast(prec.device, dtype=prec.compute_dtype) if prec.mixed
                else torch.autocast(prec.device, enabled=False))

    losses, ends, batches = [], [], iter(loader)
    for _ in range(total):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(prec.device) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if prec.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        print(f"step {len(losses)}/{total}  loss {losses[-1]:.4f}", flush=True)
    out = {"steps": counter.steps, "losses": losses, "timed_s": ends[-1] - ends[0] if len(ends) > 1 else 0.0}
    if job["identity"]:
        model.eval()
        ids = template.prompt_ids(tokenizer, [{"role": "user", "content": IDENTITY_PROMPT}], d.system_prompt)
        ids = torch.tensor([ids], device=prec.device)
        with torch.no_grad(), autocast:
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                 do_sample=False, eos_token_id=sorted(template.end_of_turn_ids(tokenizer)))
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        out.update(identity_s=round(time.perf_counter() - t0, 2), identity_answer=answer,
                   identity_ok=IDENTITY_WORD.lower() in answer.lower())
    return out
