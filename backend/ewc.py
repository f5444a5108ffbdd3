"""Elastic weight consolidation (Kirkpatrick et al. 2017) against forgetting in full fine-tuning.

Before training, the base model's gradients on a sample of general data give the diagonal of the
(empirical) Fisher information, ``F_i = mean over rows of (dL/dθ_i)^2``: how much the general-data
loss cares about each weight. Training then adds

    penalty = ewc_lambda / 2 * Σ_i F_i (θ_i - θ*_i)^2

to the loss, with ``θ*`` the base weights, so the weights that general knowledge leans on move
least. Costs two extra fp32 copies of the trainable weights (``θ*`` and ``F``) and one backward
pass per sampled row up front. LoRA and QLoRA keep the base frozen and need none of this.
"""

from __future__ import annotations

import torch


def active(spec) -> bool:
    """Whether a run of ``spec`` trains with the penalty: full fine-tuning, SFT, ``ewc_lambda`` > 0,
    and general data to weigh the weights by (``mix_data``; turned off with it, as ``mix_kl`` is)."""
    return (spec.model.method == "full" and spec.model.stage == "sft" and bool(spec.train.ewc_lambda)
            and bool(spec.data.mix_data))


class EWC:
    def __init__(self, model, rows: list[dict], strength: float):
        """``rows``: tokenized examples (``input_ids``, ``labels``) of general data."""
        self.strength = strength
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone().float() for n, p in self.params.items()}
        self.fisher = fisher_diagonal(model, self.params, rows)

    def penalty(self) -> torch.Tensor:
        total = None
        for name, p in self.params.items():
            term = (self.fisher[name] * (p.float() - self.anchor[name]) ** 2).sum()
            total = term if total is None else total + term
        return self.strength / 2 * total


def fisher_diagonal(model, params: dict, rows: list[dict]) -> dict:
    """Mean squared gradient of each parameter, one row at a time (gradients are left zeroed)."""
    was_training = model.training
    model.eval()  # no dropout: the base model as it answers
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for row in rows:
        device = next(model.parameters()).device
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor([row["labels"]], device=device)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(len(rows), 1) for n, f in fisher.items()}
