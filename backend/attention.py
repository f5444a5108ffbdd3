"""Attention for packed training batches: each example attends to itself, one example at a time.

Training batches are packed (``DataCollatorWithFlattening``): one row of concatenated examples
whose ``position_ids`` restart at 0 where an example starts. Under transformers' ``sdpa``, such a
row gets a block-diagonal s x s mask, which SDPA expands to a float tensor in every layer, keeps
for backward, and computes over all s x s (query, key) pairs, although only the pairs inside an
example count; with a mask it also repeats k and v to every head. ``packed_sdpa`` instead runs
causal SDPA (``is_causal``, no mask, grouped-query attention native) on each example's slice:
the same output (tests/test_attention.py), and the work grows with the examples' lengths, not the
packed row's. Measured on 2 CPU cores (SmolLM2-135M shapes, forward + backward of one layer):
8 examples of ~106 tokens, 51 ms masked vs 11 ms per example; 4 of ~390 tokens, 169 vs 50 ms.

It is registered with transformers' ``AttentionInterface`` under ``NAME``, with SDPA's own mask
function, so every batch that is not a packed row (padded evaluation, generation with a cache)
goes to transformers' ``sdpa`` unchanged. ``use_packed_attention(model)`` switches a model
that uses ``sdpa``; training does it (``train._setup_model``). A saved config does not record the
switch, so a trained model loads with ``sdpa`` (tested).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"
_bounds_of: tuple = (None, None)  # (position_ids, bounds): every layer of one forward sees the same tensor


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; query/key/value are (batch, heads, seq, dim).
    A sliding-window layer (Mistral, some Qwen2 layers) takes transformers' sdpa, whose mask
    carries the window."""
    bounds = None if kwargs.get("sliding_window") else _example_bounds(module, query, key, kwargs.get("position_ids"))
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling,
            is_causal=True, enable_gqa=gqa)
        for a, b in bounds
    ], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _example_bounds(module, query, key, position_ids) -> list[tuple[int, int]] | None:
    """[(start, end)] of each example in a packed row, or None when this is not one."""
    global _bounds_of
    if (position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1
            or query.shape[2] != key.shape[2] or query.shape[2] < 2 or not getattr(module, "is_causal", True)):
        return None
    if _bounds_of[0] is not position_ids:
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        n = position_ids.shape[1]
        bounds = list(zip(starts, starts[1:] + [n])) if len(starts) > 1 and starts[0] == 0 else None
        _bounds_of = (position_ids, bounds)
    return _bounds_of[1]


def use_packed_attention(model) -> bool:
    """Switch a model on transformers' ``sdpa`` to ``packed_sdpa``; True if it was switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False  # eager, flash-attention (which handles packing itself), or a custom model
    model.set_attn_implementation(NAME)
    return True


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)
