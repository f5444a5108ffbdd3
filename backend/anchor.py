"""The ``mix_kl`` term's targets: the base model's next-token distributions on the mixed rows.

``mix_kl`` pulls the tuned model's next-token distribution towards the base model's on the learned
tokens of mixed-in general rows (``backend.replay``). The base's side of that never changes while
training, so ``targets`` computes it once, before the first step, instead of running the base
forward at every step (which took about a third of a default LoRA run on CPU). For LoRA/QLoRA the
base is the model with its adapter switched off; for full fine-tuning, the model before training,
so no frozen copy of the weights is kept in memory either.

A distribution over the whole vocabulary per token would not fit in memory (49,152 floats for
SmolLM2, 151,936 for Qwen), so each position keeps the base's ``K`` most likely tokens and their
log-probabilities. ``kl`` is then the KL divergence between the two distributions coarsened to
those ``K`` tokens plus one bucket for the rest of the vocabulary: a lower bound of the full KL
that equals it when the ``K`` tokens hold all the mass (tested).

No library fits: TRL's distillation trainers (GKD) run the teacher at every step.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import template

K = 128
CHUNK_TOKENS = 512  # tokens per forward: at most this many vocabulary-wide rows of logits are held at once


def learned_positions(labels: list[int]) -> list[int]:
    """Positions whose logits predict a learned token (``labels[t + 1]`` is learned)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != template.IGNORE_INDEX]


@torch.no_grad()
def targets(model, examples, k: int = K) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """For each example with ``mixed`` set, ``(ids, logp)``: the base model's ``k`` most likely next
    tokens at each learned position (``learned_positions``) and their log-probabilities, shape
    ``(positions, k)``, on the CPU; None for the other examples. ``model``: a peft model (its adapter
    is switched off) or the plain base model. Examples are packed as in training (``position_ids``
    restarting per example), up to ``CHUNK_TOKENS`` tokens per forward (a longer example alone)."""
    out: list = [None] * len(examples)
    todo = [i for i, e in enumerate(examples) if e.get("mixed")]
    if not todo:
        return out
    was_training = model.training
    model.eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    device = next(model.parameters()).device
    try:
        with off:
            start = 0
            while start < len(todo):
                chunk, n = [], 0
                while start < len(todo) and (not chunk or n + len(examples[todo[start]]["input_ids"]) <= CHUNK_TOKENS):
                    chunk.append(todo[start])
                    n += len(examples[todo[start]]["input_ids"])
                    start += 1
                _chunk_targets(model, examples, chunk, k, device, out)
    finally:
        model.train(was_training)
    return out


def _chunk_targets(model, examples, chunk: list[int], k: int, device, out: list) -> None:
    ids, positions, keep, spans = [], [], [], []
    for i in chunk:
        e = examples[i]
        offset = len(ids)
        learned = learned_positions(e["labels"])
        keep += [offset + t for t in learned]
        spans.append((i, len(learned)))
        ids += e["input_ids"]
        positions += e.get("position_ids") or list(range(len(e["input_ids"])))
    logits = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                   logits_to_keep=torch.tensor(keep, device=device), use_cache=False).logits[0]
    logp, top = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    logp, top = logp.cpu(), top.to(torch.int32).cpu()
    at = 0
    for i, n in spans:
        out[i] = (top[at:at + n], logp[at:at + n])
        at += n


def kl(tuned_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || tuned) over positions, coarsened to the base's top tokens ``ids`` (with
    log-probabilities ``logp``, both ``(positions, k)``) and one bucket for the rest of the
    vocabulary. ``tuned_logits``: ``(positions, vocabulary)``."""
    tuned = torch.log_softmax(tuned_logits.float(), dim=-1).gather(-1, ids.long())
    p = logp.exp()
    top = (p * (logp - tuned)).sum()
    # the rest of the vocabulary: 1 - (mass of the top tokens), on each side
    rest_p = (-torch.expm1(torch.logsumexp(logp, dim=-1))).clamp_min(0)
    log_rest_q = torch.log((-torch.expm1(torch.logsumexp(tuned, dim=-1))).clamp_min(1e-12))
    return top + (torch.xlogy(rest_p, rest_p) - rest_p * log_rest_q).sum()
