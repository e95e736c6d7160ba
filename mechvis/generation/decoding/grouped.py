"""Grouped-query eager attention without `repeat_kv`. Reference: transformers'
`eager_attention_forward` (Llama's, and Gemma-2's with soft-capping), to ≤ 1e-4 of a model's
logits (`decoder._grouped_attention_equal`, checked per model at first use).

Why: HF's eager attention copies every cached key and value once per query head of its group at
every step (30 layers × 2 × 9 heads × N × 64 floats for the embedded model: ~70 MB written per
token at N = 500, as long as its weight products took in a profile).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers import AttentionInterface

_GROUPED_ATTENTION = "mechvis_grouped_eager"


def groups_queries(module: torch.nn.Module) -> bool:
    """An HF attention module with grouped-query attention (more query than key/value heads)
    that runs transformers' eager attention."""
    config = getattr(module, "config", None)
    return (getattr(module, "num_key_value_groups", 1) > 1 and hasattr(config, "_attn_implementation_internal")
            and config._attn_implementation == "eager")


def grouped_config(config):
    """A shallow copy of an attention module's config selecting `_grouped_eager_attention` (on the
    copy only: the model and its other modules keep "eager", and so eager's masks). The function
    is registered with transformers' `AttentionInterface` here, at first use, not at import."""
    if _GROUPED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GROUPED_ATTENTION, _grouped_eager_attention)
    clone = copy.copy(config)
    object.__setattr__(clone, "_attn_implementation_internal", _GROUPED_ATTENTION)  # this copy only, no sub-configs
    return clone


def _grouped_eager_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """transformers' `eager_attention_forward` (scores · scaling, optional tanh soft-capping,
    additive mask, float32 softmax; returns the output (batch, query, head, head_dim) and the
    weights (batch, head, query, key)) for grouped queries: each key/value head's queries are one
    batch of rows of a single product, instead of keys and values repeated per query head."""
    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if scaling is None:
        scaling = module.head_dim**-0.5
    rows = query.reshape(batch, kv_heads, heads // kv_heads * queries, head_dim)  # head h uses key head h // group
    scores = torch.matmul(rows, key.transpose(2, 3)).view(batch, heads, queries, keys) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :keys]
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.view(batch, kv_heads, -1, keys), value).view(batch, heads, queries, head_dim)
    return output.transpose(1, 2).contiguous(), weights
