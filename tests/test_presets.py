"""presets/: every preset loads, names modules its model has, and states the memory backend.memory estimates.

Each hub-model preset ships its model's config.json in presets/configs/, so these checks build the
model on the meta device and estimate its memory with no network and no weights.
"""

import functools
import re

import pytest
import torch

from backend import memory, presets
from backend.config import RunSpec

HUB_PRESETS = [p for p in presets.list_presets() if presets.load_preset(p).get("model")]
GiB = 2**30
GPU_80GB = 80e9  # bytes on an "80 GB" card, before the caching allocator's 5-15 %
MEMORY_LINE = re.compile(r"Estimated peak memory: ([\d.]+) GiB on CUDA at max_length (\d+) x batch (\d+)")
# Parameter counts published for these models (model cards, papers), to catch a mistyped config.json.
PUBLISHED_PARAMS = {
    "deepseek-ai/deepseek-llm-7b-chat": 6.91e9,
    "deepseek-ai/deepseek-llm-67b-chat": 67.4e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62e9,
    "deepseek-ai/DeepSeek-V2-Lite-Chat": 15.7e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
}
# peft (0.21, transformers 5) rewrites these target_modules names to fused expert parameters for these model
# types and drops them from target_modules (see tests/test_moe.py): a preset must not rely on them.
PEFT_RENAMED = {"deepseek_v2": {"gate", "gate_proj", "up_proj", "down_proj"}}


@functools.lru_cache(maxsize=None)
def meta_model(preset: str):
    """(Linear module names, parameter names) of the preset's model, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(presets.model_config(preset))
    linears = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return linears, tuple(n for n, _ in model.named_parameters())


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


@pytest.mark.parametrize("name", presets.list_presets())
def test_every_preset_loads_and_says_what_it_is_for(name):
    spec = presets.build_spec({}, name)  # an unknown key or a bad value raises here
    assert spec.preset == name
    assert RunSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()  # what a run folder stores reloads
    assert re.search(r"(Estimated|Measured) peak memory", presets.preset_header(name))
    assert name.endswith("-" + spec.model.method), "presets are named <model>-<method>"


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_hub_preset_header_names_hardware_and_the_command(name):
    header = presets.preset_header(name)
    spec = presets.build_spec({}, name)
    assert spec.model.model in header and "Hardware:" in header and "For:" in header
    assert f"--preset {name} --method {spec.model.method}" in header


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_shipped_config_builds_and_every_target_exists_in_the_model(name):
    spec = presets.build_spec({}, name)
    config = presets.model_config(name)
    assert config is not None, f"presets/configs/ has no config.json for {spec.model.model}"
    linears, params = meta_model(name)
    n_params = memory.inventory(config).params
    assert n_params == pytest.approx(PUBLISHED_PARAMS[spec.model.model], rel=0.01)

    lo = spec.lora
    if lo.target_modules != "all-linear":
        for key in lo.target_modules:
            assert any(_matches(n, key) for n in linears), f"{key} is no Linear module of {spec.model.model}"
        renamed = set(lo.target_modules) & PEFT_RENAMED.get(config.model_type, set())
        assert not renamed, f"peft would retarget {renamed} to fused experts"
    for key in list(lo.rank_pattern) + list(lo.alpha_pattern):
        assert any(re.match(rf"(.*\.)?({key})$", n) for n in linears), f"pattern {key} matches no module"
    for key in lo.target_parameters or []:
        assert any(_matches(n, key) for n in params), f"{key} is no parameter of {spec.model.model}"
        assert lo.lora_dropout == 0, "peft's LoRA on parameters (target_parameters) takes no dropout"


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_header_memory_is_the_estimate_for_the_shipped_config(name):
    spec = presets.build_spec({}, name)
    found = MEMORY_LINE.search(presets.preset_header(name))
    assert found, "the header states 'Estimated peak memory: X GiB on CUDA at max_length L x batch B'"
    stated, length, batch = float(found.group(1)), int(found.group(2)), int(found.group(3))
    assert (length, batch) == (spec.data.max_length, spec.train.per_device_train_batch_size)
    est = memory.estimate_for_spec(spec, presets.model_config(name), "cuda")
    assert stated * GiB == pytest.approx(est.total, rel=0.10)


def test_67b_qlora_fits_one_80gb_gpu_with_allocator_headroom():
    spec = presets.build_spec({}, "deepseek-llm-67b-chat-qlora")
    est = memory.estimate_for_spec(spec, presets.model_config("deepseek-llm-67b-chat-qlora"), "cuda")
    assert spec.model.method == "qlora" and est.total * 1.15 < GPU_80GB


def test_7b_full_uses_the_memory_savers_and_says_when_one_80gb_gpu_is_not_enough():
    name = "deepseek-llm-7b-chat-full"
    spec = presets.build_spec({}, name)
    assert spec.model.method == "full" and spec.train.optim == "paged_adamw_8bit"
    assert spec.train.gradient_checkpointing
    est = memory.estimate_for_spec(spec, presets.model_config(name), "cuda")
    if est.total * 1.15 > GPU_80GB:
        assert "more than one 80 GB GPU" in presets.preset_header(name)


def test_gated_model_presets_say_so():
    gated = [p for p in HUB_PRESETS if presets.load_preset(p)["model"].startswith("meta-llama/")]
    assert gated
    for name in gated:
        header = presets.preset_header(name)
        assert "Gated" in header and "HF_TOKEN" in header and "huggingface.co/meta-llama/" in header


def test_moe_preset_adapts_the_routed_experts():
    for name in ("deepseek-v2-lite-chat-qlora", "deepseek-v2-lite-chat-lora"):
        spec = presets.build_spec({}, name)
        assert set(spec.lora.target_parameters) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
        assert spec.train.gradient_checkpointing


def test_model_config_path_finds_configs_by_preset_or_hub_id_and_only_those():
    path = presets.model_config_path("deepseek-llm-7b-chat-qlora")
    assert path == presets.model_config_path("deepseek-ai/deepseek-llm-7b-chat")
    assert path.name == "deepseek-ai--deepseek-llm-7b-chat.json" and path.parent == presets.CONFIG_DIR
    for other in ("smollm2-135m-lora", None, "", "someone/unknown-model", "runs/x", "embedded"):
        assert presets.model_config_path(other) is None and presets.model_config(other) is None
    shipped = {p.name for p in presets.CONFIG_DIR.glob("*.json")}
    used = {presets.model_config_path(p).name for p in HUB_PRESETS}
    assert shipped == used, "every shipped config belongs to a preset"
