"""LoRA on a mixture-of-experts model: DeepSeek-V2 (DeepSeek-V2-Lite-Chat's architecture), shrunk.

What transformers 5 builds for DeepSeek-V2: each MoE layer's routed experts are two fused 3-D
``nn.Parameter`` (``mlp.experts.gate_up_proj``: experts x 2*moe_intermediate x hidden, and
``mlp.experts.down_proj``: experts x hidden x moe_intermediate), not ``nn.Linear`` modules, and the
router (``mlp.gate``) is a plain weight matrix. So ``target_modules`` cannot reach the experts:
peft's ``target_parameters`` does (LoRA on a parameter, one low-rank pair per expert), and the
presets use it. These tests build a tiny random model from the shipped DeepSeek-V2-Lite-Chat
config (2 layers: a dense one, then an MoE one with 8 experts) and train it with the preset's keys.
"""

import pytest
import torch
from safetensors.torch import load_file

from backend import models, presets
from backend import train as train_mod

PRESET = "deepseek-v2-lite-chat-qlora"
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHRINK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=32, v_head_dim=16,
              initializer_range=0.2)  # large enough that a few LoRA steps move the logits
# bitsandbytes' CPU 4-bit inference kernel wants in_features % 64 == 0 and out_features % 32 == 0 (real
# models qualify), hence kv_lora_rank 64 (kv_b_proj's input) and qk_rope_head_dim 32 (kv_a_proj: 64 + 32 out).


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tokenizer):
    """DeepSeek-V2-Lite-Chat's config with the sizes shrunk; everything else (MLA, routing, the dense
    first layer, two shared experts, YaRN RoPE) as shipped. Saved with the embedded tokenizer."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    shipped = presets.model_config(PRESET)
    assert shipped.model_type == "deepseek_v2" and shipped.n_routed_experts == 64
    values = {k: v for k, v in shipped.to_dict().items() if k not in ("auto_map", "architectures", "dtype")}
    values.update(SHRINK, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**values)).float()
    folder = tmp_path_factory.mktemp("tiny-deepseek-v2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fresh(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_experts_are_fused_parameters_and_the_router_is_no_linear(tiny_moe_dir):
    model = _fresh(tiny_moe_dir)
    moe = model.model.layers[1].mlp
    assert moe.experts.gate_up_proj.shape == (8, 2 * 32, 64) and moe.experts.down_proj.shape == (8, 64, 32)
    assert not any(isinstance(m, torch.nn.Linear) for m in moe.experts.modules())
    assert not isinstance(moe.gate, torch.nn.Linear) and moe.gate.weight.shape == (8, 64)
    # the shared experts and the dense first layer are ordinary Linear modules
    assert isinstance(moe.shared_experts.gate_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.gate_proj, torch.nn.Linear)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")
def test_peft_renames_mlp_target_modules_to_the_fused_experts(tiny_moe_dir):
    """Why the presets name the experts in target_parameters and keep gate/up/down_proj out of
    target_modules: peft (0.21) maps those v4 names onto the fused expert parameters (gate_up_proj at
    rank 2r) and drops them from target_modules, so the shared experts get no LoRA at all."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_fresh(tiny_moe_dir), LoraConfig(
        r=4, lora_dropout=0.0, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    adapted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in n for n in adapted)
    assert not any("shared_experts" in n or ".layers.0.mlp." in n for n in adapted)
    assert peft_model.peft_config["default"].rank_pattern == {r".*\.gate_up_proj": 8}


def test_lora_trains_the_experts_and_router_with_the_preset_keys(tmp_path, tiny_moe_dir, tiny_data, monkeypatch):
    captured = {}
    save = train_mod._save_result

    def keep_model(run, spec, trainer, tokenizer):
        captured["model"] = trainer.model
        save(run, spec, trainer, tokenizer)

    monkeypatch.setattr(train_mod, "_save_result", keep_model)
    assert presets.load_preset(PRESET)["target_parameters"] == EXPERT_PARAMS
    spec = presets.build_spec(dict(
        model=str(tiny_moe_dir), data=str(tiny_data), learning_rate=5e-2, max_steps=12,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=128, logging_steps=1,
        target_parameters=[*EXPERT_PARAMS, "mlp.gate.weight"],  # the router too
        mix_data="none",  # a random model's replay is noise
    ), preset=PRESET)
    assert spec.model.method == "qlora" and spec.train.gradient_checkpointing and spec.lora.lora_dropout == 0
    run = train_mod.train(spec, tmp_path / "run")

    assert run.status()["state"] == "completed"
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert losses[-1] < losses[0] - 2, losses

    tensors = load_file(run.adapter_dir / "adapter_model.safetensors")
    experts = {k: v for k, v in tensors.items() if ".mlp.experts." in k}
    router = {k: v for k, v in tensors.items() if ".mlp.gate." in k}
    assert len(experts) == 4 and len(router) == 2, sorted(tensors)  # lora_A/B for gate_up, down; router
    # lora_B starts at zero: non-zero now means the experts' and router's adapters were trained
    assert all(v.abs().sum() > 0 for k, v in {**experts, **router}.items() if "lora_B" in k)
    assert any("self_attn.kv_b_proj" in k for k in tensors)

    # the adapter saved is the adapter trained, and loaded onto a freshly quantised base it gives the trained
    # model's logits. Both in the training layout: bitsandbytes' CPU inference kernel (bf16) rounds
    # differently, and that can flip the router's top-k here (0.22 apart with one thread)
    from peft import PeftModel, get_peft_model_state_dict

    trained = captured["model"].eval()
    live = get_peft_model_state_dict(trained)
    assert live.keys() == tensors.keys() and all(torch.equal(live[k], tensors[k]) for k in live)
    ids = torch.tensor([[1, 42, 7, 99, 3, 250, 17]])
    reloaded = PeftModel.from_pretrained(models.load_base(str(tiny_moe_dir), "qlora")[0], run.adapter_dir).eval()
    train_mod._keep_4bit_training_layout(reloaded)
    with torch.no_grad():
        tuned, again = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            untuned = reloaded(input_ids=ids).logits

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(again, tuned) < 0.03 and rel(untuned, tuned) > 0.3, (rel(again, tuned), rel(untuned, tuned))
