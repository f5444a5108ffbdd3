"""Loss and perplexity of the base and the tuned model on the same conversations.

The loss is the mean cross-entropy over the tokens training learns (assistant turns with their
end-of-turn token; raw text: every token of the held-out blocks after a document's first), so base
and tuned are scored on exactly what the run was taught.
"""

from __future__ import annotations

import math

import torch

from . import data as data_mod
from . import template
from .playground import LoadedRun
from .runs import RunFolder


def examples(tokenizer, conversations, system_prompt, max_length) -> list[dict]:
    """What training makes of ``conversations``: chat rows encoded one by one; raw-text documents packed
    into blocks (``data.text_blocks``), each block cut into its documents' pieces, since an unpacked
    forward pass attends across a whole row and training let each document see only itself."""
    docs = [c[0]["content"] for c in conversations if data_mod.is_document(c)]
    chats = [c for c in conversations if not data_mod.is_document(c)]
    pieces = []
    for block in data_mod.text_blocks(tokenizer, docs, max_length) if docs else []:
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
        pieces += [{"input_ids": block["input_ids"][a:b], "labels": block["labels"][a:b]}
                   for a, b in zip(starts, starts[1:])]
    return pieces + data_mod.encode_all(tokenizer, chats, system_prompt, max_length)


def conversation_loss(model, tokenizer, conversations, system_prompt, max_length) -> dict:
    total, count = 0.0, 0
    with torch.no_grad():
        for enc in examples(tokenizer, conversations, system_prompt, max_length):
            ids = torch.tensor([enc["input_ids"]], device=model.device)
            labels = torch.tensor([enc["labels"]], device=model.device)
            n = int((labels[:, 1:] != template.IGNORE_INDEX).sum())
            if n == 0:
                continue
            # cross-entropy on the logits, not ``model(labels=...)``: peft's AdaLoRA adds its
            # orthogonality penalty to any loss computed from labels (and fails outside training)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=template.IGNORE_INDEX)
            total += float(loss) * n
            count += n
    mean = total / max(count, 1)
    return {"loss": round(mean, 5), "perplexity": round(math.exp(min(mean, 50)), 4), "tokens": count}


def evaluate(loaded: LoadedRun, run_dir, data: str | None = None, sides=("base", "tuned")) -> dict:
    """Base vs tuned on ``data`` (default: the run's validation split)."""
    spec = loaded.spec
    if data:
        conversations = data_mod.prepare(data, val_size=0).train
    else:
        _, conversations = data_mod.load_split(RunFolder(run_dir).data_dir)
        if not conversations:
            conversations, _ = data_mod.load_split(RunFolder(run_dir).data_dir)
    out = {}
    for side in sides:
        model, context = loaded.model_for(side)
        with loaded.lock, context:
            out[side] = conversation_loss(model, loaded.tokenizer, conversations,
                                          spec.data.system_prompt, spec.data.max_length)
    return out
