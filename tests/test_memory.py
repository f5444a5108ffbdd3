"""backend/memory.py: the pre-flight estimate against published figures and against autograd."""

import pytest
import torch
from transformers import LlamaConfig

from backend import memory
from backend.config import RunSpec

# Llama-3-8B's shape (8,030,261,248 parameters) and SmolLM2-135M's (the embedded model, tied embeddings).
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama8b():
    return LlamaConfig(**LLAMA3_8B)


def test_parameter_count_of_an_8b_llama_from_its_config_alone(llama8b):
    est = memory.estimate(llama8b, "full", seq_tokens=1024)
    assert est.params == pytest.approx(8.03e9, rel=0.01)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_full_fine_tuning_with_adam_costs_16_bytes_per_parameter_before_activations(llama8b, device):
    est = memory.estimate(llama8b, "full", seq_tokens=1024, device=device)
    assert est.trainable == est.params and est.lora_params == 0
    assert (est.weights + est.gradients + est.optimizer) / est.params == pytest.approx(16, rel=0.05)
    eight_bit = memory.estimate(llama8b, "full", seq_tokens=1024, device=device, optim="paged_adamw_8bit")
    assert eight_bit.optimizer / eight_bit.params == pytest.approx(2, rel=0.02)


def test_nf4_weights_take_about_half_a_byte_per_quantised_parameter(llama8b):
    inv = memory.inventory(llama8b)
    quantised = sum(i * o for name, i, o in inv.linears if name != inv.head)
    est = memory.estimate(llama8b, "qlora", seq_tokens=1024)
    # embeddings, lm_head and norms: fp32 after peft's prepare_model_for_kbit_training
    nf4 = (est.weights - (est.params - quantised) * 4) / quantised
    assert 0.5 < nf4 < 0.6


def test_lora_trainable_count_matches_the_exact_formula(llama8b):
    # r * (in + out) per adapted Linear; Llama-3-8B at r=16 on the seven projections: 41,943,040
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert per_layer * 32 == 41_943_040
    for targets in ("all-linear", LLAMA_LINEARS):
        est = memory.estimate(llama8b, "lora", seq_tokens=1024, r=16, target_modules=targets)
        assert est.trainable == 41_943_040
        assert est.lora_params == est.gradients == 4 * est.trainable
    qv = memory.estimate(llama8b, "lora", seq_tokens=1024, r=16, target_modules=["q_proj", "v_proj"])
    assert qv.trainable == 6_815_744


def test_gradient_checkpointing_lowers_activations(llama8b):
    for method in ("qlora", "lora", "full"):
        plain = memory.estimate(llama8b, method, seq_tokens=4096)
        checkpointed = memory.estimate(llama8b, method, seq_tokens=4096, gradient_checkpointing=True)
        assert checkpointed.activations < plain.activations / 5
        assert checkpointed.total < plain.total


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_qlora_needs_less_than_lora_which_needs_less_than_full(llama8b, device):
    totals = [memory.estimate(llama8b, m, seq_tokens=2048, device=device).total for m in ("qlora", "lora", "full")]
    assert 0 < totals[0] < totals[1] < totals[2]


def test_logits_scale_with_the_positions_that_carry_loss(llama8b):
    every = memory.estimate(llama8b, "lora", seq_tokens=2048)
    half = memory.estimate(llama8b, "lora", seq_tokens=2048, tokens_with_loss=1024)
    assert every.logits == 3 * 4 * 2048 * 128256 == 2 * half.logits


def test_disk_per_checkpoint_and_in_all(llama8b):
    lora = memory.estimate(llama8b, "lora", seq_tokens=1024, save_total_limit=2)
    assert lora.disk_per_checkpoint == 4 * lora.trainable + 8 * lora.trainable + memory.CHECKPOINT_EXTRA_BYTES
    assert lora.disk_total == lora.disk_result + 3 * lora.disk_per_checkpoint  # limit + the one being written
    full = memory.estimate(llama8b, "full", seq_tokens=1024, save_total_limit=1)
    assert full.disk_per_checkpoint == 12 * full.params + memory.CHECKPOINT_EXTRA_BYTES
    assert full.disk_total == full.disk_result + 2 * full.disk_per_checkpoint


def test_breakdown_adds_up_and_fits_compares(llama8b):
    for method in ("qlora", "lora", "full"):
        est = memory.estimate(llama8b, method, seq_tokens=2048, device="cuda")
        parts = est.breakdown()
        assert sum(v for k, v in parts.items() if k != "total") == parts["total"] == est.total
        assert est.fits(est.total) and not est.fits(est.total - 1)


def test_estimate_for_spec_on_the_embedded_models_config():
    config = LlamaConfig(**SMOLLM2_135M)
    shape = {"target_modules": "all-linear", "r": 16, "per_device_train_batch_size": 8, "max_length": 200}
    est = memory.estimate_for_spec(RunSpec.from_flat({"method": "lora", **shape}), config, "cpu")
    assert est.params == pytest.approx(134.5e6, rel=0.001)  # tied embeddings counted once
    assert est.seq_tokens == 8 * 200 and est.method == "lora" and est.device == "cpu"
    assert est.trainable == 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert est.weights == 4 * est.params  # fp32 on CPU
    assert est.overhead == memory.CPU_PROCESS_BYTES
    assert all(v > 0 for v in est.breakdown().values())
    qlora = memory.estimate_for_spec(RunSpec.from_flat({"method": "qlora", **shape}), config, "cpu")
    full = memory.estimate_for_spec(RunSpec.from_flat({"method": "full", **shape}), config, "cpu")
    assert qlora.total < est.total and est.heap > 0 and full.heap == 0  # glibc keeps LoRA's temporaries
    # EWC (full only, and only with general data to weigh by): three fp32 copies of the weights more
    ewc = {"method": "full", "ewc_lambda": 5e4, **shape}
    with_ewc = memory.estimate_for_spec(RunSpec.from_flat(ewc), config, "cpu")
    assert with_ewc.total - full.total == with_ewc.ewc == 3 * 4 * full.trainable and full.ewc == 0
    assert memory.estimate_for_spec(RunSpec.from_flat({**ewc, "mix_data": "none"}), config, "cpu").ewc == 0
    on_gpu = [memory.estimate_for_spec(RunSpec.from_flat({"method": m, **shape}), config, "cuda")
              for m in ("qlora", "lora", "full")]
    assert on_gpu[0].total < on_gpu[1].total < on_gpu[2].total and not any(e.heap for e in on_gpu)


def test_bad_arguments_are_named(llama8b):
    with pytest.raises(ValueError, match="method"):
        memory.estimate(llama8b, "prefix", seq_tokens=8)
    with pytest.raises(ValueError, match="device"):
        memory.estimate(llama8b, "lora", seq_tokens=8, device="mps")


def test_free_memory_and_disk_of_this_machine(tmp_path):
    free, total, name = memory.device_free_memory("cpu")
    assert 0 < free <= total and name
    assert memory.free_disk(tmp_path / "not" / "yet") > 0


# -- the activation formula against what autograd actually saves -------------------------------
TINY = {"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6, "num_key_value_heads": 2,
        "vocab_size": 256, "tie_word_embeddings": True}


def _saved_bytes(layers, method, seq_tokens, lora_dropout=0.0, checkpointing=False, attn="packed_sdpa"):
    """Bytes autograd keeps for backward in one training forward (packed row, as the Trainer runs it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from backend import attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **TINY))
    if attn == attention.NAME:
        assert attention.use_packed_attention(model)
    if checkpointing:
        model.activation_checkpointing_enable()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, sizes = [], {}

    def pack(t):
        kept.append(t)  # keep every storage alive so no address is reused
        if t.untyped_storage().data_ptr() not in params:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    n_examples = 4
    ids = torch.randint(0, TINY["vocab_size"], (1, seq_tokens))
    position_ids = torch.arange(seq_tokens // n_examples).repeat(n_examples)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=0)
    return sum(sizes.values())


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("method,lora_dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_activations_per_layer_match_what_autograd_saves_on_cpu(method, lora_dropout, attn):
    seq = 256
    measured = _saved_bytes(3, method, seq, lora_dropout, attn=attn) - _saved_bytes(2, method, seq, lora_dropout, attn=attn)
    kw = {"seq_tokens": seq, "r": 8, "target_modules": "all-linear", "lora_dropout": lora_dropout, "device": "cpu",
          "attn_implementation": attn}
    predicted = (memory.estimate(LlamaConfig(num_hidden_layers=3, **TINY), method, **kw).activations
                 - memory.estimate(LlamaConfig(num_hidden_layers=2, **TINY), method, **kw).activations)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_checkpointing_keeps_only_each_layers_input_on_cpu():
    seq = 256
    measured = _saved_bytes(3, "full", seq, checkpointing=True) - _saved_bytes(2, "full", seq, checkpointing=True)
    assert measured == 4 * TINY["hidden_size"] * seq


def test_building_the_meta_model_leaves_other_threads_alone(monkeypatch):
    """The web app estimates memory while another thread may be loading a model for the playground:
    what that thread builds meanwhile must get real weights, not meta ones."""
    import threading

    import transformers

    seen = {}
    build = transformers.AutoModelForCausalLM.from_config

    def from_config(config, **kw):  # another thread makes a layer while the meta model is built
        other = threading.Thread(target=lambda: seen.update(device=torch.nn.Linear(2, 2).weight.device))
        other.start()
        other.join()
        return build(config, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=61)
    assert memory.inventory(config).params > 0
    assert seen["device"].type == "cpu"
