"""Self-replay against forgetting: the base model's own answers to general prompts, mixed into training.

``replay_prompts.json`` ships general prompts written for this project (English and Chinese:
facts, arithmetic, how-to, short writing, definitions). None of them overlaps the forgetting
meter's questions or the tests' held-out questions, also not as a near-duplicate (a test checks).

``mix_data: replay`` mixes ``mix_ratio`` of these rows per task row into training. Each prompt is
answered once by the run's own base model, greedily, with the run's chat template, system prompt
and precision, and cached like the meter's base answers (``forgetting.cached_base_answers``).
The prompts are answered in a fixed order, ``CHUNK`` at a time, so a run answers only as many as
it needs and later runs reuse them. An answer that reaches ``MAX_NEW_TOKENS`` is kept as far as
it goes, marked ``"cut": true``: training learns its tokens but not the end-of-turn after them,
which would teach the model to stop mid-sentence. In ``RUN_DIR/data/`` the rows carry
``"mixed_from": "replay"``.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

from . import forgetting, models

NAME = "replay"
PROMPTS = Path(__file__).with_name("replay_prompts.json")
MAX_NEW_TOKENS = 64  # the start of an answer carries its behaviour; more tokens cost answering and training time
CHUNK = 32


def load_prompts() -> list[str]:
    """The shipped prompts in the fixed order they are answered in (languages interleaved)."""
    prompts = json.loads(PROMPTS.read_text(encoding="utf-8"))
    random.Random(0).shuffle(prompts)  # a constant seed: every run shares the cached chunks
    return prompts


def rows(spec, n: int, tokenizer) -> tuple[list[dict], dict]:
    """``n`` replay conversations for ``spec`` (fewer when the shipped prompts run out), and what it
    cost: ``{"rows", "answered", "seconds"}`` (``answered``: prompts answered now, not from the cache)."""
    m, system = spec.model, spec.data.system_prompt
    model_path = models.resolve_model(m.model)
    load_once = functools.cache(lambda: forgetting.standalone(model_path, system, m.chat_template, m.method,
                                                              m.trust_remote_code))
    misses = []

    def base():  # called by the cache on a miss only: the model loads once, and only if needed
        misses.append(1)
        return load_once()

    prompts, out, answered, t0 = load_prompts(), [], 0, time.time()
    for start in range(0, len(prompts), CHUNK):
        if len(out) >= n:
            break
        chunk = prompts[start:start + CHUNK]
        before = len(misses)
        answers = forgetting.cached_base_answers(model_path, chunk, system, m.chat_template, m.method,
                                                 m.trust_remote_code, loaded=base, max_new_tokens=MAX_NEW_TOKENS)
        answered += len(chunk) if len(misses) > before else 0
        for prompt, answer in zip(chunk, answers):
            if answer.strip():
                cut = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= MAX_NEW_TOKENS - 1
                out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                            "mixed_from": NAME, **({"cut": True} if cut else {})})
    return out[:n], {"rows": min(len(out), n), "answered": answered, "seconds": round(time.time() - t0, 1)}
