"""Preference tuning (stages ``dpo`` and ``orpo``) through TRL's trainers, and where a run starts.

* ``start_point(spec)``: a run with ``from_run`` starts from that finished run. An adapter result
  (LoRA/QLoRA) is loaded onto the same base and trained on as it is (``start_adapter``; a full run
  merges it instead); a full result (``model/``) becomes the new run's base model, so a LoRA run
  on it puts a fresh adapter on the SFT weights.
* ``trainer(...)``: TRL's ``DPOTrainer`` (``trl``) or ``ORPOTrainer`` (``trl.experimental.orpo``
  in TRL 1.16) with the studio's ``TrainingArguments`` plus TRL's own keys (``beta``,
  ``loss_type``, ``max_length``).
* DPO's reference is the starting point, frozen. A LoRA/QLoRA model passed with ``ref_model=None``
  keeps no second model: TRL copies the starting adapter to a frozen ``ref`` adapter (a fresh
  adapter is zero, so ``ref`` is the base; an SFT adapter continues, so ``ref`` is the SFT model)
  and computes reference log-probabilities with it. A full run keeps a frozen copy of its start
  (``reference``), since TRL would otherwise reload the base from the model's name, which for a
  merged SFT adapter is not the start.
* ``score_pairs``: summed log-probabilities of chosen and rejected answers under a model: the
  held-out preference accuracy and margin (the slow test's proof, README's numbers).

Preference rows are stored as ``{"messages": prompt + [chosen answer], "rejected": text}``
(``backend.data``); ``trl_rows`` turns them into TRL's conversational ``prompt``/``chosen``/
``rejected`` with the run's system prompt, rendered by TRL with the run's chat template.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from .config import ConfigError, RunSpec
from .runs import RunFolder

MIN_VOTE_PAIRS = 8  # "Train on these votes": fewer decisive votes teach DPO nothing measurable
TRL_METRICS = ("rewards/", "logps/", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def is_preference(spec: RunSpec) -> bool:
    return spec.model.stage != "sft"


# -- where a run starts --------------------------------------------------------------------------
def _parent(spec: RunSpec) -> RunFolder:
    parent = RunFolder(spec.model.from_run)
    if not parent.exists():
        raise ConfigError(f"from_run {spec.model.from_run}: not a run folder (no config.yaml)")
    if parent.status().get("state") != "completed" or parent.result_dir() is None:
        raise ConfigError(f"from_run {parent.path.name}: the run has not finished (state: "
                          f"{parent.status().get('state')}); start from a completed run")
    return parent


def start_point(spec: RunSpec) -> RunSpec:
    """``spec`` with ``from_run`` resolved into what it trains on: the parent's base model and LoRA
    settings (an adapter parent), or the parent's full weights as the base (a full parent)."""
    if not spec.model.from_run:
        return spec
    parent = _parent(spec)
    pspec = parent.spec()
    if parent.result_dir() == parent.model_dir:
        base, lora = str(parent.model_dir.resolve()), spec.lora
    else:
        base, lora = pspec.model.model, pspec.lora if spec.model.method != "full" else spec.lora
    if spec.model.model not in (None, base, pspec.model.model):
        raise ConfigError(f"from_run {parent.path.name} was trained on {pspec.model.model or 'the embedded model'}: "
                          f"leave model empty (got {spec.model.model})")
    model = dataclasses.replace(spec.model, model=base, chat_template=spec.model.chat_template or pspec.model.chat_template,
                                trust_remote_code=spec.model.trust_remote_code or pspec.model.trust_remote_code)
    return dataclasses.replace(spec, model=model, lora=lora)


def start_adapter(spec: RunSpec) -> Path | None:
    """The parent's adapter folder when the run starts from a LoRA/QLoRA run, else None."""
    if not spec.model.from_run:
        return None
    parent = _parent(spec)
    return parent.adapter_dir if parent.result_dir() == parent.adapter_dir else None


def reference(spec: RunSpec, model):
    """DPO's frozen reference for a full run: a copy of the starting weights (see the module docstring).
    LoRA/QLoRA and ORPO need none."""
    if spec.model.stage != "dpo" or spec.model.method != "full":
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


# -- data --------------------------------------------------------------------------------------
def trl_rows(rows: list[dict], system_prompt: str | None):
    """Stored preference rows as TRL's conversational dataset (``prompt``, ``chosen``, ``rejected``)."""
    from datasets import Dataset

    from . import template

    if rows and "rejected" not in rows[0]:
        raise ConfigError("a preference stage needs preference data: prompt, chosen and rejected (format preference)")
    return Dataset.from_list([{"prompt": template.with_system(r["messages"][:-1], system_prompt),
                               "chosen": [r["messages"][-1]],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


# -- the trainer -------------------------------------------------------------------------------
def trainer(spec: RunSpec, model, ref_model, tokenizer, train_ds, val_ds, args: dict, callbacks: list):
    """TRL's trainer for the stage, with the studio's training arguments ``args``."""
    import torch

    t = spec.train
    common = dict(args, beta=t.beta, max_length=spec.data.max_length)
    if spec.model.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, loss_type=list(t.loss_type), loss_weights=t.loss_weights)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train_ds,
                             eval_dataset=val_ds, processing_class=tokenizer, callbacks=callbacks)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=train_ds, eval_dataset=val_ds,
                              processing_class=tokenizer, callbacks=callbacks)
    if trainer.args.use_cpu or not torch.cuda.is_available():
        # TRL casts a 4-bit model's adapter to bf16 (the QLoRA paper's advice on GPUs); a CPU computes in fp32
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return trainer


def logged_metrics(logs: dict) -> dict:
    """The preference metrics TRL logs (``rewards/chosen``, ``rewards/margins``...), train and eval."""
    return {k: v for k, v in logs.items() if k.removeprefix("eval_").startswith(TRL_METRICS)}


# -- measuring ---------------------------------------------------------------------------------
def score_pairs(model, tokenizer, rows: list[dict], system_prompt: str | None) -> dict:
    """Held-out preference of ``model``: per pair, log p(chosen) - log p(rejected) summed over the
    answer tokens (as the run renders them); ``accuracy``: the share of pairs above 0, ``margin``:
    their mean."""
    import torch

    from . import data, template

    margins = []
    model.eval()
    for row in rows:
        logps = []
        for conversation in (row["messages"], data.rejected_conversation(row)):
            e = template.encode(tokenizer, conversation, system_prompt)
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            with torch.no_grad():
                logits = model(input_ids=ids.to(model.device)).logits[0, :-1].float().cpu()
            targets = labels[0, 1:]
            keep = targets != template.IGNORE_INDEX
            logps.append(torch.log_softmax(logits[keep], -1).gather(-1, targets[keep, None]).sum().item())
        margins.append(logps[0] - logps[1])
    return {"pairs": len(margins), "accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
            "margin": sum(margins) / max(len(margins), 1)}
