"""CPU kernels for decoding: the halves product (one-row `nn.Linear` as a batched product over the
weight's two halves) and grouped-query eager attention without `repeat_kv`."""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import AttentionInterface

from mechvis.generation.decoding.lean import _column

if TYPE_CHECKING:
    pass

_GROUPED_ATTENTION = "mechvis_grouped_eager"


def _groups_queries(module: "torch.nn.Module") -> bool:
    """An HF attention module with grouped-query attention (more query than key/value heads)
    that runs transformers' eager attention."""
    config = getattr(module, "config", None)
    return (getattr(module, "num_key_value_groups", 1) > 1 and hasattr(config, "_attn_implementation_internal")
            and config._attn_implementation == "eager")


def _grouped_config(config):
    """A shallow copy of an attention module's config selecting `_grouped_eager_attention` (set
    on the copy only: the model and its other modules keep "eager", and so eager's masks)."""

    if _GROUPED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GROUPED_ATTENTION, _grouped_eager_attention)
    clone = copy.copy(config)
    object.__setattr__(clone, "_attn_implementation_internal", _GROUPED_ATTENTION)  # this copy only, no sub-configs
    return clone


def _grouped_eager_attention(
    module: "torch.nn.Module",
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (scores · scaling, optional tanh soft-capping, additive mask,
    float32 softmax; returns the output and the weights (batch, head, query, key)) for grouped-
    query attention, without `repeat_kv`: HF's eager copies every cached key and value once per
    query head in the group at every step (30 layers × 2 × 9 heads × N × 64 floats for the
    embedded model: ~70 MB written per token at N = 500, as long as its weight products took in
    a profile). Here each key/value head's queries are one batch of rows of a single product."""
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






class _SingleRowLinear(torch.nn.Linear):
    """`nn.Linear` whose one-row products (a decoding step) run as a batched matrix product over
    the two halves of the weight. Decoding is bound by reading the weights, and on some CPUs
    MKL's matrix–vector kernel streams row-major float32 weights from memory on one thread
    (~10 GB/s on the 2-core machine this was written on) where its batched product over two
    halves reads with both (~19 GB/s, against ~20 GB/s for a plain `sum` over the same weights);
    on others (or another torch/MKL build, other thread settings) it does not. So the swap is
    checked at first use for each model and thread count (`_halves_win`): it is kept only where
    it gives the same products (≤ 1e-5 of the output's scale) and a pass over all the model's
    weights is at least 10% faster, measured on this machine; otherwise every layer stays
    `nn.Linear`. Same weights, no copy. Other inputs take `nn.Linear`'s path."""

    one_row_halves = True  # what `mechvis.generation.decoding.lean._product` reproduces for one-row inputs

    @staticmethod
    def suits(linear: torch.nn.Linear) -> bool:
        weight = linear.weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape[0] % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != self.in_features or x.dtype != torch.float32:
            return super().forward(x)
        return _halves_product(self.weight, x, self.bias)


def _halves_product(weight: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    out_features, in_features = weight.shape
    halves = weight.view(2, out_features // 2, in_features)
    # x as a column whose stride is in_features: this layout takes MKL's fast batched kernel
    # (`_column`, which lean decoding steps lay out once per shared input: one definition).
    y = torch.bmm(halves, _column(x)).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


_KERNEL_CHOICE: dict[tuple, bool] = {}


def _halves_win(root: "torch.nn.Module", repeats: int = 3) -> bool:
    """Whether the halves product gives the same one-row products as `F.linear` (≤ 1e-5 of the
    output's scale, for every weight shape) and a pass over every suitable weight of `root` in
    module order — what one decoding step reads — is at least 10% faster (median of `repeats`
    interleaved passes). Timing the model's own weights in order matters: a decoding step streams
    them from memory, and a product timed on one weight over and over runs from cache, where
    the one-thread matrix–vector kernel looks fast (it was: 2 of the embedded model's 5 shapes
    chose halves that way, all 5 win when streamed, 23 vs 40 ms per pass). Measured once per
    set of weight shapes and thread count per process."""

    weights = [module.weight.detach() for module in root.modules()
               if type(module) is torch.nn.Linear and _SingleRowLinear.suits(module)]
    if not weights:
        return False
    key = (tuple(sorted(Counter(tuple(weight.shape) for weight in weights).items())), torch.get_num_threads())
    if key in _KERNEL_CHOICE:
        return _KERNEL_CHOICE[key]
    generator = torch.Generator().manual_seed(0)
    inputs = {width: torch.randn(1, 1, width, generator=generator) for width in {weight.shape[1] for weight in weights}}
    with torch.inference_mode():
        equal = True
        for weight in {tuple(weight.shape): weight for weight in weights}.values():
            x = inputs[weight.shape[1]]
            reference = torch.nn.functional.linear(x, weight)
            equal &= bool((_halves_product(weight, x, None) - reference).abs().max() <= 1e-5 * reference.abs().max().clamp_min(1))
        passes = {"linear": lambda weight, x: torch.nn.functional.linear(x, weight), "halves": lambda weight, x: _halves_product(weight, x, None)}
        timings: dict[str, list[float]] = {name: [] for name in passes}
        for repeat in range(repeats + 1):
            for name, product in passes.items():
                start = time.perf_counter()
                for weight in weights:
                    product(weight, inputs[weight.shape[1]])
                if repeat:  # the first pass of each warms up
                    timings[name].append(time.perf_counter() - start)
    median = {name: sorted(values)[len(values) // 2] for name, values in timings.items()}
    _KERNEL_CHOICE[key] = wins = equal and median["halves"] <= 0.9 * median["linear"]
    return wins
