"""Train tab: base model, method, preset, hyperparameters, estimate, config and command, queue."""

import gradio as gr

from backend import service
from backend.config import ConfigError
from backend.presets import list_presets, load_preset, preset_header

from .i18n import t

METHODS = [
    ("QLoRA: 4-bit base + adapters, least memory, slightly slower", "qlora"),
    ("LoRA: 16-bit base + adapters, fast, moderate memory", "lora"),
    ("Full: every weight trained, most memory (~16 bytes per parameter on GPU)", "full"),
]
FIELDS = ["model", "method", "preset", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
          "r", "lora_alpha", "lora_dropout", "target_modules", "gradient_accumulation_steps",
          "gradient_checkpointing", "max_length", "system_prompt", "mix_data", "mix_ratio",
          "use_dora", "use_rslora", "modules_to_save", "optim", "ewc_lambda", "use_adalora", "early_stopping_patience",
          "augment_k"]
PREVIEW_COLUMNS = ["row", "original prompt", "kept paraphrases", "dropped (reason)"]
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "adafactor", "sgd"]


def _names(text) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def form_values(data_path, fmt, mapping, *values) -> tuple[dict, str | None]:
    v = dict(zip(FIELDS, values))
    preset = v.pop("preset") or None
    targets = (v.pop("target_modules") or "").strip()
    v["target_modules"] = "all-linear" if targets in ("", "all-linear") else _names(targets)
    v["modules_to_save"] = _names(v.get("modules_to_save")) or None
    if v.get("method") != "full":
        v.pop("ewc_lambda", None)  # shown for full fine-tuning only
    v.update(data=data_path or None, format=fmt, mapping=service.parse_mapping(mapping))
    return v, preset


def review(data_path, fmt, mapping, *values):
    """(config yaml, command, estimate markdown) for the form as it stands."""
    *values, row_tokens = values
    try:
        v, preset = form_values(data_path, fmt, mapping, *values)
        spec = service.make_spec(v, preset)
    except (ConfigError, ValueError) as exc:
        return f"# error: {exc}", "", f"**Error:** {exc}"
    return service.config_yaml(spec), service.cli_command(spec), service.estimate_markdown(spec, row_tokens)


def preset_defaults(model, method, preset):
    """The widgets' values for a method and preset, so what is shown is what would run."""
    spec = service.make_spec({"model": model, "method": method}, preset or None)
    t, lo = spec.train, spec.lora
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    return (t.num_train_epochs, t.learning_rate, t.per_device_train_batch_size, lo.r, lo.lora_alpha,
            lo.lora_dropout, targets, t.gradient_accumulation_steps, spec.data.mix_ratio, lo.use_dora,
            lo.use_rslora, ",".join(lo.modules_to_save or []), t.optim, t.ewc_lambda, lo.use_adalora,
            t.early_stopping_patience)


def augment_preview(data_path, fmt, mapping, model, k, progress=gr.Progress()):
    """The paraphrases a run with ``augment_k=k`` would add for the first 8 training prompts."""
    from backend import augment

    if not data_path:
        raise gr.Error("check a dataset on the Data tab first")
    k = int(k or 0) or 3
    progress(0, desc=f"paraphrasing 8 prompts x {k} with the base model...")
    try:
        items = augment.preview_file(data_path, k=k, model=(model or "").strip() or None, fmt=fmt,
                                     mapping=service.parse_mapping(mapping) or None)
    except (ValueError, OSError) as exc:
        raise gr.Error(str(exc))
    return [[i["index"], i["original"], "\n".join(i["kept"]) or "–",
             "\n".join(f"{d['text']!r} ({d['reason']})" for d in i["dropped"]) or "–"] for i in items]


def preset_model_method(model, method, preset):
    """A preset names its model and method: show them, and what the preset is for."""
    if not preset:
        return model, method, ""
    values = load_preset(preset)
    return values.get("model") or "", values.get("method", method), f"```\n{preset_header(preset)}\n```"


def create_train_tab(data_inputs: dict, submit):
    gr.Markdown(service.hardware_summary())
    with gr.Row():
        model = gr.Textbox("", label=t("model"))
        method = gr.Radio(METHODS, value="lora", label=t("method"))
        preset = gr.Dropdown([""] + list_presets(), value="", label=t("preset"))
    preset_note = gr.Markdown()
    with gr.Row():
        epochs = gr.Number(3, minimum=0.1, label=t("epochs"))
        lr = gr.Number(1e-3, minimum=0, step=1e-5, label=t("lr"))
        batch = gr.Number(8, precision=0, minimum=1, label=t("batch"))
    with gr.Accordion(t("advanced"), open=False):
        with gr.Row():
            r = gr.Number(16, precision=0, minimum=1, label="r")
            alpha = gr.Number(32, minimum=1, label="lora_alpha")
            dropout = gr.Number(0.0, minimum=0, maximum=0.9, label="lora_dropout")
            targets = gr.Textbox("all-linear", label="target_modules")
        with gr.Row():
            accum = gr.Number(1, precision=0, minimum=1, label="gradient_accumulation_steps")
            checkpointing = gr.Checkbox(False, label="gradient_checkpointing")
            mix_data = gr.Dropdown(["replay", "none"], value="replay", allow_custom_value=True, label=t("mix_data"))
            mix_ratio = gr.Number(1.0, minimum=0, label="mix_ratio")
        with gr.Row():
            use_dora = gr.Checkbox(False, label="use_dora (DoRA)")
            use_rslora = gr.Checkbox(False, label="use_rslora (rsLoRA)")
            modules_to_save = gr.Textbox("", label="modules_to_save (trained fully beside LoRA, e.g. lm_head)")
            optim = gr.Dropdown(OPTIMIZERS, value="adamw_torch", allow_custom_value=True, label="optim")
            ewc_lambda = gr.Number(0.0, minimum=0, label="ewc_lambda (full only; needs mix_data)")
        with gr.Row():
            use_adalora = gr.Checkbox(False, label="use_adalora (AdaLoRA: ranks reallocated while training)")
            patience = gr.Number(0, precision=0, minimum=0,
                                 label="early_stopping_patience (evaluations without improvement; 0: off)")
        with gr.Row():
            augment_k = gr.Slider(0, 5, value=0, step=1, label="augment_k (paraphrases per training prompt, by the "
                                                                "base model; 0: off)")
            preview_btn = gr.Button(t("augment_preview"))
        preview_table = gr.Dataframe(headers=PREVIEW_COLUMNS, interactive=False, wrap=True, visible=True)
    widgets = [model, method, preset, epochs, lr, batch, r, alpha, dropout, targets, accum, checkpointing,
               data_inputs["max_length"], data_inputs["system_prompt"], mix_data, mix_ratio,
               use_dora, use_rslora, modules_to_save, optim, ewc_lambda, use_adalora, patience, augment_k]
    inputs = [data_inputs["data_path"], data_inputs["format"], data_inputs["mapping"], *widgets]
    estimate = gr.Markdown(label=t("estimate"))
    with gr.Row():
        config = gr.Code(language="yaml", label=t("config"))
        command = gr.Code(language="shell", label=t("command"))
    queue_btn = gr.Button(t("queue"), variant="primary")
    message = gr.Markdown()
    tuned_by_preset = [epochs, lr, batch, r, alpha, dropout, targets, accum, mix_ratio, use_dora, use_rslora,
                       modules_to_save, optim, ewc_lambda, use_adalora, patience]
    preset.change(preset_model_method, [model, method, preset], [model, method, preset_note], api_visibility="private")
    for w in (method, preset):
        w.change(preset_defaults, [model, method, preset], tuned_by_preset, api_visibility="private")
    for w in widgets + [data_inputs["data_path"]]:
        w.change(review, inputs + [data_inputs["row_tokens"]], [config, command, estimate],
                 api_visibility="private")
    preview_btn.click(augment_preview, [data_inputs["data_path"], data_inputs["format"], data_inputs["mapping"],
                                        model, augment_k], [preview_table], api_name="augment_preview")
    queue_btn.click(submit, inputs + [data_inputs["row_tokens"]], [message], api_name="submit")
    return message
