"""The advanced options on a tiny random model: per-module ranks and alphas, DoRA, rsLoRA, modules
trained fully beside LoRA, EWC for full fine-tuning, 8-bit optimizers falling back on CPU."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import alone, tiny_spec
from safetensors.torch import load_file

from backend import models, playground
from backend import train as train_mod
from backend.config import ConfigError, RunSpec
from backend.evaluate import evaluate
from backend.presets import build_spec

FIXTURES = Path(__file__).resolve().parent / "data"


def short(model_dir, data, **kw):
    return tiny_spec(model_dir, data, max_steps=2, **kw)


def adapter_tensors(run) -> dict:
    return load_file(run.adapter_dir / "adapter_model.safetensors")


def lora_modules(run, tiny_model_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(models.load_base(str(tiny_model_dir), "lora")[0], str(run.adapter_dir))
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def test_rank_and_alpha_patterns(tmp_path, tiny_model_dir, tiny_data):
    spec = short(tiny_model_dir, tiny_data, r=4, lora_alpha=8, rank_pattern={"self_attn.*": 8},
                 alpha_pattern={"mlp.*": 2})
    run = train_mod.train(spec, tmp_path / "run")
    tensors = adapter_tensors(run)
    q = next(v for k, v in tensors.items() if "q_proj.lora_A" in k)
    up = next(v for k, v in tensors.items() if "up_proj.lora_A" in k)
    assert q.shape[0] == 8 and up.shape[0] == 4
    scaling = {name.rsplit(".", 1)[-1]: m.scaling["default"] for name, m in lora_modules(run, tiny_model_dir).items()}
    assert scaling["q_proj"] == 8 / 8 and scaling["up_proj"] == 2 / 4


def test_dora_and_rslora_train_and_play(tmp_path, tiny_model_dir, tiny_data):
    run = train_mod.train(short(tiny_model_dir, tiny_data, use_dora=True, use_rslora=True, r=4, lora_alpha=8),
                          tmp_path / "run")
    assert any("lora_magnitude_vector" in k for k in adapter_tensors(run))
    assert all(m.scaling["default"] == pytest.approx(8 / math.sqrt(4)) for m in lora_modules(run, tiny_model_dir).values())
    loaded = playground.load_run(run.path)  # DoRA: the playground toggles instead of mixing adapters
    both = playground.compare(loaded, "Who are you? (1)", max_new_tokens=6)
    base_alone = models.load_base(str(tiny_model_dir), "lora")[0].eval()
    assert both["base"] == alone(base_alone, loaded.tokenizer, "Who are you? (1)", loaded.spec.data.system_prompt, 6)


def test_modules_to_save_trains_a_module_fully(tmp_path, tiny_model_dir, tiny_data):
    run = train_mod.train(short(tiny_model_dir, tiny_data, modules_to_save=["norm"], learning_rate=0.1),
                          tmp_path / "run")
    saved = {k: v for k, v in adapter_tensors(run).items() if "lora" not in k}
    assert saved and all(k.endswith("norm.weight") for k in saved)
    assert not torch.allclose(next(iter(saved.values())), torch.ones_like(next(iter(saved.values()))))  # it moved


def test_ewc_penalty_is_zero_at_the_base_and_holds_weights_back(tmp_path, tiny_model_dir, tiny_data):
    general = str(FIXTURES / "alpaca.json")
    with pytest.raises(ConfigError, match="full fine-tuning only"):
        RunSpec.from_flat({"method": "lora", "ewc_lambda": 1.0, "mix_data": general})
    # without general data EWC is off (as mix_kl is), so turning replay off on the full preset just works
    off = build_spec({"method": "full", "mix_data": "none"})
    assert off.train.ewc_lambda > 0 and train_mod._setup_ewc(off, None, None) is None
    # a preference stage drops the embedded preset's EWC (an SFT tool), as it drops its learning rate
    assert build_spec({"method": "full", "stage": "dpo"}).train.ewc_lambda == 0

    common = dict(method="full", mix_data=general, mix_ratio=0.1, mix_kl=0, learning_rate=1e-2, max_steps=6,
                  gradient_accumulation_steps=1)
    held_spec = tiny_spec(tiny_model_dir, tiny_data, ewc_lambda=1e6, ewc_samples=8, **common)
    base = models.load_base(str(tiny_model_dir), "full")[0]
    ewc = train_mod._setup_ewc(held_spec, base, models.load_tokenizer(str(tiny_model_dir)))  # as the run makes it
    assert float(ewc.penalty()) == 0.0 and sum(float(f.sum()) for f in ewc.fisher.values()) > 0

    def drift(run):
        tuned = load_file(run.model_dir / "model.safetensors")
        return sum(float((ewc.fisher[n] * (tuned[n] - ewc.anchor[n]) ** 2).sum()) for n in ewc.fisher if n in tuned)

    free = train_mod.train(tiny_spec(tiny_model_dir, tiny_data, **common), tmp_path / "free")
    held = train_mod.train(held_spec, tmp_path / "held")
    assert drift(held) < 0.5 * drift(free)


def test_8bit_optimizer_falls_back_on_cpu_with_a_notice(tmp_path, tiny_model_dir, tiny_data):
    run = train_mod.train(short(tiny_model_dir, tiny_data, optim="paged_adamw_8bit"), tmp_path / "run")
    assert run.status()["state"] == "completed"
    assert any("paged_adamw_8bit needs CUDA" in n for n in run.status()["notices"])
    assert json.dumps(run.spec().to_dict()).count("paged_adamw_8bit") == 1  # the config keeps what was asked


def test_adalora_reallocates_ranks_and_reloads(tmp_path, tiny_model_dir, tiny_data):
    spec = tiny_spec(tiny_model_dir, tiny_data, use_adalora=True, init_r=6, target_r=2, tinit=2, tfinal=3,
                     max_steps=12, learning_rate=5e-2)
    run = train_mod.train(spec, tmp_path / "run")
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    kept = {name: sum(mask) for name, mask in (config["rank_pattern"] or {}).items()}  # set only by reallocation
    assert kept and sum(kept.values()) <= 2 * len(kept) < 6 * len(kept)  # the budget: target_r per module
    assert len(set(kept.values())) > 1  # spread unevenly: ranks went where they mattered
    loaded = playground.load_run(run.path)
    both = playground.compare(loaded, "Who are you? (1)", max_new_tokens=6)
    assert both["base"] != both["tuned"]
    scores = evaluate(loaded, run.path)  # the loss alone: no AdaLoRA penalty (peft adds it to labels' loss)
    assert math.isfinite(scores["tuned"]["loss"]) and scores["tuned"]["loss"] != scores["base"]["loss"]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    # a learning rate this high makes eval loss climb after a few steps
    spec = tiny_spec(tiny_model_dir, tiny_data, learning_rate=3.0, max_steps=40, eval_steps=2,
                     early_stopping_patience=2, save_total_limit=1, warmup_steps=0)
    run = train_mod.train(spec, tmp_path / "run")
    status = run.status()
    evals = [m for m in run.metrics() if "eval_loss" in m]
    best = min(evals, key=lambda m: m["eval_loss"])
    assert status["stopped_early"] and status["step"] < 40
    assert status["best_step"] == best["step"] and status["best_eval_loss"] == pytest.approx(best["eval_loss"])
    assert [m["step"] for m in evals][-1] == best["step"] + 2 * 2  # stopped after `patience` worse evaluations


def test_overfitting_signal():
    from backend.runs import overfitting_signal

    rising = [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 9)] + [
        {"step": 2, "eval_loss": 2.0}, {"step": 4, "eval_loss": 1.8}, {"step": 6, "eval_loss": 1.9},
        {"step": 8, "eval_loss": 2.1}]
    assert "overfitting" in overfitting_signal(rising)
    assert overfitting_signal(rising[:-1]) is None  # one rise is noise
    flat_train = [m if "eval_loss" in m else {**m, "loss": 1.0} for m in rising]
    assert overfitting_signal(flat_train) is None  # both rising or flat: not memorising
