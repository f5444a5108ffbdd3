"""Chat rendering shared by training and generation, and the loss mask.

Training and generation must see byte-identical prompts, so both go through ``render``:
the conversation is rendered with the run's chat template (the model's own, or one the run names;
a model without one gets ``PLAIN_TEMPLATE``), with the run's ``system_prompt`` placed first unless
the data brings its own system message. That keeps a template's built-in default system prompt
(SmolLM2's "You are a helpful AI assistant named SmolLM...") from fighting the data.

``encode`` tokenizes a conversation segment by segment: each assistant turn is the text the
template adds after the generation prompt. Those tokens are labelled up to and including the
end-of-turn token (the rest, e.g. a trailing newline, is not), every other token gets -100.
Because segments are tokenized separately, the prompt tokens in training are exactly the tokens
``prompt_ids`` gives at generation time.
"""

from __future__ import annotations

IGNORE_INDEX = -100

# For base models without a template: role-tagged blocks, each answer closed by the eos token.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot be used for training (e.g. it rewrites earlier turns)."""


def setup_chat_template(tokenizer, chat_template: str | None = None):
    """Give the tokenizer the run's template: the one named, its own, or the plain default."""
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Put the run's system prompt first unless the conversation already has one."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    if system_prompt:
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def render(tokenizer, messages: list[dict], system_prompt: str | None = None,
           add_generation_prompt: bool = False) -> str:
    """The text the model sees for ``messages`` (with the run's system prompt)."""
    return tokenizer.apply_chat_template(
        with_system(messages, system_prompt), tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of the generation prompt: exactly what training put before an answer."""
    return _ids(tokenizer, render(tokenizer, messages, system_prompt, add_generation_prompt=True))


# The token pretraining put after each document, where the vocabulary has one: a chat model's eos is its
# end-of-turn token (SmolLM2-Instruct's <|im_end|>, Llama 3's <|eot_id|>), not what ended its documents.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def document_end_id(tokenizer) -> int:
    for tok in END_OF_TEXT:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == tok:  # not the unknown token
            return tid
    return tokenizer.eos_token_id


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """A raw-text prompt as pretraining saw a document's start: the tokenizer's own special tokens
    (BOS where it adds one), no chat template."""
    return list(tokenizer(text)["input_ids"])


def document_ids(tokenizer, text: str) -> list[int]:
    """A raw-text document as pretraining saw it: ``text_prompt_ids``, then the end-of-document token."""
    return text_prompt_ids(tokenizer, text) + [document_end_id(tokenizer)]


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<｜end▁of▁sentence｜>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def encode(tokenizer, messages: list[dict], system_prompt: str | None = None,
           max_length: int | None = None) -> dict:
    """Tokenize one conversation; returns ``input_ids``, ``labels`` and ``truncated``.

    Raw text (a single assistant message with no user turn) is ``document_ids``, learned on every
    token after the first; training packs documents into blocks instead (``data.text_blocks``).
    """
    if len(messages) == 1 and messages[0]["role"] == "assistant":  # raw text: no template, no system prompt
        ids = document_ids(tokenizer, messages[0]["content"])
        return _truncate(ids, [IGNORE_INDEX] + ids[1:], max_length)
    messages = with_system(messages, system_prompt)
    eot = end_of_turn_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text already turned into tokens
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns are added; "
                "choose another chat_template for training"
            )
        context = _ids(tokenizer, prompt[len(done):])
        answer = _ids(tokenizer, full[len(prompt):])
        end = next((k + 1 for k, t in enumerate(answer) if t in eot), None)
        if end is None:  # the template does not close turns with an end token: add one
            answer, end = answer + [tokenizer.eos_token_id], len(answer) + 1
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer[:end] + [IGNORE_INDEX] * (len(answer) - end)
        done = full
    return _truncate(input_ids, labels, max_length)


def _truncate(input_ids: list[int], labels: list[int], max_length: int | None) -> dict:
    truncated = bool(max_length) and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def mark_loss(tokenizer, input_ids: list[int], labels: list[int],
              open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Decode ``input_ids`` with the loss-covered spans wrapped in markers, for previews."""
    out, span, inside = [], [], False
    for tok, lab in zip(input_ids, labels):
        learned = lab != IGNORE_INDEX
        if learned != inside and span:
            text = tokenizer.decode(span)
            out.append(f"{open_mark}{text}{close_mark}" if inside else text)
            span = []
        inside = learned
        span.append(tok)
    if span:
        text = tokenizer.decode(span)
        out.append(f"{open_mark}{text}{close_mark}" if inside else text)
    return "".join(out)


def left_pad(tokenizer, rows: list[list[int]], device=None) -> tuple:
    """Token rows as one batch for ``generate``: padded on the left (each row's last token is where
    generation goes on), with the attention mask. Returns (input_ids, attention_mask, pad id)."""
    import torch

    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, pad
