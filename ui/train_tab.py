"""Train tab, generated from the RunSpec schema (``backend/config.settings``): one widget per setting,
labelled with its key, its help text as the info line, its kind from its type. The basic settings
are shown, the rest sit under Advanced, grouped by dataclass. What reaches the backend is a dict
keyed by setting name, the same mapping ``--set``, ``config.yaml`` and the ``/submit`` API take.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

import gradio as gr
import yaml

from backend import access, data, service
from backend.config import ConfigError, Setting, choices, settings
from backend.presets import list_presets, load_preset, preset_header

from .common import signed_in
from .i18n import t

DATA_TAB_KEYS = ("data", "format", "mapping", "system_prompt", "max_length")  # the Data tab's own widgets
METHOD_LABELS = {
    "qlora": "QLoRA: 4-bit base + adapters, least memory, slightly slower",
    "lora": "LoRA: 16-bit base + adapters, fast, moderate memory",
    "full": "Full: every weight trained, most memory (~16 bytes per parameter on GPU)",
}
SECTION_TITLES = {"model": "Model", "data": "Data", "lora": "LoRA", "train": "Training"}
PREVIEW_COLUMNS = ["row", "original prompt", "kept paraphrases", "dropped (reason)"]


def form_settings() -> list[Setting]:
    """The settings the Train tab shows: every one but those the Data tab holds."""
    return [s for s in settings() if s.name not in DATA_TAB_KEYS]


def _plain(setting: Setting) -> set:
    """The plain types a setting's annotation allows (``float | None`` -> {float, NoneType})."""
    return set(get_args(setting.type)) or {setting.type}


def _as_yaml(setting: Setting) -> bool:
    """Lists, dicts and free values are typed as YAML, as after ``--set KEY=``."""
    return not choices(setting) and not _plain(setting) & {bool, int, float, str}


def to_widget(setting: Setting, value: Any) -> Any:
    if _as_yaml(setting):
        if value is None:
            return ""
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
        return text.removesuffix("\n").removesuffix("\n...").strip()  # a scalar ends its document with "..."
    if str in _plain(setting) and value is None:
        return ""
    return value


def from_widget(setting: Setting, value: Any) -> Any:
    """A widget's value as the setting takes it; "" and None mean "not set" (the default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if _as_yaml(setting) and isinstance(value, str):  # the form's text; an API mapping's list is taken as it is
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{setting.name}: {value!r} is not a YAML value") from None
    if int in _plain(setting) and float not in _plain(setting) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def widget(setting: Setting, value: Any) -> gr.components.Component:
    """The widget for one setting: its key as the label, its help as the info line."""
    label, info, value = setting.name, setting.help, to_widget(setting, value)
    if setting.name == "method":
        return gr.Radio([(METHOD_LABELS[m], m) for m in choices(setting)], value=value, label=label, info=info)
    if choices(setting):  # a list of choices (report_to) picks several
        return gr.Dropdown(list(choices(setting)), value=value, label=label, info=info,
                           multiselect=get_origin(setting.type) is list)
    if setting.suggest:  # offered values, or any other text (e.g. mix_data: replay, none or a file)
        return gr.Dropdown(list(setting.suggest), value=value, allow_custom_value=True, label=label, info=info)
    kinds = _plain(setting)
    if bool in kinds:
        return gr.Checkbox(value=value, label=label, info=info)
    if int in kinds and float not in kinds:
        return gr.Number(value=value, precision=0, label=label, info=info)
    if float in kinds:
        return gr.Number(value=value, label=label, info=info)
    return gr.Textbox(value=value, label=label, info=info, placeholder="(default)" if value == "" else None)


def form_values(widget_values: dict[str, Any]) -> tuple[dict, str | None]:
    """Widget values by key -> (flat settings for ``service.make_spec``, preset name)."""
    by_name = {s.name: s for s in settings()}
    values = dict(widget_values)
    preset = values.pop("preset", None) or None
    if isinstance(values.get("mapping"), str):
        values["mapping"] = data.parse_mapping(values["mapping"])
    return {k: from_widget(by_name[k], v) if k in by_name and k != "mapping" else v
            for k, v in values.items()}, preset


def preset_values(model, method, preset, stage="sft") -> dict:
    """The settings a model, method, preset and stage resolve to, by key."""
    sections = service.make_spec({"model": model, "method": method, "stage": stage or "sft"}, preset or None).to_dict()
    return {s.name: sections[s.section][s.name] for s in form_settings()}


def preset_defaults(model, method, preset, stage="sft") -> list:
    """The widgets' values for a model, method, preset and stage, in ``form_settings`` order, so what
    is shown is what would run (a preference stage drops the embedded preset's SFT rate and EWC)."""
    values = preset_values(model, method, preset, stage)
    return [to_widget(s, values[s.name]) for s in form_settings()]


def preset_model_method(model, method, preset):
    """A preset names its model and method: show them, and what the preset is for."""
    if not preset:
        return model, method, ""
    values = load_preset(preset)
    return values.get("model") or "", values.get("method", method), f"```\n{preset_header(preset)}\n```"


def review(request: gr.Request, data_path, row_tokens, config: dict, queue=None):
    """(config yaml, command, estimate markdown) for the form as it stands (``queue``: where a
    ``from_run`` run id is looked up)."""
    try:
        values, preset = form_values({"data": data_path or None, **(config or {})})
        spec = service.make_spec(values, preset, service.caller(request), queue)
    except (ConfigError, ValueError, PermissionError) as exc:
        message = access.redact(str(exc))
        return f"# error: {message}", "", f"**Error:** {message}"
    caller = service.caller(request)
    if access.server_token() and not access.token_allowed(service.flat_settings(spec), caller):
        estimate = "Estimate not made: this server does not fetch that Hub model's config with its token for you."
    else:
        estimate = service.estimate_markdown(spec, row_tokens)
    return service.config_yaml(spec), service.cli_command(spec), estimate


def augment_preview(data_path, fmt, mapping, model, k, request: gr.Request = None, progress=gr.Progress()):
    """The paraphrases a run with ``augment_k=k`` would add for the first 8 training prompts."""
    from backend import augment

    signed_in(request)
    if not data_path:
        raise gr.Error("check a dataset on the Data tab first")
    caller = service.caller(request)
    try:
        access.confine_paths({"data": data_path, "model": model}, caller)
    except access.AccessError as exc:
        raise gr.Error(str(exc))
    if access.server_token() and not access.token_allowed({"model": model}, caller):
        raise gr.Error(f"{model}: on this server only the admin paraphrases with Hub models outside the presets")
    k = int(k or 0) or 3
    progress(0, desc=f"paraphrasing 8 prompts x {k} with the base model...")
    try:
        items = augment.preview_file(data_path, k=k, model=(model or "").strip() or None, fmt=fmt,
                                     mapping=data.parse_mapping(mapping) or None)
    except (ValueError, OSError) as exc:
        raise gr.Error(access.redact(str(exc)))
    return [[i["index"], i["original"], "\n".join(i["kept"]) or "–",
             "\n".join(f"{d['text']!r} ({d['reason']})" for d in i["dropped"]) or "–"] for i in items]


def create_train_tab(data_inputs: dict, submit, queue=None):
    """The form; ``submit(request, data_path, row_tokens, config)`` queues a run from the config
    mapping and is the ``/submit`` endpoint."""

    def review_form(request: gr.Request, data_path, row_tokens, config: dict):
        return review(request, data_path, row_tokens, config, queue)

    gr.Markdown(service.hardware_summary())
    initial = preset_values(None, "lora", "")
    widgets: dict[str, gr.components.Component] = {}
    basic = [s for s in form_settings() if s.basic]
    with gr.Row():
        for s in basic:
            widgets[s.name] = widget(s, initial[s.name])
        preset = gr.Dropdown([""] + list_presets(), value="", label="preset",
                             info="Settings tuned for a model and method (presets/); empty: the embedded model's")
    preset_note = gr.Markdown()
    with gr.Accordion(t("advanced"), open=False):
        for section, title in SECTION_TITLES.items():
            group = [s for s in form_settings() if s.section == section and not s.basic]
            if group:
                with gr.Accordion(title, open=False):
                    for start in range(0, len(group), 4):
                        with gr.Row():
                            for s in group[start:start + 4]:
                                widgets[s.name] = widget(s, initial[s.name])
        with gr.Row():
            preview_btn = gr.Button(t("augment_preview"))
        preview_table = gr.Dataframe(headers=PREVIEW_COLUMNS, interactive=False, wrap=True, visible=True)
    estimate = gr.Markdown(label=t("estimate"))
    with gr.Row():
        config = gr.Code(language="yaml", label=t("config"))
        command = gr.Code(language="shell", label=t("command"))
    queue_btn = gr.Button(t("queue"), variant="primary")
    message = gr.Markdown()
    mapping = gr.JSON(visible=False)  # the form as one config mapping: what /submit takes

    keyed = {"preset": preset, **{k: data_inputs[k] for k in DATA_TAB_KEYS if k != "data"}, **widgets}
    names = list(keyed)

    def collect(*values):
        return dict(zip(names, values))

    ordered = [widgets[s.name] for s in form_settings()]
    preset.change(preset_model_method, [widgets["model"], widgets["method"], preset],
                  [widgets["model"], widgets["method"], preset_note], api_visibility="private")
    for w in (widgets["method"], widgets["stage"], preset):
        w.change(preset_defaults, [widgets["model"], widgets["method"], preset, widgets["stage"]], ordered,
                 api_visibility="private")
    state = [data_inputs["data_path"], data_inputs["row_tokens"]]
    for w in [*keyed.values(), data_inputs["data_path"]]:
        w.change(collect, list(keyed.values()), mapping, api_visibility="private").then(
            review_form, [*state, mapping], [config, command, estimate], api_visibility="private")
    preview_btn.click(augment_preview, [data_inputs["data_path"], data_inputs["format"], data_inputs["mapping"],
                                        widgets["model"], widgets["augment_k"]], [preview_table],
                      api_name="augment_preview")
    queue_btn.click(collect, list(keyed.values()), mapping, api_visibility="private").then(
        submit, [*state, mapping], [message], api_name="submit")
    return message
