"""backend/template.py: identical rendering in training and generation, and the loss mask."""

import pytest

from backend import template
from backend.template import IGNORE_INDEX

SYSTEM = "You are a helpful assistant."


def conv(*turns):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def spans(enc):
    """Maximal runs of labelled tokens, as lists of ids."""
    out, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_prompt_tokens_in_training_equal_generation_prompt(tokenizer):
    messages = conv("Hi 你好 😀", "Hello!", "Who are you?", "I am Nova.")
    enc = template.encode(tokenizer, messages, SYSTEM)
    for k in (1, 3):  # before each assistant turn
        prompt = template.prompt_ids(tokenizer, messages[:k], SYSTEM)
        assert enc["input_ids"][: len(prompt)] == prompt
        # and byte for byte as text
        text = template.render(tokenizer, messages[:k], SYSTEM, add_generation_prompt=True)
        assert tokenizer.decode(enc["input_ids"][: len(prompt)]) == text


def test_every_assistant_turn_learned_with_its_end_token_and_no_user_turn(tokenizer):
    messages = conv("Q1", "first answer", "Q2", "second answer")
    enc = template.encode(tokenizer, messages, SYSTEM)
    learned = [tokenizer.decode(s) for s in spans(enc)]
    assert learned == ["first answer<|im_end|>", "second answer<|im_end|>"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case that hides eos labels elsewhere
    assert enc["labels"].count(tokenizer.eos_token_id) == 2


def test_run_system_prompt_replaces_the_template_default(tokenizer):
    text = template.render(tokenizer, conv("Hi"), SYSTEM, add_generation_prompt=True)
    assert SYSTEM in text and "SmolLM" not in text
    own = [{"role": "system", "content": "Be terse."}] + conv("Hi")
    text = template.render(tokenizer, own, SYSTEM, add_generation_prompt=True)
    assert "Be terse." in text and SYSTEM not in text


def test_raw_text_has_no_template_or_system_prompt_and_is_learned_after_its_first_token(tokenizer):
    enc = template.encode(tokenizer, [{"role": "assistant", "content": "Plain document text."}], SYSTEM)
    assert tokenizer.decode(enc["input_ids"]) == "Plain document text.<|endoftext|>"  # SmolLM2's document end
    assert enc["labels"] == [template.IGNORE_INDEX] + enc["input_ids"][1:]


def test_truncation_is_reported(tokenizer):
    enc = template.encode(tokenizer, conv("Q " * 50, "A " * 50), SYSTEM, max_length=16)
    assert enc["truncated"] and len(enc["input_ids"]) == 16 == len(enc["labels"])


def test_plain_template_for_models_without_one(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    template.setup_chat_template(tok)
    enc = template.encode(tok, conv("Q", "A"), SYSTEM)
    assert [tok.decode(s) for s in spans(enc)] == ["A" + tok.eos_token]


def test_mark_loss_shows_the_assistant_part(tokenizer):
    enc = template.encode(tokenizer, conv("Q", "Answer"), SYSTEM)
    marked = template.mark_loss(tokenizer, enc["input_ids"], enc["labels"])
    assert "[[Answer<|im_end|>]]" in marked and marked.count("[[") == 1


def test_template_that_rewrites_history_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # renders only the last message: earlier turns vanish when later ones are added
    tok.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(template.TemplateError):
        template.encode(tok, conv("Q1", "A1", "Q2", "A2"))
