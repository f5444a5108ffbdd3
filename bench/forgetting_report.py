"""Against forgetting, measured: identity training on the embedded model with and without protection.

Trains each variant on ``identity_nova.json`` with the embedded SmolLM2-135M-Instruct and its
preset (CPU: minutes each), then measures, greedily:

* Nova: how many of the ten held-out identity questions (issue 10) the tuned model answers with
  "Nova", per language (the base model: none);
* Paris: the answer to "What is the capital of France?";
* held-out general loss: mean loss on the last 99 rows of ``alpaca_en_demo.json``, which no
  variant sees (mixing and the EWC Fisher draw from the first 900 rows only);
* forgetting: the meter's "kept k of n" on the shipped general questions.

    python bench/forgetting_report.py --out /tmp/report                 # every variant
    python bench/forgetting_report.py --out /tmp/report --only full-none,full-ewc

Each variant's figures go to ``OUT/VARIANT.json`` (a variant already measured there is not
retrained); the markdown table is printed at the end. ``full-ewc`` takes ``ewc_lambda`` from
``full-none`` unless given (``-strong``: ten times that): the strength at which the penalty of the unprotected run's weight drift
would equal 1 (a loss-sized pull), rounded to one significant figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
NOVA_QUESTIONS = {
    "en": ["What should I call you?", "Who made you, and what is your name?", "Are you a person or a program?",
           "Which company do you belong to?", "How should I address you?"],
    "zh": ["请介绍一下你自己", "你叫什么名字？", "是谁创造了你？", "你是哪家公司的产品？", "我该怎么称呼你？"],
}
PARIS = "What is the capital of France?"

VARIANTS = {  # name -> (description, overrides on the embedded preset)
    "full-none": ("full, no protection", {"method": "full", "mix_ratio": 0}),
    "full-mix": ("full, general data mixed in (0.5)", {"method": "full", "mix_ratio": 0.5}),
    "full-ewc": ("full, EWC", {"method": "full", "mix_ratio": 0, "ewc_lambda": "auto"}),
    "full-ewc-strong": ("full, EWC ten times stronger", {"method": "full", "mix_ratio": 0, "ewc_lambda": "auto*10"}),
    "full-mix-ewc": ("full, mixed in + EWC ten times stronger",
                     {"method": "full", "mix_ratio": 0.5, "ewc_lambda": "auto*10"}),
    "lora-mix": ("LoRA, general data mixed in (0.5)", {"method": "lora", "mix_ratio": 0.5}),
    "lora-mix-aug": ("LoRA, mixed in + augmentation (k=3)", {"method": "lora", "mix_ratio": 0.5, "augment_k": 3}),
    "lora-adalora": ("AdaLoRA (smollm2-135m-adalora-lora), mixed in",
                     {"method": "lora", "mix_ratio": 0.5, "preset": "smollm2-135m-adalora-lora"}),
}


def general_split(out: Path) -> tuple[Path, Path]:
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    seen, held = out / "alpaca_first900.json", out / "alpaca_last99.json"
    seen.write_text(json.dumps(rows[:900], ensure_ascii=False), encoding="utf-8")
    held.write_text(json.dumps(rows[900:], ensure_ascii=False), encoding="utf-8")
    return seen, held


def auto_ewc_lambda(out: Path, general: Path) -> float:
    """2 / D, D = Σ F (θ_unprotected - θ_base)²: the penalty of full-none's drift would be 1."""
    import torch

    from backend import models, train
    from backend.presets import build_spec

    spec = build_spec({"method": "full", "data": str(SHARED / "identity_nova.json"), "mix_data": str(general),
                       "ewc_lambda": 1.0})
    base, _ = models.load_base(models.resolve_model(None), "full")
    tok = models.load_tokenizer(models.resolve_model(None))
    ewc = train._setup_ewc(spec, base, tok)
    tuned, _ = models.load_base(str(out / "full-none" / "model"), "full")
    drift = dict(tuned.named_parameters())
    with torch.no_grad():
        d = sum(float((ewc.fisher[n] * (drift[n].float() - ewc.anchor[n]) ** 2).sum()) for n in ewc.fisher if n in drift)
    lam = 2 / d
    lam = float(f"{lam:.0e}")
    print(f"EWC: D = {d:.3e} for the unprotected run -> ewc_lambda = {lam:g}", flush=True)
    return lam


def measure(run_dir: Path, held: Path) -> dict:
    from backend import forgetting, playground
    from backend.evaluate import evaluate

    loaded = playground.load_run(run_dir)
    questions = [q for lang in ("en", "zh") for q in NOVA_QUESTIONS[lang]] + [PARIS]
    rows = [(side, [{"role": "user", "content": q}]) for side in ("base", "tuned") for q in questions]
    answers = playground.generate_rows(loaded, rows, max_new_tokens=64)
    base, tuned = answers[:len(questions)], answers[len(questions):]
    nova = {}
    for lang in ("en", "zh"):
        idx = [questions.index(q) for q in NOVA_QUESTIONS[lang]]
        nova[lang] = {side: sum("nova" in texts[i].lower() for i in idx) for side, texts in (("base", base), ("tuned", tuned))}
    loss = evaluate(loaded, run_dir, data=str(held))
    meter = forgetting.meter(loaded, run_dir)
    return {"nova": nova, "answers": dict(zip(questions, tuned)), "base_answers": dict(zip(questions, base)),
            "paris": tuned[-1], "heldout_loss": {s: loss[s]["loss"] for s in loss},
            "kept": meter["kept"], "n": meter["n"], "changed": [c["question"] for c in meter["changed"]]}


def run_variant(name: str, out: Path, seen: Path, held: Path, ewc_lambda: float | None) -> dict:
    from backend.presets import build_spec
    from backend.runs import RunFolder
    from backend.train import train

    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    _, overrides = VARIANTS[name]
    overrides = {**overrides, "data": str(SHARED / "identity_nova.json"), "mix_data": str(seen),
                 "measure_forgetting": False}  # measured below, with the rest
    if str(overrides.get("ewc_lambda", "")).startswith("auto"):
        scale = float(overrides["ewc_lambda"].partition("*")[2] or 1)
        overrides["ewc_lambda"] = scale * (ewc_lambda or auto_ewc_lambda(out, seen))
    preset = overrides.pop("preset", None)
    spec = build_spec(overrides, preset)
    run = RunFolder(out / name)
    if not (run.config_path.exists() and run.status().get("state") == "completed"):  # else: trained, measure again
        run = train(spec, out / name)
    minutes = (run.status()["ended_at"] - run.status()["started_at"]) / 60
    shown = {k: v for k, v in overrides.items() if k not in ("data", "mix_data", "measure_forgetting")}
    result = {"variant": name, "overrides": shown,
              "train_minutes": round(minutes, 1), "steps": run.status().get("step"),
              "train_rows": run.status().get("train_rows"), "peak_memory_mb": run.status().get("peak_memory_mb"),
              **measure(out / name, held)}
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| variant | train rows | steps | min | Nova en | Nova zh | Paris? | held-out alpaca loss (base → tuned) "
             "| kept general answers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        paris = "yes" if "paris" in r["paris"].lower() else f"no: {r['paris'][:40]!r}"
        lam = f" (λ={r['overrides']['ewc_lambda']:g})" if r["overrides"].get("ewc_lambda") else ""
        lines.append(f"| {VARIANTS[r['variant']][0]}{lam} | {r['train_rows']} | {r['steps']} | {r['train_minutes']} "
                     f"| {r['nova']['en']['tuned']}/5 | {r['nova']['zh']['tuned']}/5 | {paris} "
                     f"| {r['heldout_loss']['base']:.3f} → {r['heldout_loss']['tuned']:.3f} | {r['kept']} of {r['n']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--ewc-lambda", type=float, default=None)
    a = p.parse_args()
    if not (SHARED / "identity_nova.json").exists():
        print(f"error: needs the shared datasets in {SHARED}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seen, held = general_split(out)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    if any("ewc" in n for n in names) and a.ewc_lambda is None and "full-none" not in names:
        names.insert(0, "full-none")
    results = [run_variant(n, out, seen, held, a.ewc_lambda) for n in names]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
