"""backend/attention.py: per-example attention on packed rows equals transformers' masked SDPA."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from backend import attention
from backend import train as train_mod

LENGTHS = (5, 9, 3, 12)


def packed_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    return rows, DataCollatorWithFlattening()([{"input_ids": r, "labels": r} for r in rows])


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    out.logits.float().pow(2).mean().backward()  # any scalar that depends on every position
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_packed_row_gives_transformers_masked_sdpa_output_and_gradients(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows, batch = packed_batch(model.config.vocab_size)
    assert model.config._attn_implementation == "sdpa"
    masked_logits, masked_grads = logits_and_grads(model, batch)

    assert attention.use_packed_attention(model)
    assert model.config._attn_implementation == attention.NAME
    with monkeypatch.context() as m:  # the packed row never reaches transformers' sdpa
        m.setattr(attention, "sdpa_attention_forward", lambda *a, **k: pytest.fail("masked sdpa called"))
        logits, grads = logits_and_grads(model, batch)
    torch.testing.assert_close(logits, masked_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # ... which is each example run alone: no example sees another
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows], dim=1)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_padded_batches_and_generation_are_sdpa_unchanged(tiny_model_dir, tokenizer):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attention.use_packed_attention(packed)
    tokenizer.padding_side = "left"
    enc = tokenizer(["hello there, who are you?", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(packed(**enc).logits, plain(**enc).logits)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(packed.generate(**enc, **kw), plain.generate(**enc, **kw))
        one = tokenizer("hello there", return_tensors="pt")  # batch 1: one causal row, a cache afterwards
        assert torch.equal(packed.generate(**one, **kw), plain.generate(**one, **kw))


def test_training_uses_it_and_the_saved_model_loads_with_sdpa(tiny_model_dir, tiny_data, tmp_path):
    from tests.test_train import tiny_spec

    model, _ = train_mod._setup_model(tiny_spec(tiny_model_dir, tiny_data, method="full"))
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == "sdpa"


def test_a_sliding_window_layer_keeps_its_window(monkeypatch):
    """Mistral-style layers pass ``sliding_window``; the per-example path would ignore it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    _, batch = packed_batch(config.vocab_size)  # examples longer than the window
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        assert attention.use_packed_attention(model)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(packed, masked)
