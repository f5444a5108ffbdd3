"""Augmentation for small instruction sets: each prompt paraphrased K times, the answer kept.

    model, tok = load_paraphraser()                     # the embedded instruct model, offline
    rows = paraphrase_prompts(model, tok, train, k=3)   # new rows only: train + rows is the set
    preview(model, tok, train, k=3, limit=5)            # originals with kept and dropped paraphrases

An instruct model (by default the run's base model, so it works offline) is asked to rewrite the
last user turn of each conversation: the instruction ``INSTRUCTIONS`` (in Chinese for a Chinese
prompt) with two worked examples as earlier chat turns (``EXAMPLES``: a 135M model follows an
example far better than an instruction alone). K samples per prompt come from one batched
``generate`` per chunk of prompts. The first line of each sample is kept, minus quotes and a
"Rewritten question:" label, then filtered (``filter_paraphrases``): dropped when empty, identical
to the original (whitespace, case and punctuation ignored), a duplicate of a kept paraphrase or of
another row's prompt (same comparison), garbled (a replacement character, or a character or phrase
repeated over and over where the original has no such run: small models loop), or when its
character 3-gram Jaccard similarity to the original (``jaccard3``) is outside [0.3, 0.9]: below,
it likely asks something else; above, it teaches nothing new.

Each new row is ``{"messages": [...], "augmented_from": i}`` (``i``: the original's index), its
messages the original's with the last user turn replaced; the answer is unchanged. The filter
checks form, not meaning: a small model's paraphrase can still ask something else, so look at
``preview`` before training on them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

import torch

from . import models, template

LOW, HIGH = 0.3, 0.9
INSTRUCTIONS = {
    "en": "Rewrite the question in other words. Reply with the rewritten question only.",
    "zh": "用其他的话改写这个问题。只回复改写后的问题。",
}
EXAMPLES = {
    "en": [("What time does the library open?", "When does the library open?"),
           ("Give me three tips for sleeping better.", "Share three ways to sleep better.")],
    "zh": [("图书馆几点开门？", "图书馆什么时候开门？"),
           ("给我三个改善睡眠的建议。", "请分享三个让睡眠更好的方法。")],
}
_LABEL = re.compile(r"^\s*(here\s+is|here's)?\s*(the\s+|a\s+)?(rewritten|rephrased|paraphrased|new)"
                    r"(\s+(question|version|request))?\s*[:：]\s*|^\s*(改写后的问题|改写后|改写)\s*[:：]\s*", re.I)
_QUOTES = "\"'“”‘’「」『』"

Generator = Callable[[list[str]], list[list[str]]]  # prompts -> K raw samples per prompt


# -- similarity and the filter ------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join((text or "").lower().split())


def _key(text: str) -> str:
    """What "identical" and "duplicate" compare: ``normalise`` without punctuation and symbols."""
    return normalise("".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text or ""))


_LOOP = re.compile(r"(.)\1{3,}|(..+?)\2{2,}", re.S)  # a character 4 times, or a phrase 3 times, in a row


def garbled(text: str, original: str = "") -> bool:
    """A replacement character, or a run that loops where ``original`` does not."""
    return "\ufffd" in text or (bool(_LOOP.search(normalise(text))) and not _LOOP.search(normalise(original)))


def _grams(text: str) -> set[str]:
    text = normalise(text)
    return {text[i:i + 3] for i in range(len(text) - 2)} if len(text) >= 3 else ({text} if text else set())


def jaccard3(a: str, b: str) -> float:
    """Jaccard similarity of the character 3-gram sets of ``a`` and ``b`` (after ``normalise``);
    a text shorter than 3 characters is its own single gram; two empty texts are identical (1.0)."""
    ga, gb = _grams(a), _grams(b)
    if not ga and not gb:
        return 1.0
    return len(ga & gb) / len(ga | gb)


def is_chinese(text: str) -> bool:
    """Mostly CJK among its letters: then the instruction and the examples are in Chinese."""
    cjk = sum("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)
    latin = sum(ch.isascii() and ch.isalpha() for ch in text)
    return cjk > 0 and cjk >= latin / 4


def clean(sample: str) -> str:
    """The paraphrase in a raw sample: its first non-empty line, without a label or quotes."""
    line = next((ln for ln in (sample or "").splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line).strip()
    while len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def filter_paraphrases(original: str, candidates: list[str], low: float = LOW, high: float = HIGH,
                       taken: set[str] | None = None) -> tuple[list[str], list[dict]]:
    """``(kept, dropped)``: ``dropped`` is ``[{"text", "reason"}]``. ``taken`` holds the prompts
    of other rows: a paraphrase equal to one is a duplicate."""
    kept, dropped, seen = [], [], {_key(t) for t in taken or ()}
    for text in candidates:
        key = _key(text)
        sim = jaccard3(text, original)
        if not key:
            reason = "empty"
        elif key == _key(original):
            reason = "identical"
        elif key in seen:
            reason = "duplicate"
        elif garbled(text, original):
            reason = "garbled"
        elif sim < low:
            reason = f"too different (similarity {sim:.2f} < {low})"
        elif sim > high:
            reason = f"too similar (similarity {sim:.2f} > {high})"
        else:
            kept.append(text)
            seen.add(key)
            continue
        dropped.append({"text": text, "reason": reason})
    return kept, dropped


# -- generation ---------------------------------------------------------------------------------
def instruction_messages(prompt: str) -> list[dict]:
    """The chat that asks for one paraphrase of ``prompt``: the examples as earlier turns."""
    lang = "zh" if is_chinese(prompt) else "en"
    messages = []
    for question, rewritten in EXAMPLES[lang]:
        messages += [{"role": "user", "content": f"{INSTRUCTIONS[lang]}\n\n{question}"},
                     {"role": "assistant", "content": rewritten}]
    return messages + [{"role": "user", "content": f"{INSTRUCTIONS[lang]}\n\n{prompt}"}]


def sampler(model, tokenizer, k: int = 3, seed: int = 0, temperature: float = 0.7, top_p: float = 0.95,
            max_new_tokens: int | None = None) -> Generator:
    """A generator for ``paraphrase_prompts``: one batched, left-padded ``generate`` per call, ``k``
    samples per prompt; ``max_new_tokens`` defaults to twice the longest prompt + 16 (at most 128)."""
    stop = set(template.end_of_turn_ids(tokenizer))
    calls = [0]

    def generate(prompts: list[str]) -> list[list[str]]:
        ids = [template.prompt_ids(tokenizer, instruction_messages(p)) for p in prompts]
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        input_ids, mask, pad = template.left_pad(tokenizer, ids, model.device)
        width = input_ids.shape[1]
        torch.manual_seed(seed + calls[0])  # each chunk its own seed: reproducible chunk by chunk
        calls[0] += 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=top_p, num_return_sequences=k, eos_token_id=sorted(stop), pad_token_id=pad,
                                 max_new_tokens=max_new_tokens or min(128, 2 * longest + 16))
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]  # samples come grouped by prompt

    return generate


def _messages(conv) -> list[dict]:
    return conv["messages"] if isinstance(conv, dict) else conv


def _last_user(messages: list[dict]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)


def _targets(conversations: list, max_chars: int) -> list[tuple[int, str]]:
    """``(index, prompt)`` of each conversation whose last user turn can be paraphrased: one that an
    answer follows (raw text rows have none), not empty and at most ``max_chars`` long."""
    out = []
    for i, conv in enumerate(conversations):
        messages = _messages(conv)
        u = _last_user(messages)
        if u is not None and u + 1 < len(messages) and 0 < len(messages[u]["content"].strip()) <= max_chars:
            out.append((i, messages[u]["content"]))
    return out


def _paraphrase(todo: list[tuple[int, str]], taken: set[str], generate: Generator, batch_size: int,
                low: float, high: float, progress=None) -> list[dict]:
    """Per ``(index, prompt)``: ``{"index", "original", "kept", "dropped"}``; ``taken``: the
    prompts of every row, as ``_key`` gives them (a paraphrase may not repeat one)."""
    taken, out = set(taken), []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        samples = generate([p for _, p in chunk])
        for (i, prompt), raw in zip(chunk, samples, strict=True):
            kept, dropped = filter_paraphrases(prompt, [clean(s) for s in raw], low, high, taken - {_key(prompt)})
            taken |= {_key(t) for t in kept}  # no two rows get the same paraphrase either
            out.append({"index": i, "original": prompt, "kept": kept, "dropped": dropped})
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return out


def paraphrase_prompts(model, tokenizer, conversations: list, k: int = 3, seed: int = 0, *, batch_size: int = 8,
                       temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int | None = None,
                       low: float = LOW, high: float = HIGH, max_chars: int = 500,
                       generate: Generator | None = None, progress=None) -> list[dict]:
    """New rows: each conversation with its last user turn replaced by each kept paraphrase.

    ``conversations``: message lists (as ``data.prepare`` gives) or dicts with ``messages``; a
    prompt longer than ``max_chars`` is left alone. ``generate`` replaces the model (tests);
    ``progress(done, total)`` is called after each chunk. Returns ``[{"messages", "augmented_from"}]``
    (a dict input keeps its other keys).
    """
    generate = generate or sampler(model, tokenizer, k, seed, temperature, top_p, max_new_tokens)
    todo = _targets(conversations, max_chars)
    rows = []
    for item in _paraphrase(todo, {_key(p) for _, p in todo}, generate, batch_size, low, high, progress):
        conv = conversations[item["index"]]
        messages = _messages(conv)
        u = _last_user(messages)
        for text in item["kept"]:
            new = [dict(m) for m in messages]
            new[u]["content"] = text
            rows.append({**(conv if isinstance(conv, dict) else {}), "messages": new, "augmented_from": item["index"]})
    return rows


def preview(model, tokenizer, conversations: list, k: int = 3, seed: int = 0, limit: int = 5, *, batch_size: int = 8,
            temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int | None = None,
            low: float = LOW, high: float = HIGH, max_chars: int = 500,
            generate: Generator | None = None) -> list[dict]:
    """What ``paraphrase_prompts`` does to the first ``limit`` rows it would paraphrase, for display:
    ``[{"index", "original", "kept": [text], "dropped": [{"text", "reason"}]}]``. Each chunk is
    seeded by its position, so with the same settings and ``limit`` a multiple of ``batch_size``
    these are exactly the paraphrases ``paraphrase_prompts`` makes for those rows."""
    generate = generate or sampler(model, tokenizer, k, seed, temperature, top_p, max_new_tokens)
    todo = _targets(conversations, max_chars)
    return _paraphrase(todo[:limit], {_key(p) for _, p in todo}, generate, batch_size, low, high)


def stats(rows: list[dict], conversations: list) -> dict:
    """``{"originals", "augmented", "rows_with_paraphrases"}`` for a summary line."""
    return {"originals": len(conversations), "augmented": len(rows),
            "rows_with_paraphrases": len({r["augmented_from"] for r in rows})}


def load_paraphraser(model: str | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` of the instruct model that paraphrases (default: the embedded one),
    with its own chat template, in eval mode; free it before training needs the memory."""
    path = models.resolve_model(model)
    tokenizer = template.setup_chat_template(models.load_tokenizer(path, trust_remote_code))
    loaded, _ = models.load_base(path, "lora", trust_remote_code)
    return loaded.eval(), tokenizer


def preview_file(data: str, k: int = 3, seed: int = 42, limit: int = 8, model: str | None = None, fmt: str = "auto",
                 mapping: dict | None = None, val_size: float = 0.1, trust_remote_code: bool = False) -> list[dict]:
    """``preview`` on a data file's training split (the run's split for the same ``val_size`` and
    ``seed``): what a run with ``augment_k=k`` would add for its first ``limit`` prompts."""
    from . import data as data_mod

    train = data_mod.prepare(data, fmt=fmt, mapping=mapping, val_size=val_size, seed=seed).train
    paraphraser, tokenizer = load_paraphraser(model, trust_remote_code)
    return preview(paraphraser, tokenizer, train, k, seed, limit)
