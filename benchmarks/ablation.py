"""Head-ablation sweep over every layer × head of the embedded model: batched (16 ablations per
forward pass) against one forward pass per head."""

from __future__ import annotations

import time

import torch

import mechvis
from mechvis.interventions import ablate_heads, ablation_sweep, intervene, target_probability

PROMPT = "The Eiffel Tower is in the city of"


def main() -> None:
    model = mechvis.load_model(device="cpu")
    tokens = mechvis.run(model, PROMPT, names_filter=[]).tokens
    metric = target_probability(model, " Paris")
    start = time.perf_counter()
    sweep = ablation_sweep(model, tokens, metric, batch_size=16)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    single = torch.empty_like(sweep.effect)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                with intervene(model, ablate_heads(model, [(layer, head)])):
                    single[layer, head] = metric(model(tokens[None]))[0] - sweep.baseline
    one_by_one = time.perf_counter() - start
    assert torch.allclose(single, sweep.effect, atol=1e-5)
    heads = model.cfg.n_layers * model.cfg.n_heads
    print(f"ablation sweep of {heads} heads ({len(tokens)} tokens): batched {batched:.1f} s, one forward per head "
          f"{one_by_one:.1f} s, ratio {one_by_one / batched:.1f}× (target ≥ 3×)")
