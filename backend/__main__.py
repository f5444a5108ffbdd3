"""The command line (DESIGN.md, contract 1): ``python -m backend COMMAND ...``.

Bad input exits with code 2 and one ``error:`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import FORMATS, METHODS, STAGES, DataArgs, TrainArgs  # choices and defaults: the one schema

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class UsageError(ValueError):
    pass


def _user_errors() -> tuple:
    from .config import ConfigError
    from .data import DataError
    from .export import ExportError
    from .models import ModelError
    from .playground import RunError
    from .template import TemplateError
    from .trackers import TrackerError

    return (UsageError, ConfigError, DataError, ExportError, ModelError, RunError, TemplateError, TrackerError)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("bitsandbytes", "httpx", "urllib3", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def cmd_prepare(a) -> int:
    from . import data, models, template

    tokenizer = template.setup_chat_template(models.load_tokenizer(models.resolve_model(a.model)), None)
    prepared = data.prepare(a.data, fmt=a.format, mapping=data.parse_mapping(a.map) or None, tokenizer=tokenizer,
                            max_length=a.max_length, system_prompt=a.system)
    s = prepared.summary
    if a.json:
        print(json.dumps(s, ensure_ascii=False))
        return 0
    if s["format"] == "text":
        print(f"{s['source']}: text (continued pretraining), {s['documents']} documents ({s['train_rows']} train / "
              f"{s['val_rows']} val), {s['tokens']} tokens, {s['blocks']} blocks of {s['block_length']} tokens")
    else:
        print(f"{s['source']}: {s['format']}, {s['rows']} rows ({s['train_rows']} train / {s['val_rows']} val), "
              f"{s['truncated']} longer than {a.max_length} tokens")
    print(f"token lengths: {s.get('token_lengths')}")
    for note in s.get("notes", []):
        print(f"note: {note}")
    print("sample ([[...]] is what the loss covers):\n" + s["sample"])
    return 0


def cmd_train(a) -> int:
    from .config import RunSpec, parse_set
    from .presets import build_spec
    from .train import train

    if a.config:
        if a.data or a.out or a.preset or a.set or a.method or a.model or a.stage or a.from_run:
            raise UsageError("--config takes no other options than --resume")
        spec = RunSpec.load(a.config).resolved()
        out = os.path.dirname(os.path.abspath(a.config))
    else:
        if not a.data or not a.out:
            raise UsageError("train needs --data and --out (or --config RUN_DIR/config.yaml)")
        overrides = parse_set(a.set)
        overrides["data"] = a.data
        if a.method:  # otherwise the preset's method (or --set method=..., or lora)
            overrides["method"] = a.method
        if a.model:
            overrides["model"] = a.model
        if a.stage:
            overrides["stage"] = a.stage
        if a.from_run:
            overrides["from_run"] = os.path.abspath(a.from_run)  # the worker and a resume may run elsewhere
        spec = build_spec(overrides, a.preset)
        out = a.out
    run = train(spec, out, resume=a.resume)
    print(f"done: {run.result_dir()}")
    return 0


def _load(a):
    """The run at ``--checkpoint`` (default: the recommended checkpoint, else the result); says which."""
    from .playground import load_run

    loaded = load_run(a.run, a.checkpoint)
    if not getattr(a, "json", False):
        print(f"using {loaded.checkpoint or 'the final result'} of {a.run}", file=sys.stderr)
    return loaded


def cmd_generate(a) -> int:
    from .playground import compare, load_run, parent_dir

    opponent = a.against
    sides = (opponent, "tuned") if a.side == "both" else ("tuned",) if a.side == "tuned" else (opponent,)
    # the parent run at its final result: what this run started from
    parent = {"parent": load_run(parent_dir(a.run), "result")} if opponent == "parent" else {}
    loaded = _load(a)
    answers = compare(loaded, a.prompt, sides=sides, completion=a.completion, system_prompt=a.system,
                      max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed, **parent)
    if a.json:
        print(json.dumps(answers, ensure_ascii=False))
    else:
        for side, text in answers.items():
            print(f"--- {side}\n{text}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate

    result = evaluate(_load(a), a.run, data=a.data)
    if a.json:
        print(json.dumps(result))
    else:
        for side, r in result.items():
            print(f"{side}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  ({r['tokens']} tokens)")
    return 0


def cmd_export(a) -> int:
    from . import export

    given = [flag for flag, value in (("--zip", a.zip), ("--merge", a.merge), ("--push", a.push), ("--gguf", a.gguf))
             if value is not None]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise UsageError(f"export takes exactly one of --zip FILE, --merge DIR, --push REPO_ID, --gguf FILE{got}")
    if (a.what or a.public) and a.push is None:
        raise UsageError("--what and --public go with --push")
    if a.dtype and (a.zip is not None or a.gguf is not None):
        raise UsageError("--dtype goes with --merge or --push (a zip holds the result as trained; --quant sets a GGUF's type)")
    if (a.quant or a.ollama) and a.gguf is None:
        raise UsageError("--quant and --ollama go with --gguf")
    if a.checkpoint and a.gguf is None:
        raise UsageError("--checkpoint goes with --gguf (the other exports take the recommended checkpoint)")
    if a.gguf is not None:
        return _export_gguf(a)
    if a.zip is not None:
        result = {"zip": export.zip_result(a.run, a.zip)}
    elif a.merge is not None:
        result = {"merge": str(export.merge(a.run, a.merge, a.dtype))}
    else:  # the token only from the environment: a flag would show in `ps`
        result = {"push": export.push(a.run, a.push, os.environ.get("HF_TOKEN", ""), what=a.what,
                                      private=not a.public, dtype=a.dtype)}
    print(json.dumps(result, ensure_ascii=False) if a.json else next(iter(result.values())))
    return 0


def _export_gguf(a) -> int:
    from . import gguf_export

    def progress(fraction, text):
        print(f"[{fraction:4.0%}] {text}", file=sys.stderr, flush=True)

    report = gguf_export.export_gguf(a.run, a.gguf, a.quant or "f16", a.ollama, a.checkpoint, progress=progress)
    if a.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(report["gguf"])
    print(gguf_export.summary(report))
    for prompt in report["parity"]["differs"]:
        print(f"  answered differently: {prompt!r}")
    if "modelfile" in report:
        print(f"{report['modelfile']}  (ollama create NAME -f {report['modelfile']})")
    return 0


def cmd_forgetting(a) -> int:
    from . import advisor, forgetting

    try:  # before the models load: a wrong file fails in a second
        questions = forgetting.load_questions(a.questions)
    except OSError as exc:
        raise UsageError(f"--questions {a.questions}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, RecursionError) as exc:  # not JSON, or not a list of {question, answers}
        raise UsageError(f"--questions {a.questions}: {exc}") from exc
    loaded = _load(a)
    # The run's own record (forgetting.json) is the result measured on the shipped questions: other
    # questions or a checkpoint are printed only, never written over it.
    own_record = a.questions is None and loaded.checkpoint is None
    result = forgetting.meter(loaded, a.run if own_record else None, questions=questions)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(forgetting.summary(result))
    if result["n"] and result["kept"] / result["n"] < advisor.KEEP:
        from .runs import RunFolder

        print(f"under {advisor.KEEP:.0%} kept. {advisor.advice(RunFolder(a.run).spec())}")
    for c in result["changed"]:
        print(f"- {c['question']}\n    base:  {c['base']!r}\n    tuned: {c['tuned']!r}")
    return 0


def cmd_augment(a) -> int:
    from . import augment
    from . import data as data_mod

    if a.k < 1:
        raise UsageError(f"--k must be at least 1, got {a.k}")
    if a.out is None:
        items = augment.preview_file(a.data, a.k, a.seed, a.limit, a.model, a.format,
                                     data_mod.parse_mapping(a.map) or None, a.val_size)
        if a.json:
            print(json.dumps(items, ensure_ascii=False))
        for item in [] if a.json else items:
            print(f"[{item['index']}] {item['original']}")
            for text in item["kept"]:
                print(f"    + {text}")
            for d in item["dropped"]:
                print(f"    - {d['text']!r}  ({d['reason']})")
        return 0
    train = data_mod.prepare(a.data, fmt=a.format, mapping=data_mod.parse_mapping(a.map) or None, val_size=0).train
    paraphraser, tokenizer = augment.load_paraphraser(a.model)
    rows = augment.paraphrase_prompts(paraphraser, tokenizer, train, a.k, a.seed,
                                      progress=lambda d, n: print(f"{d}/{n} prompts", file=sys.stderr, flush=True))
    with open(a.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in train)
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    stats = {**augment.stats(rows, train), "out": a.out}
    print(json.dumps(stats) if a.json else f"{a.out}: {stats['originals']} rows + {stats['augmented']} paraphrases "
          f"(for {stats['rows_with_paraphrases']} prompts)")
    return 0


def cmd_setup(a) -> int:
    from .models import embedded_model_dir

    print(f"embedded model: {embedded_model_dir()}")
    return 0


def cmd_bench(a) -> int:
    from . import bench
    from .config import parse_set

    if a.one:
        return bench.run_job(a.one)
    try:
        result = bench.run_bench(methods=a.methods, data=a.data, model=a.model, steps=a.steps, batch=a.batch,
                                 device=a.device, gpu_configs=True if a.gpu_configs else None, configs=a.configs,
                                 seq_len=a.seq_len, overrides=parse_set(a.set), identity=a.identity,
                                 json_path=a.json, timeout=a.timeout, rounds=a.rounds)
    except bench.BenchError as exc:
        raise UsageError(str(exc)) from exc
    if a.json:
        print(f"wrote {a.json}")
    return 1 if any(r["error"] for r in result["rows"]) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend", description="Fine-tuning studio, headless.")
    sub = p.add_subparsers(dest="command", required=True)
    _data_and_training(sub)
    _runs(sub)
    _tools(sub)
    return p


def _data_and_training(sub) -> None:
    """setup, prepare, train."""
    s = sub.add_parser("setup", help="install the embedded model (converts it once)")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("prepare", help="check and summarise a dataset")
    s.add_argument("data")
    s.add_argument("--format", default=DataArgs.format, choices=FORMATS)
    s.add_argument("--map", action="append", metavar="FIELD=COLUMN")
    s.add_argument("--model")
    s.add_argument("--max-length", type=int, default=DataArgs.max_length)
    s.add_argument("--system", default=DataArgs.system_prompt)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a run (or resume one from its config.yaml)")
    s.add_argument("--data")
    s.add_argument("--out")
    s.add_argument("--method", choices=METHODS)
    s.add_argument("--stage", choices=STAGES, help="sft (default), dpo or orpo (preference pairs as --data)")
    s.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                   help="start from this finished run's result (DPO's reference too)")
    s.add_argument("--model")
    s.add_argument("--preset")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--config")
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=cmd_train)


CHECKPOINT_HELP = "a checkpoint folder name, or 'result' (default: the recommended checkpoint, else the result)"


def _runs(sub) -> None:
    """What is done with a run: generate, eval, export, forgetting."""
    s = sub.add_parser("generate", help="answer a prompt with the base and/or tuned model")
    s.add_argument("--run", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--side", default="both", choices=["base", "tuned", "both"])
    s.add_argument("--against", default="base", choices=["base", "parent"],
                   help="what the tuned side is compared with: the base model, or (a run made with --from) the "
                        "parent run's result; with --side base it is answered alone")
    s.add_argument("--completion", action="store_true",
                   help="continue the prompt as raw text, without the chat template (raw-text runs)")
    s.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--system")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval", help="loss and perplexity, base vs tuned")
    s.add_argument("--run", required=True)
    s.add_argument("--data")
    s.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export", help="zip the result, merge it into a standalone model, push it to the Hub, or write a GGUF",
                       description="Exactly one of --zip, --merge, --push, --gguf. --push reads the token from "
                                   "HF_TOKEN (never a flag: it would show in `ps`).")
    s.add_argument("--run", required=True)
    s.add_argument("--zip", metavar="FILE", help="write the result, config and metrics to this zip")
    s.add_argument("--merge", metavar="DIR", help="write a standalone model folder (new, empty or an earlier export)")
    s.add_argument("--push", metavar="REPO_ID", help="upload to this Hub model repository (private unless --public)")
    s.add_argument("--dtype", help="float32, bfloat16 or float16 for merged weights "
                                   "(default: float32 on CPU-only machines, else bfloat16)")
    s.add_argument("--what", help="with --push: adapter (default for LoRA/QLoRA runs) or merged")
    s.add_argument("--public", action="store_true", help="with --push: create the repository public")
    s.add_argument("--gguf", metavar="FILE", help="write one GGUF file (llama.cpp, Ollama), checked against the "
                                                  "in-app model's greedy answers to the validation prompts")
    s.add_argument("--quant", help="with --gguf: f16 (default), q8_0 or q4_0")
    s.add_argument("--ollama", metavar="DIR", help="with --gguf: write an Ollama Modelfile into this folder")
    s.add_argument("--checkpoint", help=f"with --gguf: {CHECKPOINT_HELP}")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("forgetting", help="kept k of n: general questions the base answers right, asked of the tuned model",
                       description="Greedy answers of base and tuned to the shipped general questions (or --questions: "
                                   "a JSON list of {question, answers}). Measuring the final result on the "
                                   "shipped questions rewrites RUN/forgetting.json; other questions or a "
                                   "checkpoint are printed only.")
    s.add_argument("--run", required=True)
    s.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--questions", help="a JSON file of {\"question\", \"answers\": [...]} (default: the shipped set)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_forgetting)

def _tools(sub) -> None:
    """augment, bench."""
    s = sub.add_parser("augment", help="paraphrase each prompt K times with an instruct model (preview, or --out FILE)",
                       description="Without --out: a preview of the first --limit prompts of the training split "
                                   "(as a run with augment_k=K and the same seed makes them), kept and dropped with "
                                   "reasons. With --out: every row plus its paraphrases as JSONL (augmented_from marks "
                                   "the new rows). Training with --set augment_k=K does this inside the run.")
    s.add_argument("--data", required=True)
    s.add_argument("--k", type=int, default=3)
    s.add_argument("--seed", type=int, default=TrainArgs.seed)
    s.add_argument("--limit", type=int, default=8)
    s.add_argument("--model", help="the paraphrasing instruct model (default: the embedded one)")
    s.add_argument("--format", default=DataArgs.format, choices=FORMATS)
    s.add_argument("--map", action="append", metavar="FIELD=COLUMN")
    s.add_argument("--val-size", type=float, default=DataArgs.val_size,
                   help="the run's val_size (the preview shows its training split)")
    s.add_argument("--out", help="write the augmented data set here (JSONL)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_augment)

    s = sub.add_parser("bench", help="speed and memory per method: ours against a plain transformers+peft loop",
                       description="Trains each method for a few steps with our trainer and with a plain "
                                   "reference loop on the same data; prints a markdown table row by row "
                                   "(see backend/bench.py for the definitions).")
    s.add_argument("--json", metavar="FILE", help="write every number here (rewritten after each row)")
    s.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    s.add_argument("--data", help="default: ../shared/data/identity_nova.json")
    s.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    s.add_argument("--steps", type=int, default=6, help="optimizer steps per variant; the first is not timed")
    s.add_argument("--rounds", type=int, default=3,
                   help="runs of each method, the variants alternating; the ratio is their median")
    s.add_argument("--batch", type=int, help="rows per step (default: the run's, e.g. the preset's)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    s.add_argument("--gpu-configs", action="store_true",
                   help="random-weight 1B and 8B Llama configs on synthetic data (default on CUDA without --data)")
    s.add_argument("--configs", help="with --gpu-configs: comma list of llama-1b, llama-8b, tiny")
    s.add_argument("--seq-len", type=int, default=2048, help="with --gpu-configs: longest synthetic row")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="RunSpec keys for every run, as in train")
    s.add_argument("--identity", action="store_true",
                   help="train whole runs (the spec's epochs) and time each to a model that answers the identity")
    s.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    s.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant from a job file
    s.set_defaults(func=cmd_bench)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except _user_errors() as exc:  # one line, even for a message that spans several (e.g. YAML's)
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
