"""The one training entry point: ``train(spec, run_dir)`` turns a RunSpec into a run folder.

Flow (each step is a function below, in this order):

1. ``_start``: write ``config.yaml`` and ``status.json`` (state ``running``); on resume, find the
   newest *complete* checkpoint and drop metric lines past it.
2. ``_setup_data``: read and normalise the data (``backend.data``), split train/val with the run's
   seed, add ``augment_k`` paraphrases of each training prompt (``backend.augment``; marked
   ``augmented_from``), mix in general data against forgetting (``mix_data``/``mix_ratio``: by
   default the base model's own answers to shipped prompts, ``backend.replay``; marked
   ``mixed_from``), and save the split actually used to ``data/`` (a resumed run reads it back from there). Each conversation is
   rendered with the run's chat template and system prompt and tokenized with labels on the
   assistant turns only (``backend.template.encode``); raw-text documents are continued
   pretraining instead: no template, packed into blocks of ``max_length`` with every token learned
   (``backend.data.text_blocks``).
3. ``_setup_model``: load the base for the method (``backend.models.load_base``: 4-bit NF4 for
   qlora, 16-bit for lora, fp32 master weights for full; fp32 compute on CPU) and, for qlora/lora,
   wrap it with a peft LoRA adapter. This is the only place the method matters. Attention on
   packed rows runs per example (``backend.attention``). Full fine-tuning
   with ``ewc_lambda`` also estimates the Fisher diagonal on general data (``backend.ewc``).
   A run with ``from_run`` starts from that run's result (``backend.preference.start_point``).
   With ``mix_kl``, the base model's next-token distributions on the mixed rows are computed once,
   before the first step (``backend.anchor``), for the KL term.
4. ``_trainer``: stages ``dpo`` and ``orpo`` train with TRL's trainers instead, on the same
   arguments and callbacks (``backend.preference``); stage ``sft``: a transformers ``Trainer`` with padding-free packing
   (``DataCollatorWithFlattening``: a batch is one row of concatenated examples whose
   ``position_ids`` restart per example, so attention never crosses examples and no token is
   padding), warmup + cosine, gradient clipping, accumulation, checkpoints every ``save_steps``
   (or epoch) keeping ``save_total_limit``, evaluation on the validation split. ``RunCallback``
   appends ``metrics.jsonl`` (loss, lr, tokens/s, eval loss, elapsed, ETA, peak memory), keeps
   ``status.json`` current, prints a progress line with the ETA, and marks checkpoints complete.
   With ``early_stopping_patience`` the Trainer stops when eval loss stops improving and keeps the
   best checkpoint; AdaLoRA runs get ``AdaLoraCallback``, which reallocates ranks each step.
5. ``trainer.train(resume_from_checkpoint=...)``, then save the result: ``adapter/`` (peft,
   safetensors) or ``model/`` plus the tokenizer, and mark the run ``completed``. A failure marks
   it ``failed`` with the error; SIGTERM/Ctrl-C mark it ``cancelled``.
6. ``_measure_forgetting`` (``measure_forgetting``): the shipped general questions asked greedily
   of base and result, "kept k of n" in ``forgetting.json`` and the status.
7. ``_advise`` (``advise_checkpoints``): every kept checkpoint scored (eval loss, learned F1 on
   validation prompts, kept k of n) and one recommended in the status (``backend.advisor``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, set_seed

from . import data as data_mod
from . import memory, models, preference, template, trackers
from .attention import use_packed_attention
from .config import RunSpec
from .runs import COMPLETE_MARK, RunFolder, format_duration

log = logging.getLogger(__name__)


def train(spec: RunSpec, run_dir: str | Path, resume: bool = False, load_base=None) -> RunFolder:
    """Train ``spec`` into ``run_dir``; returns the finished run folder. ``load_base``: how the base
    model is loaded (default ``models.load_base``; the bench passes one that counts tokens)."""
    run = RunFolder(run_dir) if _is_main_process() else _Replica(run_dir)
    spec = preference.start_point(spec)  # from_run: its base model and LoRA settings, recorded in config.yaml
    checkpoint = _start(run, spec, resume)
    _handle_sigterm()
    try:
        trackers.check(spec.train.report_to)  # before minutes of data and model loading
        tokenizer = template.setup_chat_template(
            models.load_tokenizer(models.resolve_model(spec.model.model), spec.model.trust_remote_code),
            spec.model.chat_template,
        )
        train_ds, val_ds, summary = _setup_data(run, spec, tokenizer, reuse=checkpoint is not None)
        set_seed(spec.train.seed)  # LoRA's initial weights come from this generator
        model, precision = _setup_model(spec, _total_steps(spec, len(train_ds)), load_base or models.load_base)
        spec, optim_notice = _optimizer_for_device(spec, precision.device)
        notices = summary.get("notes", []) + [n for n in (precision.notice, optim_notice) if n]
        for n in notices:
            print(f"notice: {n}", flush=True)
        run.add_notices(notices)
        run.set_status("running", device=precision.device,
                       train_rows=len(train_ds), val_rows=len(val_ds) if val_ds else 0)
        if preference.is_preference(spec):
            trainer = preference.trainer(spec, model, preference.reference(spec, model), tokenizer, train_ds, val_ds,
                                         _training_args(run, spec, val_ds, precision), [RunCallback(run)])
            _quiet_printer(trainer)
        else:
            mix_kl = spec.train.mix_kl if spec.data.mix_data and spec.data.mix_ratio else 0.0
            anchors = _anchor_targets(model, train_ds) if mix_kl else None
            trainer = _trainer(run, spec, model, tokenizer, train_ds, val_ds, precision, anchors)
            trainer.ewc = _setup_ewc(spec, model, tokenizer)
            trainer.mix_kl, trainer.mix_ce = mix_kl, spec.train.mix_ce
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        _record_best(run, trainer)
        _save_result(run, spec, trainer, tokenizer)
        if trainer.args.should_save:
            _drop_stale_optimizer_states(run)
        del trainer, model  # free the memory before the forgetting meter loads the result
    except KeyboardInterrupt:
        run.set_status("cancelled", ended_at=time.time(), error="cancelled by the user")
        raise
    except BaseException as exc:
        run.set_status("failed", ended_at=time.time(), error=f"{type(exc).__name__}: {exc}")
        raise
    run.set_status("completed", ended_at=time.time(), result=run.result_dir().name)
    if spec.train.measure_forgetting and _is_main_process():
        result = _measure_forgetting(run)
        if spec.train.advise_checkpoints and result is not None:
            _advise(run, result)
    return run


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # set by `accelerate launch` for each process


class _Replica(RunFolder):
    """The run folder as a process other than the main one sees it (``accelerate launch``): it reads
    checkpoints and the saved split; only the main process writes config, status and data."""

    def write_config(self, spec) -> None:
        pass

    def truncate_metrics(self, after_step: int) -> None:
        pass

    def set_status(self, state=None, **fields) -> dict:
        return self.status()

    def add_notices(self, notices) -> dict:
        return self.status()


# -- 1. start -----------------------------------------------------------------------------------
def _start(run: RunFolder, spec: RunSpec, resume: bool) -> Path | None:
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        log.info("no complete checkpoint in %s: starting from the beginning", run.path)
    if checkpoint is not None:
        step = int(checkpoint.name.rsplit("-", 1)[1])
        run.truncate_metrics(after_step=step)
        print(f"resuming from {checkpoint.name}", flush=True)
    elif not isinstance(run, _Replica):  # a fresh start: nothing of an earlier attempt may be resumed or plotted
        run.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
    run.write_config(spec)
    now = time.time()
    run.set_status("running", started_at=run.status().get("started_at") if checkpoint else now,
                   resumed_at=now if checkpoint else None, ended_at=None, error=None,
                   method=spec.model.method, resumed_from=checkpoint.name if checkpoint else None,
                   checkpoints=None, recommended=None, recommended_reason=None)  # the advisor measures anew
    return checkpoint


def _handle_sigterm() -> None:
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:
        pass  # not the main thread (e.g. called inside a test worker): keep the default


# -- 2. data ------------------------------------------------------------------------------------
def _setup_data(run: RunFolder, spec: RunSpec, tokenizer, reuse: bool):
    d = spec.data
    if reuse and (run.data_dir / "train.jsonl").exists():
        train_rows, val_rows = data_mod.load_split(run.data_dir, rows=True)
        summary = {"reused": True}
    else:
        if not d.data:
            raise data_mod.DataError("no training data: set `data` (a file, folder or hub:ORG/NAME)")
        prepared = data_mod.prepare(d.data, fmt=d.format, mapping=d.mapping or None, tokenizer=tokenizer,
                                    max_length=d.max_length, system_prompt=d.system_prompt,
                                    val_size=d.val_size, seed=spec.train.seed)
        if not preference.is_preference(spec):
            _augment_and_mix(run, spec, tokenizer, prepared)
        elif d.mix_data and d.mix_ratio:  # replay rows are answers to learn, not pairs to prefer
            prepared.summary["notes"].append(f"stage {spec.model.stage}: mix_data is not mixed into preference "
                                             "pairs; beta keeps the model near its start")
        if not isinstance(run, _Replica):
            data_mod.save_split(prepared, run.data_dir)
        train_rows, val_rows, summary = prepared.train, prepared.val, prepared.summary
    if preference.is_preference(spec):  # TRL renders and tokenizes the pairs itself, with the same template
        return (preference.trl_rows(train_rows, d.system_prompt),
                preference.trl_rows(val_rows, d.system_prompt) if val_rows else None, summary)
    train_ds = _tokenize(tokenizer, train_rows, d)
    val_ds = _tokenize(tokenizer, val_rows, d) if val_rows else None
    return train_ds, val_ds, summary


def _augment_and_mix(run, spec: RunSpec, tokenizer, prepared) -> None:
    """SFT: add ``augment_k`` paraphrases, then mix general rows in (``mix_data``/``mix_ratio``)."""
    d = spec.data
    if d.augment_k > 0:
        added = _augment(spec, prepared.train)
        prepared.train = prepared.train + added
        prepared.summary["notes"].append(f"augmentation: {len(added)} paraphrased rows added to "
                                         f"{len(prepared.train) - len(added)} training rows (marked augmented_from)")
    if d.mix_data and d.mix_ratio > 0:
        general = _general_rows(run, spec, tokenizer, round(d.mix_ratio * len(prepared.train)))
        prepared.train = prepared.train + general
        print(f"mixed {len(general)} general rows from {d.mix_data} into "
              f"{len(prepared.train) - len(general)} training rows", flush=True)
    else:
        print("notice: mix_data is off: no general data mixed in against forgetting", flush=True)


def _augment(spec: RunSpec, rows: list) -> list[dict]:
    """``augment_k`` paraphrases of each training prompt by an instruct model (``backend.augment``),
    the answers kept; the paraphraser is freed before the model to train is loaded."""
    import gc

    from . import augment

    d = spec.data
    t0 = time.time()
    paraphraser, tokenizer = augment.load_paraphraser(d.augment_model or spec.model.model, spec.model.trust_remote_code)
    try:
        added = augment.paraphrase_prompts(
            paraphraser, tokenizer, rows, k=d.augment_k, seed=spec.train.seed,
            progress=lambda done, total: print(f"augment: {done}/{total} prompts paraphrased", flush=True))
    finally:
        del paraphraser
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    s = augment.stats(added, rows)
    print(f"augment: kept {s['augmented']} paraphrases for {s['rows_with_paraphrases']} of {s['originals']} "
          f"prompts ({d.augment_k} asked each) in {time.time() - t0:.0f}s", flush=True)
    return added


def _general_rows(run, spec: RunSpec, tokenizer, n: int) -> list[dict]:
    """``n`` rows of general data marked ``mixed_from``: the base model's own answers to the shipped
    prompts (``mix_data: replay``; the one-time cost of answering them goes to the status), or rows
    of a file sampled with the run's seed."""
    from . import replay

    if spec.data.mix_data == replay.NAME:
        rows, cost = replay.rows(spec, n, tokenizer)
        print(f"replay: {cost['rows']} rows; {cost['answered']} prompts answered by the base model now "
              f"(once per model, then cached) in {cost['seconds']:.0f}s", flush=True)
        run.set_status(replay=cost)  # a _Replica writes nothing
        return rows
    general = data_mod.prepare(spec.data.mix_data, val_size=0, seed=spec.train.seed).train
    sample = random.Random(spec.train.seed).sample(general, min(len(general), n))
    return [{"messages": c, "mixed_from": spec.data.mix_data} for c in sample]


def _tokenize(tokenizer, rows, d):
    """Raw-text documents packed into blocks (``data.text_blocks``); chat rows encoded one per example
    with the run's template. Every example carries its ``position_ids`` (the collator keeps them)."""
    from datasets import Dataset

    conversations = data_mod.conversations_of(rows)
    documents = [c[0]["content"] for c in conversations if data_mod.is_document(c)]
    examples = [{**b, "mixed": 0} for b in data_mod.text_blocks(tokenizer, documents, d.max_length)] if documents else []
    chats = [(r, c) for r, c in zip(rows, conversations) if not data_mod.is_document(c)]
    encoded = data_mod.encode_all(tokenizer, [c for _, c in chats], d.system_prompt, d.max_length)
    for e, (row, _) in zip(encoded, chats):
        if isinstance(row, dict) and row.get("cut"):  # an answer cut at a token limit: do not learn to stop there
            last = max(i for i, label in enumerate(e["labels"]) if label != template.IGNORE_INDEX)
            e["labels"][last] = template.IGNORE_INDEX
        examples.append({"input_ids": e["input_ids"], "labels": e["labels"],
                         "position_ids": list(range(len(e["input_ids"]))),
                         "mixed": int(isinstance(row, dict) and bool(row.get("mixed_from")))})
    return Dataset.from_list(examples)


# -- 3. model -----------------------------------------------------------------------------------
def _total_steps(spec: RunSpec, n_rows: int) -> int:
    """Optimizer steps the run will take (AdaLoRA's schedule needs it before the Trainer exists)."""
    t = spec.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = max(math.ceil(n_rows / t.per_device_train_batch_size) // (t.gradient_accumulation_steps or 1), 1)
    return max(math.ceil(per_epoch * t.num_train_epochs), 1)


def _setup_model(spec: RunSpec, total_steps: int = 1, load_base=None):
    model, precision = (load_base or models.load_base)(
        models.resolve_model(spec.model.model), spec.model.method, spec.model.trust_remote_code
    )
    use_packed_attention(model)  # packed rows: attention per example, not over a block-diagonal mask
    adapter = preference.start_adapter(spec)  # from_run with a LoRA/QLoRA result
    if spec.model.method == "full":
        if adapter is not None:  # a full run from an adapter run: its start is base + adapter, merged
            model = models.load_adapter(model, adapter).merge_and_unload()
        return model, precision
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lo = spec.lora
    if spec.model.method == "qlora":
        _keep_4bit_training_layout(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.train.gradient_checkpointing
        )
    if adapter is not None:  # go on training the parent's adapter (TRL keeps a frozen copy as DPO's reference)
        return models.load_adapter(model, adapter, trainable=True), precision
    common = dict(lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout, target_modules=lo.target_modules,
                  bias=lo.bias, modules_to_save=lo.modules_to_save, task_type="CAUSAL_LM")
    if lo.use_adalora:
        from peft import AdaLoraConfig

        def steps(v):  # a share of all steps when < 1
            return int(v * total_steps) if v < 1 else int(v)

        tinit, tfinal = steps(lo.tinit), steps(lo.tfinal)
        if tinit + tfinal >= total_steps:
            raise ValueError(f"AdaLoRA needs steps to reallocate in: tinit {tinit} + tfinal {tfinal} "
                             f">= {total_steps} total steps (lower them or train longer)")
        config = AdaLoraConfig(init_r=lo.init_r, target_r=lo.target_r, tinit=tinit, tfinal=tfinal,
                               deltaT=lo.deltaT, total_step=total_steps, **common)
    else:
        config = LoraConfig(r=lo.r, use_dora=lo.use_dora, use_rslora=lo.use_rslora, rank_pattern=lo.rank_pattern,
                            alpha_pattern=lo.alpha_pattern, target_parameters=lo.target_parameters, **common)
    return get_peft_model(model, config), precision


def _keep_4bit_training_layout(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its CPU inference kernel on the first
    forward in eval mode without gradients, on CPUs with AVX512-BF16, and keeps them so. A model in
    training meets such forwards (the Trainer's evaluation, the KL anchors), and its gradients after
    one are wrong (tests/test_train.py); the layers of a model being trained never repack."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _optimizer_for_device(spec: RunSpec, device: str) -> tuple[RunSpec, str | None]:
    """bitsandbytes' 8-bit and paged optimizers need CUDA: on CPU the run uses AdamW, and says so."""
    import dataclasses

    optim = spec.train.optim
    if device == "cuda" or not any(k in optim for k in ("8bit", "paged", "bnb")):
        return spec, None
    train = dataclasses.replace(spec.train, optim="adamw_torch")
    return dataclasses.replace(spec, train=train), f"CPU: optim {optim} needs CUDA; using adamw_torch"


def _anchor_targets(model, train_ds) -> list:
    """The ``mix_kl`` term's targets (``backend.anchor``): the base model's next-token distributions
    on the mixed rows, computed once before the first step (the model has not moved from the base yet)."""
    from . import anchor

    t0 = time.time()
    found = anchor.targets(model, train_ds)
    rows = [t for t in found if t is not None]
    print(f"KL anchor: the base model's top-{anchor.K} next tokens at {sum(len(t[0]) for t in rows)} learned "
          f"tokens of {len(rows)} mixed rows, computed once in {time.time() - t0:.0f}s", flush=True)
    return found


def _setup_ewc(spec: RunSpec, model, tokenizer):
    """Full fine-tuning with ``ewc_lambda``: the Fisher diagonal on ``ewc_samples`` general rows."""
    from . import ewc as ewc_mod
    from . import replay

    if not ewc_mod.active(spec):
        if spec.model.method == "full" and spec.train.ewc_lambda:  # e.g. the full preset's, replay turned off
            print("notice: ewc_lambda is set but mix_data is off: EWC weighs weights by general data, so it is off too",
                  flush=True)
        return None

    if spec.data.mix_data == replay.NAME:
        sample = data_mod.conversations_of(replay.rows(spec, spec.train.ewc_samples, tokenizer)[0])
    else:
        general = data_mod.prepare(spec.data.mix_data, val_size=0, seed=spec.train.seed).train
        sample = random.Random(spec.train.seed + 1).sample(general, min(spec.train.ewc_samples, len(general)))
    rows = data_mod.encode_all(tokenizer, sample, spec.data.system_prompt, spec.data.max_length)
    t0 = time.time()
    ewc = ewc_mod.EWC(model, rows, spec.train.ewc_lambda)
    print(f"EWC: Fisher diagonal from {len(rows)} general rows in {time.time() - t0:.0f}s", flush=True)
    return ewc


# -- 4. trainer ---------------------------------------------------------------------------------
def _training_args(run, spec, val_ds, precision) -> dict:
    """The Trainer's arguments from the spec (TrainingArguments' keys; TRL's configs take them too)."""
    t = spec.train
    trackers.setup(t.report_to)
    early_stop = bool(t.early_stopping_patience) and val_ds is not None
    return dict(
        output_dir=str(run.checkpoints_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        activation_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy=("steps" if t.eval_steps else "epoch") if val_ds is not None else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if (t.save_steps or early_stop and t.eval_steps) else "epoch",
        save_steps=(t.eval_steps if early_stop and t.eval_steps else t.save_steps) or 500,
        load_best_model_at_end=early_stop,  # the best checkpoint becomes the result
        metric_for_best_model="eval_loss" if early_stop else None,
        greater_is_better=False if early_stop else None,
        save_total_limit=t.save_total_limit,
        bf16=precision.mixed == "bf16",
        fp16=precision.mixed == "fp16",
        use_cpu=precision.device == "cpu",
        include_num_input_tokens_seen="non_padding",
        report_to=t.report_to or "none",
        run_name=run.path.name,
        project=trackers.PROJECT,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _quiet_printer(trainer) -> None:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # RunCallback prints one readable line per log


def _trainer(run, spec, model, tokenizer, train_ds, val_ds, precision, anchors=None):
    from transformers import TrainingArguments

    t = spec.train
    early_stop = bool(t.early_stopping_patience) and val_ds is not None
    args = TrainingArguments(**_training_args(run, spec, val_ds, precision))
    if anchors is not None:  # each example names its row of the anchors table
        train_ds = train_ds.add_column("index", list(range(len(train_ds))))
    trainer = StudioTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=_Collator(anchors), processing_class=tokenizer,
        callbacks=[RunCallback(run)],
    )
    if early_stop:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    if spec.lora.use_adalora and spec.model.method != "full":
        trainer.adalora = True
        trainer.add_callback(AdaLoraCallback())
    _quiet_printer(trainer)
    trackers.place_tensorboard(trainer, run.path)
    return trainer


class _Collator(DataCollatorWithFlattening):
    """Packs a batch into one row (``DataCollatorWithFlattening``), with each example's own
    ``position_ids`` (a raw-text block restarts them where a document starts, so attention stays
    inside each document; the library's restart only per example), and adds ``mixed``: 1 on every
    token of a mixed-in general row, so the loss knows where the ``mix_kl`` term applies. With
    ``anchors`` (``backend.anchor.targets``, one entry per example of the dataset, which then carries
    an ``index`` column), also the mixed rows' ``anchor_ids``/``anchor_logp`` in packed order."""

    def __init__(self, anchors: list | None = None, **kwargs):
        super().__init__(**kwargs)
        self.anchors = anchors

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        if all("position_ids" in f for f in features):
            batch["position_ids"] = torch.tensor([[p for f in features for p in f["position_ids"]]])
        flags = [f.get("mixed", 0) for f in features if len(f["input_ids"]) for _ in f["input_ids"]]
        batch["mixed"] = torch.tensor([flags], dtype=torch.bool)
        found = [self.anchors[f["index"]] for f in features if "index" in f] if self.anchors is not None else []
        found = [a for a in found if a is not None]
        if found:
            batch["anchor_ids"] = torch.cat([ids for ids, _ in found])
            batch["anchor_logp"] = torch.cat([logp for _, logp in found])
        return batch


class StudioTrainer(Trainer):
    """The Trainer with these changes.

    * The loss projects onto the vocabulary only where a token is learned (``logits_to_keep``):
      prompt tokens need no logits, which saves the largest matmul and its memory for them. The
      value equals the model's own causal-LM loss (tested), normalised the same way.
    * AdaLoRA runs add the orthogonality regulariser peft adds only to a loss made from ``labels``.
    * With EWC (``ewc``), the penalty for moving weights general data relies on joins the loss.
    * ``mix_ce`` weights the cross-entropy on mixed-in general rows' answer tokens (0: they only
      anchor the KL term); evaluation weighs every token alike.
    * With ``mix_kl``, the answer tokens of mixed-in general rows add ``mix_kl * KL(base || tuned)``
      of the next-token distributions (normalised like the cross-entropy); the base's side comes
      with the batch (``anchor_ids``/``anchor_logp``, computed before training: ``backend.anchor``).
    * Evaluation leaves the random generators as it found them, so a run resumed from a checkpoint
      draws the same dropout masks as one that never stopped (creating the eval dataloader would
      otherwise consume a draw that the resumed run, which skips that evaluation, never makes).
    """

    ewc = None  # an ewc.EWC whose penalty joins the training loss (full fine-tuning, ewc_lambda > 0)
    mix_kl = 0.0  # weight of the KL term on mixed general rows
    mix_ce = 1.0  # weight of the cross-entropy on mixed general rows' answers (the rest: 1)
    adalora = False  # add AdaLoRA's orthogonality regulariser

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = inputs.pop("labels")[:, 1:]
        mixed = inputs.pop("mixed", None)
        anchor_ids, anchor_logp = inputs.pop("anchor_ids", None), inputs.pop("anchor_logp", None)
        keep = (targets != template.IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        outputs = model(**inputs, logits_to_keep=keep)
        targets = targets[:, keep]
        if self.mix_ce != 1 and model.training and mixed is not None:  # mixed rows' answers weighted by mix_ce
            per_token = torch.nn.functional.cross_entropy(
                outputs.logits.float().flatten(0, 1), targets.flatten(),
                ignore_index=template.IGNORE_INDEX, reduction="none",
            ).view_as(targets)
            loss = torch.where(mixed[:, 1:][:, keep], per_token * self.mix_ce, per_token).sum()
        else:
            loss = torch.nn.functional.cross_entropy(
                outputs.logits.float().flatten(0, 1), targets.flatten(),
                ignore_index=template.IGNORE_INDEX, reduction="sum",
            )
        if self.mix_kl and model.training and anchor_ids is not None:
            loss = loss + self.mix_kl * _kl_to_base(outputs.logits, keep, mixed, anchor_ids, anchor_logp)
        if num_items_in_batch is None:  # a mean over this batch; training_step divides by accumulation
            loss, self.loss_is_scaled_for_ga = loss / (targets != template.IGNORE_INDEX).sum(), False
        else:  # normalised over the whole accumulated batch, as the model's own loss would be
            loss, self.loss_is_scaled_for_ga = loss / num_items_in_batch, True
            if self.args.average_tokens_across_devices:  # that count covers every process; DDP then averages
                loss = loss * self.accelerator.num_processes  # the gradients (as Trainer.compute_loss does)
        if self.adalora and model.training:
            loss = loss + _adalora_orthogonality(self.model)  # what AdaLoraModel adds when given labels
        if self.ewc is not None and model.training:  # once per update, however many micro-batches
            loss = loss + self.ewc.penalty() / (self.args.gradient_accumulation_steps if self.loss_is_scaled_for_ga else 1)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        with torch.random.fork_rng():
            return super().evaluate(*args, **kwargs)


def _kl_to_base(logits, keep, mixed, anchor_ids, anchor_logp) -> torch.Tensor:
    """Summed KL(base || tuned) over the learned tokens of mixed rows (``mixed``: 1 on every token of
    a mixed row; ``keep``: the positions ``logits`` were computed at), against the base's top tokens
    at those positions in packed order (``backend.anchor.kl``)."""
    where = mixed[0][1:][keep]  # kept logit positions whose next token belongs to a mixed row
    if int(where.sum()) != len(anchor_ids):
        raise RuntimeError(f"KL anchor: {len(anchor_ids)} base distributions for {int(where.sum())} mixed-row tokens")
    from .anchor import kl

    return kl(logits[0, where], anchor_ids, anchor_logp)


def _adalora_orthogonality(model) -> torch.Tensor:
    """AdaLoRA's regulariser keeping P and Q orthogonal, ``orth_reg_weight * mean ||PᵀP - I||_F``
    over its matrices (peft adds it only to a loss computed from ``labels``, which we do not pass)."""
    config = model.peft_config["default"]
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    return config.orth_reg_weight * torch.stack(terms).mean() if terms else torch.zeros(())


class AdaLoraCallback(TrainerCallback):
    """Reallocates AdaLoRA's ranks after each optimizer step, while the gradients still exist.
    The Trainer never calls ``update_and_allocate`` itself: without this AdaLoRA is plain LoRA."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class RunCallback(TrainerCallback):
    """Keeps the run folder current: metrics.jsonl, status.json, complete checkpoints."""

    def __init__(self, run: RunFolder):
        self.run = run

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # several processes (accelerate launch): rank 0 writes the folder
            return
        self.t0, self.step0, self.tokens0 = time.time(), state.global_step, state.num_input_tokens_seen
        self.last = (self.t0, state.num_input_tokens_seen)
        self.elapsed_before = self.run.status().get("elapsed_s", 0.0) if state.global_step else 0.0
        self.run.set_status(step=state.global_step, total_steps=state.max_steps, world_size=args.world_size)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        now = time.time()
        elapsed = self.elapsed_before + now - self.t0
        done = max(state.global_step - self.step0, 1)
        eta = (now - self.t0) / done * (state.max_steps - state.global_step)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.last[1]
            tps = tokens / max(now - self.last[0], 1e-9)
            self.last = (now, state.num_input_tokens_seen)
            record.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                          grad_norm=logs.get("grad_norm"), tokens_per_second=round(tps, 1))
        elif "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
        else:
            return
        record.update(preference.logged_metrics(logs))  # DPO/ORPO: rewards/chosen, rewards/margins, ...
        record.update(elapsed_s=round(elapsed, 2), eta_s=round(eta, 1),
                      memory_mb=round(memory.peak_memory_mb(), 1))
        self.run.append_metrics(record)
        average = (state.num_input_tokens_seen - self.tokens0) / max(now - self.t0, 1e-9)
        latest = {"tokens_per_second": record.get("tokens_per_second"), "last_loss": record.get("loss"),
                  "last_eval_loss": record.get("eval_loss")}
        self.run.set_status(step=state.global_step, total_steps=state.max_steps, elapsed_s=elapsed, eta_s=eta,
                            average_tokens_per_second=round(average, 1), peak_memory_mb=record["memory_mb"],
                            **{k: v for k, v in latest.items() if v is not None})
        print(_progress_line(record, state.max_steps), flush=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.exists():
            (folder / COMPLETE_MARK).write_text(str(time.time()))


def _progress_line(r: dict, total: int) -> str:
    pct = 100 * r["step"] / max(total, 1)
    if "eval_loss" in r:
        return f"step {r['step']}/{total} ({pct:.0f}%)  eval_loss {r['eval_loss']:.4f}"
    return (f"step {r['step']}/{total} ({pct:.0f}%)  loss {r['loss']:.4f}  lr {r['learning_rate']:.2e}  "
            f"{r['tokens_per_second']:.0f} tok/s  elapsed {format_duration(r['elapsed_s'])}  "
            f"eta {format_duration(r['eta_s'])}  mem {r['memory_mb']:.0f} MB")


# -- 5. result ----------------------------------------------------------------------------------
def _record_best(run: RunFolder, trainer) -> None:
    """With early stopping: which checkpoint became the result, and whether training stopped early."""
    state = trainer.state
    if not trainer.args.load_best_model_at_end or not state.best_model_checkpoint:
        return
    best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    stopped = state.global_step < state.max_steps
    run.set_status(best_step=best_step, best_eval_loss=state.best_metric, stopped_early=stopped)
    print(f"{'stopped early at' if stopped else 'finished at'} step {state.global_step}; "
          f"result: the best checkpoint (step {best_step}, eval_loss {state.best_metric:.4f})", flush=True)

def _save_result(run: RunFolder, spec: RunSpec, trainer, tokenizer) -> None:
    """``adapter/`` or ``model/`` with the tokenizer; ``save_model`` gathers FSDP/ZeRO-3 shards and
    writes on the main process only."""
    target = run.model_dir if spec.model.method == "full" else run.adapter_dir
    trainer.save_model(str(target))
    if trainer.args.should_save:
        (target / "training_args.bin").unlink(missing_ok=True)  # already in config.yaml
        shutil.rmtree(target / "ref", ignore_errors=True)  # TRL's frozen copy of the start (DPO's reference)
        tokenizer.save_pretrained(target)


def _drop_stale_optimizer_states(run: RunFolder) -> None:
    """Once training is over, only the latest checkpoint's optimizer state can be resumed from; the
    earlier checkpoints stay for their weights (the advisor, the Playground, export). Full fine-tuning
    of the embedded model keeps ~1 GB of AdamW state per checkpoint."""
    for checkpoint in run.checkpoints()[:-1]:
        (checkpoint / "optimizer.pt").unlink(missing_ok=True)


def _measure_forgetting(run: RunFolder) -> dict | None:
    """The forgetting meter on the result (``backend.forgetting``): kept k of n general answers.
    A failure leaves a notice; the run stays completed."""
    from . import forgetting, playground

    t0 = time.time()
    run.set_status(forgetting="measuring")  # the Runs view says so; the result is usable meanwhile
    try:
        loaded = playground.load_run(run.path, "result")
        result = forgetting.meter(loaded, run.path)
    except Exception as exc:  # noqa: BLE001 - the trained result is fine either way
        log.warning("forgetting meter failed: %s", exc)
        run.add_notices([f"forgetting meter failed: {type(exc).__name__}: {exc}"])
        run.set_status(forgetting="failed")
        return None
    run.set_status(forgetting="measured", forgetting_kept=result["kept"], forgetting_n=result["n"])
    print(f"forgetting: {forgetting.summary(result)} ({time.time() - t0:.0f}s)", flush=True)
    return result


def _advise(run: RunFolder, result: dict) -> None:
    """The checkpoint advisor (``backend.advisor``): each checkpoint's eval loss, learned F1 and kept
    k of n, and the recommended one, in the status. A failure leaves a notice; the run stays completed."""
    from . import advisor

    try:
        record = advisor.advise(run.path, result)
    except Exception as exc:  # noqa: BLE001 - the trained result is fine either way
        log.warning("checkpoint advisor failed: %s", exc)
        run.add_notices([f"checkpoint advisor failed: {type(exc).__name__}: {exc}"])
        return
    print(f"checkpoints: {len(record['checkpoints'])} measured in {record['advisor_seconds']:.0f}s; "
          f"recommended: {record['recommended']}: {record['recommended_reason']}", flush=True)
