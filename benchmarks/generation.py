"""128 new tokens on the embedded model: mechvis's full trace (KV-cached generate + one teacher-forced
analysis pass with every activation cached) against the limit (plain HF generate + one plain forward
with attentions and hidden states) and against recomputing the whole prefix with
output_attentions=True at every step (the per-step approach). Both baselines run a plain HF model
loaded separately from the same weights (eager attention, as attention outputs need) through HF's
own modules; mechvis decodes with its single-row Linear (see `mechvis.generation._decoder`)."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

import mechvis
from mechvis.models import embedded_model_dir
from mechvis.demo import DEMO_PROMPT

N_NEW = 128


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    model = mechvis.load_model(device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), attn_implementation="eager").eval()
    prompt_ids = torch.tensor([mechvis.encode(model, DEMO_PROMPT, chat=True).token_ids])
    mechvis.generate(model, DEMO_PROMPT, chat=True, max_new_tokens=4)  # warm-up

    ours, trace = _timed(lambda: mechvis.generate(model, DEMO_PROMPT, chat=True, max_new_tokens=N_NEW))
    n_new = len(trace.generated_ids)

    def limit():
        with torch.no_grad():
            sequence = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n_new,
                                   min_new_tokens=n_new, do_sample=False, pad_token_id=2)
            hf(sequence, output_attentions=True, output_hidden_states=True)
        return sequence

    baseline, _ = _timed(limit)

    def per_step():
        sequence = prompt_ids
        with torch.no_grad():
            for _ in range(n_new):
                output = hf(sequence, output_attentions=True, output_hidden_states=True)
                sequence = torch.cat([sequence, output.logits[:, -1:].argmax(-1)], dim=1)
        return sequence

    recompute, _ = _timed(per_step)
    print(f"generation of {n_new} tokens + analysis on the embedded model:")
    print(f"  mechvis trace {ours:.1f} s; HF generate + one forward {baseline:.1f} s: ratio {ours / baseline:.2f}× (target ≤ 1.5×)")
    print(f"  per-step recompute with attentions {recompute:.1f} s: mechvis is {recompute / ours:.1f}× faster (target ≥ 5×)")
