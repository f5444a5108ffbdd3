"""Learn the new thing, keep the old: a persona taught with each method and each protection, measured.

Trains each variant on a persona file (default: ``tests/data/persona_vega.csv``, 30 rows) with the
embedded SmolLM2-135M-Instruct and its preset, then measures, greedily:

* learned: of the held-out paraphrases (``tests/data/persona_vega_heldout.json``, not in the
  file), how many answers contain the name (``--name``; the base model: none);
* kept (meter): the forgetting meter's kept k of n on its shipped questions;
* kept (held-out): the same on ``tests/data/heldout_general.json``, a question set nothing in
  training, the defaults or the checkpoint choice looks at;
* minutes: wall time of the run, meter included, less the one-time cost of answering the replay
  prompts (reported apart: it is paid once per base model and cached).

    python bench/replay_report.py --out /tmp/replay                          # every variant
    python bench/replay_report.py --out /tmp/replay --only lora-none,lora-replay
    python bench/replay_report.py --out /tmp/kestrel --only qlora-default \
        --data bench/personas/persona_kestrel.csv --paraphrases bench/personas/persona_kestrel_heldout.json --name Kestrel

``bench/personas/`` holds two more persona files, written to check the defaults on data they were
not chosen on (README, "Checked on personas the defaults were not chosen on").

Each variant's figures go to ``OUT/VARIANT.json`` (a variant already measured there is not
retrained); the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TESTS = ROOT / "tests" / "data"

VARIANTS = {  # name -> overrides on the embedded preset of the method
    **{f"{m}-{name}": {"method": m, **o} for m in ("qlora", "lora", "full") for name, o in {
        "default": {},  # the defaults as they ship
        "today": {"mix_data": "none", "advise_checkpoints": False},  # the defaults before replay and the advisor
        "none": {"mix_data": "none"},
        "replay": {"mix_data": "replay", "mix_kl": 0.0},
        "replay-kl": {"mix_data": "replay", "mix_kl": 1.0},
        "2ep": {"num_train_epochs": 2},  # cheaper defaults, measured against the shipped ones
        "3ep": {"num_train_epochs": 3}, "none-3ep": {"mix_data": "none", "num_train_epochs": 3},
        "half": {"mix_ratio": 0.5},
        "half-2ep": {"mix_ratio": 0.5, "num_train_epochs": 2},
        "half-kl6": {"mix_ratio": 0.5, "mix_kl": 6.0},
        "half-2ep-kl6": {"mix_ratio": 0.5, "num_train_epochs": 2, "mix_kl": 6.0},
        "kl5": {"mix_kl": 5.0}, "kl8": {"mix_kl": 8.0}, "kl15": {"mix_kl": 15.0},
        "3ep-kl8": {"num_train_epochs": 3, "mix_kl": 8.0}, "bs4": {"per_device_train_batch_size": 4},
        "bs4-kl8": {"per_device_train_batch_size": 4, "mix_kl": 8.0}, "lr-2e-3": {"learning_rate": 2e-3},
        "ce0": {"mix_ce": 0.0}, "r15": {"mix_ratio": 1.5}, "r2": {"mix_ratio": 2.0},
        "lr-half": {"learning_rate": 5e-5},  # full fine-tuning's preset rate halved
        "ewc": {"ewc_lambda": 5e4},  # full fine-tuning: EWC on top of replay and KL
        "nokl": {"mix_kl": 0.0, "mix_ce": 1e-6},  # replay rows in the batches but teaching nothing: their steps alone
        "r8": {"r": 8, "lora_alpha": 16}, "attn": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "lr-5e-4-3ep": {"learning_rate": 5e-4, "num_train_epochs": 3}, "kl5-3ep": {"mix_kl": 5.0, "num_train_epochs": 3},
        "lr-7e-5": {"learning_rate": 7e-5}, "lr-half-3ep": {"learning_rate": 5e-5, "num_train_epochs": 3},
    }.items()},
}


def measure(run_dir: Path, name: str, paraphrases: list[str]) -> dict:
    from backend import forgetting, playground
    from backend.runs import RunFolder

    loaded = playground.load_run(run_dir)  # what the user gets: the recommended checkpoint, else the result
    answers = [playground.compare(loaded, q, sides=("tuned",), max_new_tokens=48)["tuned"] for q in paraphrases]
    held = forgetting.meter(loaded, None, questions=TESTS / "heldout_general.json")
    rows = {r["checkpoint"]: r for r in RunFolder(run_dir).status().get("checkpoints") or []}
    meter = rows[loaded.checkpoint] if loaded.checkpoint else forgetting.read(run_dir)
    return {"checkpoint": loaded.checkpoint or "result", "learned": sum(name in a for a in answers), "asked": len(answers),
            "answers": answers, "kept_meter": [meter["kept"], meter["n"]], "kept_heldout": [held["kept"], held["n"]],
            "lost_heldout": held["changed"]}


def run_variant(name: str, overrides: dict, out: Path, data: Path, persona: str, paraphrases: list[str]) -> dict:
    from backend.presets import build_spec
    from backend.train import train

    spec = build_spec({"data": str(data), **overrides})
    t0 = time.time()
    run = train(spec, out / name)
    wall = time.time() - t0
    status = run.status()
    one_time = (status.get("replay") or {}).get("seconds", 0.0) if (status.get("replay") or {}).get("answered") else 0.0
    result = {"variant": name, "overrides": overrides, "steps": status["step"], "train_rows": status["train_rows"],
              "minutes": round((wall - one_time) / 60, 2), "one_time_minutes": round(one_time / 60, 2),
              **measure(run.path, persona, paraphrases), "date": time.strftime("%Y-%m-%d")}
    (out / f"{name}.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return result


def row(r: dict) -> str:
    km, kh = r["kept_meter"], r["kept_heldout"]
    return (f"| {r['variant']} | {r.get('checkpoint', 'result')} | {r['train_rows']} | {r['steps']} | "
            f"{r['learned']}/{r.get('asked', 5)} | {km[0]} of {km[1]} "
            f"({100 * km[0] / max(km[1], 1):.0f} %) | {kh[0]} of {kh[1]} ({100 * kh[0] / max(kh[1], 1):.0f} %) | "
            f"{r['minutes']:.1f} | {r['one_time_minutes']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", help="comma list of variants (default: all)")
    p.add_argument("--data", type=Path, default=TESTS / "persona_vega.csv")
    p.add_argument("--paraphrases", type=Path, default=TESTS / "persona_vega_heldout.json")
    p.add_argument("--name", default="Vega", help="the persona's name, looked for in the answers")
    p.add_argument("--remeasure", action="store_true", help="measure variants already trained in OUT again")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every variant")
    a = p.parse_args()
    from backend.config import parse_set

    a.out.mkdir(parents=True, exist_ok=True)
    paraphrases = json.loads(a.paraphrases.read_text(encoding="utf-8"))
    extra = parse_set(a.set)
    results = []
    for name in (a.only.split(",") if a.only else VARIANTS):
        path = a.out / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text(encoding="utf-8"))
            if a.remeasure:  # the trained run measured again, its checkpoint chosen again from the stored numbers
                from backend import advisor
                from backend.runs import RunFolder

                rows = RunFolder(a.out / name).status().get("checkpoints")
                if rows:
                    advisor.record(a.out / name, rows)
                result.update(measure(a.out / name, a.name, paraphrases))
                path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
            results.append(result)
            continue
        results.append(run_variant(name, {**VARIANTS[name], **extra}, a.out, a.data, a.name, paraphrases))
        print(row(results[-1]), flush=True)
    print("\n| variant | checkpoint used | train rows | steps | learned | kept (meter) | kept (held-out) | min | one-time min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
