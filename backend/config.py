"""The run specification: what to train, on what, how. One YAML file per run (``config.yaml``).

Keys are named as the libraries name them (peft's ``r``/``lora_alpha``, transformers'
``learning_rate``/``num_train_epochs``), so ``--set KEY=VALUE`` and presets use flat keys and
every key lives in exactly one section. Fields left ``None`` take the method's default from
``METHOD_DEFAULTS`` when the spec is resolved; ``config.yaml`` always holds resolved values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

# Fixed choices, each the one source for the form, the CLI and validation. The scheduler and
# optimizer names are transformers' own (SchedulerType, OptimizerNames; tests/test_config.py keeps
# these lists inside them); importing them here would cost every CLI call transformers' import.
Method = Literal["qlora", "lora", "full"]
Stage = Literal["sft", "dpo", "orpo"]
Format = Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "text", "preference"]
# TRL's DPOConfig.loss_type names (the pairwise ones, and sft: the chosen answers' NLL, RPO when combined)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sft")
Bias = Literal["none", "all", "lora_only"]
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay"]
Tracker = Literal["tensorboard", "trackio", "wandb", "mlflow"]  # transformers' report_to names
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_bnb_8bit",
                    "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit",
                    "lion_32bit", "ademamix", "schedule_free_adamw"]
METHODS = get_args(Method)
STAGES = get_args(Stage)
FORMATS = get_args(Format)


def _f(default, help: str, basic: bool = False, suggest: tuple = (), **kw):
    """A setting: its default and help text; ``basic`` ones are shown first in the Train tab, the
    rest under Advanced; ``suggest``: values offered beside free text."""
    metadata = {"help": help, "basic": basic, "suggest": suggest}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class ModelArgs:
    model: str | None = _f(None, "Base model: None for the embedded SmolLM2-135M-Instruct, a local folder or a hub id.",
                           basic=True)
    method: Method = _f("lora", "qlora: 4-bit base + LoRA; lora: 16-bit base + LoRA; full: every parameter.", basic=True)
    stage: Stage = _f("sft", "sft: learn the answers in the data; dpo: prefer the chosen over the rejected answer of "
                             "preference pairs, against a frozen reference (the start); orpo: both at once, no "
                             "reference (TRL's DPOTrainer / ORPOTrainer). Independent of method.", basic=True)
    from_run: str | None = _f(None, "Start from a finished run (its folder; from the web app: its run id): its adapter "
                                    "or full weights, which are also DPO's reference. None: the base model.")
    trust_remote_code: bool = _f(False, "Run the model repository's own Python code (only for models you trust).")
    chat_template: str | None = _f(None, "A Jinja chat template; None uses the model's own (or a plain one).")


@dataclass
class DataArgs:
    data: str | None = _f(None, "Training data: a local file, a save_to_disk folder or hub:ORG/NAME[:SPLIT].")
    format: Format = _f("auto", "auto, alpaca, prompt_completion, messages, sharegpt, text or preference "
                                "(prompt/chosen/rejected; stages dpo and orpo).")
    mapping: dict = _f({}, "Canonical field -> column in the file, overriding detection.")
    system_prompt: str | None = _f("You are a helpful assistant.", "System prompt for rows without one, in training and generation.")
    max_length: int = _f(1024, "Longest example in tokens; longer rows are truncated and counted. Raw text: "
                               "the block length documents are packed into (nothing truncated).")
    val_size: float = _f(0.1, "Validation share (< 1) or row count (>= 1).")
    mix_data: str | None = _f("replay", "General data mixed into training against forgetting: 'replay' (the base model's "
                                        "own answers to shipped general prompts, answered once and cached; "
                                        "backend/replay.py), a file in the same formats as data, or none.",
                                suggest=("replay", "none"))
    mix_ratio: float = _f(1.0, "Mixed rows per training row (0.5 = half as many general rows as task rows).")
    augment_k: int = _f(0, "Augmentation: paraphrase each training prompt this many times with an instruct model, "
                           "keeping the answer (0: off). Paraphrases that are empty, identical or too (dis)similar are dropped.")
    augment_model: str | None = _f(None, "The instruct model that paraphrases (None: the run's base model).")


@dataclass
class LoraArgs:
    r: int = _f(16, "LoRA rank: higher learns more and costs more memory.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.")
    target_modules: Any = _f(["q_proj", "v_proj"], "Module names to adapt, or 'all-linear'.")
    rank_pattern: dict = _f({}, "Per-module ranks: regex on the module name's end, e.g. {'self_attn.*': 32, 'mlp.*': 16}; others r.")
    alpha_pattern: dict = _f({}, "Per-module lora_alpha by name or regex, like rank_pattern.")
    use_adalora: bool = _f(False, "AdaLoRA: start every module at init_r and reallocate a total budget of "
                                  "target_r per module to where it matters most during training.")
    init_r: int = _f(12, "AdaLoRA: starting rank of every module.")
    target_r: int = _f(8, "AdaLoRA: average rank per module after reallocation.")
    tinit: float = _f(0.1, "AdaLoRA: steps before reallocation starts (a share of all steps when < 1).")
    tfinal: float = _f(0.2, "AdaLoRA: final steps with ranks fixed (a share of all steps when < 1).")
    deltaT: int = _f(1, "AdaLoRA: steps between reallocations.")
    target_parameters: list | None = _f(None, "Parameters (not modules) to adapt, e.g. fused MoE experts "
                                              "[mlp.experts.gate_up_proj, mlp.experts.down_proj].")
    bias: Bias = _f("none", "none, all or lora_only.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling lora_alpha / sqrt(r).")
    modules_to_save: list | None = _f(None, "Modules trained fully beside LoRA (e.g. [lm_head]).")


@dataclass
class TrainArgs:
    learning_rate: float | None = _f(None, "Peak learning rate (method default: 2e-4 LoRA/QLoRA, 3e-5 full; "
                                           "stage dpo: 1e-4 LoRA/QLoRA, 5e-7 full; orpo: 1e-4, 8e-6).",
                                     basic=True)
    num_train_epochs: float = _f(3.0, "Passes over the training data.", basic=True)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: int = _f(4, "Examples per step (packed without padding).", basic=True)
    gradient_accumulation_steps: int | None = _f(None, "Steps whose gradients add up before an update (full default 4).")
    weight_decay: float | None = _f(None, "AdamW weight decay (full default 0.01, LoRA 0).")
    warmup_steps: float = _f(0.03, "Linear warmup: a step count, or a share of all steps when < 1.")
    lr_scheduler_type: Scheduler = _f("cosine", "Learning-rate schedule after warmup.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    optim: Optimizer = _f("adamw_torch", "Optimizer name as transformers names it (e.g. paged_adamw_8bit on CUDA).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.")
    ewc_lambda: float = _f(0.0, "Full fine-tuning: strength of the EWC penalty pulling the weights general data "
                                "relies on (Fisher diagonal on mix_data) back to the base.")
    num_processes: int = _f(1, "Processes to train with, one per GPU (data parallel through `accelerate launch`; the "
                               "queue waits for that many free GPUs). Without a GPU: that many CPU processes (gloo). "
                               "per_device_train_batch_size is per process.")
    accelerate_config: str = _f("ddp", "How several processes share the work: ddp, fsdp, deepspeed-zero2, "
                                       "deepspeed-zero3 (presets/accelerate/) or a path to an accelerate config YAML.")
    early_stopping_patience: int = _f(0, "Stop when eval loss has not improved for this many evaluations and keep "
                                         "the best checkpoint as the result (0: off).")
    mix_kl: float = _f(3.0, "Weight of a KL penalty pulling the next-token distribution on the mixed general rows "
                            "towards the base model's (LoRA/QLoRA: the same model with the adapter off; full: a "
                            "frozen copy of the base in memory). 0: only cross-entropy on the rows' answers.")
    mix_ce: float = _f(1.0, "Weight of the cross-entropy on the mixed general rows' answers. 0: those rows only "
                            "anchor the mix_kl term (the QLoRA preset: its 4-bit base's own greedy answers are "
                            "poorer targets than its distribution; README, 'Learn the new thing, keep the old').")
    ewc_samples: int = _f(64, "Rows of general data used to estimate the Fisher diagonal for EWC.")
    measure_forgetting: bool = _f(True, "After training, ask the shipped general questions (greedy) and report how "
                                        "many answers the base got right the tuned model keeps (forgetting.json).")
    advise_checkpoints: bool = _f(True, "After the forgetting meter: score every kept checkpoint (eval loss, learned: "
                                        "token F1 of greedy answers to validation prompts, kept k of n) and "
                                        "recommend one that learned and keeps >= 90% (status.json); Playground, "
                                        "Export and the CLI use it by default.")
    report_to: list[Tracker] = _f([], "Experiment trackers the Trainer also logs to (transformers' report_to; none by "
                                      "default): tensorboard (RUN_DIR/tensorboard) and trackio (STUDIO_HOME/trackio) "
                                      "work offline; wandb needs WANDB_API_KEY in the environment; mlflow logs to "
                                      "MLFLOW_TRACKING_URI or STUDIO_HOME/mlruns. metrics.jsonl is written either way.")
    beta: float = _f(0.1, "dpo: how far the model may move from its reference (higher: less); orpo: weight of the "
                          "odds-ratio term (TRL's beta).")
    loss_type: list = _f(["sigmoid"], "dpo: TRL's loss_type, one or several added up (sigmoid is the DPO paper's; "
                                      "ipo, hinge, robust...; [sigmoid, sft] also keeps the chosen answers likely).")
    loss_weights: list | None = _f(None, "dpo: TRL's weight of each loss_type (None: 1 each).")
    seed: int = _f(42, "Seed for data order, dropout and initialisation.")
    logging_steps: int = _f(1, "Log metrics every N steps.")
    eval_steps: int = _f(0, "Evaluate every N steps (0: once per epoch).")
    save_steps: int = _f(0, "Checkpoint every N steps (0: once per epoch).")
    save_total_limit: int = _f(3, "Checkpoints kept (oldest deleted first); the checkpoint advisor scores each.")


SECTIONS = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "train": TrainArgs}

NUMERIC_KEYS = {f.name for kind in SECTIONS.values() for f in fields(kind)
                if "float" in str(f.type) or "int" in str(f.type)}

METHOD_DEFAULTS = {
    "qlora": {"learning_rate": 2e-4, "gradient_accumulation_steps": 1, "weight_decay": 0.0},
    "lora": {"learning_rate": 2e-4, "gradient_accumulation_steps": 1, "weight_decay": 0.0},
    "full": {"learning_rate": 3e-5, "gradient_accumulation_steps": 4, "weight_decay": 0.01},
}
# preference tuning moves a model that already answers: below the SFT rate (TRL's own default is 1e-6, its LoRA
# example 5e-6 over thousands of pairs). LoRA DPO runs here are mostly tens of pairs (votes: 8-30) for a few
# steps, where 2e-5 hardly moved the held-out margin and 5e-4 made the answers drift (README, measured)
STAGE_DEFAULTS = {"dpo": {"lora": 1e-4, "qlora": 1e-4, "full": 5e-7}, "orpo": {"lora": 1e-4, "qlora": 1e-4, "full": 8e-6}}


def _number(value):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: take such strings as numbers."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return value


class ConfigError(ValueError):
    """A bad key or value in a run config; the message lists every problem."""


@dataclass
class RunSpec:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    preset: str | None = None

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, values: dict, base: "RunSpec | None" = None) -> "RunSpec":
        """Apply flat keys (``r``, ``learning_rate``...) onto ``base`` (or defaults)."""
        spec = dataclasses.replace(base) if base else cls()
        sections = {name: dataclasses.replace(getattr(spec, name)) for name in SECTIONS}
        owner = {f.name: name for name, kind in SECTIONS.items() for f in fields(kind)}
        unknown = [k for k in values if k not in owner and k != "preset"]
        if unknown:
            raise ConfigError(f"unknown key(s): {', '.join(sorted(unknown))} (see `backend/config.py`)")
        for key, value in values.items():
            if key == "mix_data" and isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
                value = None  # mixing turned off
            if key == "report_to" and value in (None, "none", "", []):
                value = []  # transformers' "none"
            elif key == "report_to" and isinstance(value, str):
                value = [value]  # as TrainingArguments takes one name
            if key == "preset":
                spec.preset = value
            else:
                numeric = key in NUMERIC_KEYS
                setattr(sections[owner[key]], key, _number(value) if numeric else value)
        spec = dataclasses.replace(spec, **sections)
        spec.validate()
        return spec

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """Read a nested (config.yaml) or flat (preset) mapping."""
        flat = {}
        for key, value in (d or {}).items():
            if key in SECTIONS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls.from_flat(flat)

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc

    def to_dict(self) -> dict:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"preset": self.preset, **d}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")

    def resolved(self) -> "RunSpec":
        """Fill method-dependent defaults (left None) from ``METHOD_DEFAULTS``."""
        train = dataclasses.replace(self.train)
        if train.learning_rate is None and self.model.stage in STAGE_DEFAULTS:
            train.learning_rate = STAGE_DEFAULTS[self.model.stage][self.model.method]
        for key, value in METHOD_DEFAULTS[self.model.method].items():
            if getattr(train, key) is None:
                setattr(train, key, value)
        return dataclasses.replace(self, train=train)

    # -- checking ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Gather every problem and raise once, naming the fields."""
        problems = []
        m, d, lo, t = self.model, self.data, self.lora, self.train
        for f in settings():
            allowed = choices(f)
            value = getattr(getattr(self, f.section), f.name)
            if get_origin(f.type) is list:  # a list of choices (report_to)
                if not isinstance(value, list) or any(v not in allowed for v in value):
                    problems.append(f"{f.name} must be a list of {', '.join(allowed)}, not {value!r}")
            elif allowed and value not in allowed:
                problems.append(f"{f.name} must be one of {', '.join(allowed)}, not {value!r}")
        checks = [
            (lo.r, int, lambda v: v > 0, "r must be a positive integer"),
            (lo.lora_alpha, (int, float), lambda v: v > 0, "lora_alpha must be positive"),
            (lo.lora_dropout, (int, float), lambda v: 0 <= v < 1, "lora_dropout must be in [0, 1)"),
            (d.max_length, int, lambda v: v > 0, "max_length must be a positive integer"),
            (d.val_size, (int, float), lambda v: v >= 0, "val_size must be >= 0"),
            (d.mix_ratio, (int, float), lambda v: v >= 0, "mix_ratio must be >= 0"),
            (t.mix_kl, (int, float), lambda v: v >= 0, "mix_kl must be >= 0"),
            (t.mix_ce, (int, float), lambda v: v >= 0, "mix_ce must be >= 0"),
            (t.beta, (int, float), lambda v: v > 0, "beta must be positive"),
            (t.num_train_epochs, (int, float), lambda v: v > 0, "num_train_epochs must be positive"),
            (t.max_steps, int, lambda v: v == -1 or v > 0, "max_steps must be -1 or positive"),
            (t.per_device_train_batch_size, int, lambda v: v > 0, "per_device_train_batch_size must be positive"),
            (t.max_grad_norm, (int, float), lambda v: v >= 0, "max_grad_norm must be >= 0"),
            (t.save_total_limit, int, lambda v: v >= 1, "save_total_limit must be >= 1"),
            (t.ewc_lambda, (int, float), lambda v: v >= 0, "ewc_lambda must be >= 0"),
            (t.ewc_samples, int, lambda v: v > 0, "ewc_samples must be positive"),
            (t.early_stopping_patience, int, lambda v: v >= 0, "early_stopping_patience must be >= 0"),
            (t.num_processes, int, lambda v: v >= 1, "num_processes must be >= 1"),
            (d.augment_k, int, lambda v: 0 <= v <= 20, "augment_k must be an integer from 0 to 20"),
            (lo.init_r, int, lambda v: v > 0, "init_r must be a positive integer"),
            (lo.target_r, int, lambda v: v > 0, "target_r must be a positive integer"),
            (lo.deltaT, int, lambda v: v > 0, "deltaT must be a positive integer"),
        ]
        for value, kind, ok, message in checks:
            if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
                problems.append(f"{message} (got {value!r})")
        for name in ("learning_rate", "gradient_accumulation_steps", "weight_decay"):
            value = getattr(t, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                problems.append(f"{name} must be a non-negative number (got {value!r})")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(lo, name)
            if not isinstance(pattern, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
                problems.append(f"{name} must map module names to positive numbers (got {pattern!r})")
        if t.ewc_lambda and m.method != "full":
            problems.append("ewc_lambda applies to full fine-tuning only (LoRA keeps the base frozen already)")
        if t.early_stopping_patience and not d.val_size:
            problems.append("early_stopping_patience needs a validation split (val_size > 0)")
        if lo.use_adalora and (m.method == "full" or lo.use_dora):
            problems.append("use_adalora goes with lora or qlora, without use_dora")
        if lo.use_adalora and lo.target_r > lo.init_r:
            problems.append(f"target_r ({lo.target_r}) must not exceed init_r ({lo.init_r})")
        if lo.target_parameters and (lo.lora_dropout or lo.use_dora):
            problems.append("target_parameters (LoRA on parameters, e.g. MoE experts) needs lora_dropout 0 "
                            "and no use_dora")
        if d.augment_k and t.num_processes > 1:  # each process would sample its own paraphrases
            problems.append("augment_k with num_processes > 1: augment first (python -m backend augment --out FILE) "
                            "and train on that file")
        if not (isinstance(t.loss_type, list) and t.loss_type and set(t.loss_type) <= set(LOSS_TYPES)):
            problems.append(f"loss_type must be a list of {', '.join(LOSS_TYPES)} (got {t.loss_type!r})")
        elif t.loss_weights is not None and (not isinstance(t.loss_weights, list) or len(t.loss_weights) != len(
                t.loss_type) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in t.loss_weights)):
            problems.append(f"loss_weights must be one number per loss_type (got {t.loss_weights!r})")
        if m.stage != "sft" and (t.ewc_lambda or d.augment_k or lo.use_adalora):
            problems.append(f"stage {m.stage} goes without ewc_lambda, augment_k and use_adalora (SFT tools)")
        if m.stage == "sft" and d.format == "preference":
            problems.append("format preference goes with stage dpo or orpo")
        if d.mix_data and d.mix_ratio and not (t.mix_ce or t.mix_kl or t.ewc_lambda):
            problems.append("mix_ce and mix_kl are both 0: the mixed rows would teach nothing (set one, or mix_data=none)")
        if not (lo.target_modules == "all-linear" or isinstance(lo.target_modules, list)):
            problems.append(f"target_modules must be a list of names or 'all-linear' (got {lo.target_modules!r})")
        if problems:
            raise ConfigError("; ".join(problems))


def parse_set(items: list[str]) -> dict:
    """``["r=8", "target_modules=[q_proj,v_proj]"]`` -> ``{"r": 8, "target_modules": [...]}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: {value!r} is not a YAML value") from exc
    return out


@dataclass(frozen=True)
class Setting:
    """One field of the schema, as the form and the CLI see it."""

    name: str
    section: str        # model, data, lora or train
    type: Any           # the annotation: bool, int, float, str, Literal[...], X | None, list, dict, Any
    default: Any
    help: str
    basic: bool
    suggest: tuple = ()


def settings() -> list[Setting]:
    """Every setting in schema order: the one source the form, the CLI and the API follow."""
    out = []
    for section, kind in SECTIONS.items():
        hints = get_type_hints(kind)
        for f in fields(kind):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.append(Setting(f.name, section, hints[f.name], default, f.metadata.get("help", ""),
                               f.metadata.get("basic", False), f.metadata.get("suggest", ())))
    return out


def choices(setting: Setting) -> tuple:
    """The fixed choices of a ``Literal`` setting (also inside ``X | None``), else ()."""
    kind = setting.type
    if get_origin(kind) is Literal:
        return get_args(kind)
    for arg in get_args(kind):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()
