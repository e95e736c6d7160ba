"""The halves product: a one-row `nn.Linear` (a decoding step) as one batched product over the two
halves of its weight. Reference: `torch.nn.functional.linear` (≤ 1e-5 of the output's scale).

Why: decoding is bound by reading the weights, and on some CPUs MKL's matrix–vector kernel streams
row-major float32 weights on one thread (~10 GB/s on the 2-core machine this was written on) where
its batched product over two halves reads with both (~19 GB/s; a plain `sum` over the same weights
~20 GB/s): 23 against 40 ms per pass over the embedded model's weights. On other CPUs, torch/MKL
builds or thread settings it does not win, so it is measured at first use (`halves_win`).
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch import Tensor

from mechvis.generation.decoding.memo import VERIFIED


def as_column(x: Tensor) -> Tensor:
    """The one-row input `x` as the halves product reads it: a column with stride in_features, the
    layout that takes MKL's fast batched kernel (lean steps lay it out once per shared input)."""
    width = x.shape[-1]
    return x.reshape(1, width).T.expand(2, width, 1)


def _halves_product(weight: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    """x · weightᵀ + bias for one row `x` (..., in_features) as `torch.bmm` over the weight's two
    halves (2, out/2, in). Must match `torch.nn.functional.linear(x, weight, bias)`."""
    out_features, in_features = weight.shape
    halves = weight.view(2, out_features // 2, in_features)
    y = torch.bmm(halves, as_column(x)).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


class SingleRowLinear(torch.nn.Linear):
    """`nn.Linear` whose one-row float32 products run `_halves_product` (same weights, no copy);
    other inputs take `nn.Linear`'s path. Made by `decoder._unwrapped` where `halves_win`."""

    one_row_halves = True  # what `lean._product` reproduces for one-row inputs

    @staticmethod
    def suits(linear: torch.nn.Linear) -> bool:
        weight = linear.weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape[0] % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != self.in_features or x.dtype != torch.float32:
            return super().forward(x)
        return _halves_product(self.weight, x, self.bias)


def halves_win(root: torch.nn.Module, repeats: int = 3) -> bool:
    """Whether the halves product gives `F.linear`'s one-row products (≤ 1e-5 of the output's scale,
    every weight shape) and a pass over every suitable weight of `root` in module order — what one
    decoding step reads — is ≥ 10% faster (median of `repeats` interleaved passes). The model's own
    weights in order: a product timed on one weight again and again runs from cache, where the
    matrix–vector kernel looks fast (2 of the embedded model's 5 shapes chose halves that way; all 5
    win when streamed). Remembered per set of weight shapes and thread count (`VERIFIED`, "halves")."""
    weights = [module.weight.detach() for module in root.modules()
               if type(module) is torch.nn.Linear and SingleRowLinear.suits(module)]
    if not weights:
        return False
    key = (tuple(sorted(Counter(tuple(weight.shape) for weight in weights).items())), torch.get_num_threads())
    return VERIFIED.verified("halves", key, lambda: _measure(weights, repeats))


def _measure(weights: list[Tensor], repeats: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    inputs = {width: torch.randn(1, 1, width, generator=generator) for width in {weight.shape[1] for weight in weights}}
    with torch.inference_mode():
        equal = True
        for weight in {tuple(weight.shape): weight for weight in weights}.values():
            x = inputs[weight.shape[1]]
            reference = torch.nn.functional.linear(x, weight)
            equal &= bool((_halves_product(weight, x, None) - reference).abs().max() <= 1e-5 * reference.abs().max().clamp_min(1))
        passes = {"linear": lambda weight, x: torch.nn.functional.linear(x, weight),
                  "halves": lambda weight, x: _halves_product(weight, x, None)}
        timings: dict[str, list[float]] = {name: [] for name in passes}
        for repeat in range(repeats + 1):
            for name, product in passes.items():
                start = time.perf_counter()
                for weight in weights:
                    product(weight, inputs[weight.shape[1]])
                if repeat:  # the first pass of each warms up
                    timings[name].append(time.perf_counter() - start)
    median = {name: sorted(values)[len(values) // 2] for name, values in timings.items()}
    return equal and median["halves"] <= 0.9 * median["linear"]
