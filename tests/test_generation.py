"""generate: HF's KV-cached generation plus one teacher-forced analysis pass."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.demo import DEMO_PROMPT, summarise
from mechvis.errors import InvalidArgumentError


def _hf_greedy(reference, prompt_ids, n):
    with torch.no_grad():
        output = reference.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, pad_token_id=2)
    return output[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_greedy_reproduces_hf_and_teacher_forcing_reproduces_the_step_logits(tiny, architecture):
    model, reference = tiny(architecture)
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=12)
    prompt_ids = trace.run.tokens[: trace.prompt_length].tolist()
    assert trace.generated_ids == _hf_greedy(reference, prompt_ids, 12)[: len(trace.generated_ids)]
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    assert (teacher_forced - trace.step_logits.log_softmax(-1)).abs().max() <= 1e-4
    assert trace.run.segments.spans[-1] == mechvis.Span("generated", trace.prompt_length, len(trace.run.tokens))
    assert trace.run.cache["blocks.0.attn.hook_pattern"].shape[-1] == len(trace.run.tokens)
    assert trace.sampled_not_argmax.sum() == 0
    assert (trace.step_distributions.argmax(-1) == torch.tensor(trace.generated_ids)).all()


def test_decoding_skips_the_bridge_wrappers_only_while_no_hook_is_active(tiny):
    """Without hooks, HF's generate runs the wrapped HF modules (shared parameters, identical
    logits, the bridge left intact); with any hook, the bridge itself, so the hook applies."""
    from mechvis.generation import _decoder

    model, _ = tiny("llama")
    mechvis.generate(model, "Once", max_new_tokens=2)  # transformers leaves its output-capturing hooks on HF modules
    assert any(module._forward_hooks or module._forward_pre_hooks for module in model.original_model.modules())
    plain = _decoder(model)
    assert not any("_original_component" in module._modules for module in plain.modules())
    assert {p.data_ptr() for p in plain.parameters()} <= {p.data_ptr() for p in model.parameters()}
    ids = torch.tensor([[1, 504, 282, 4649, 314]])
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=2,
                   output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        fast, bridged = plain.generate(ids, **options), model.original_model.generate(ids, **options)
    assert torch.equal(fast.sequences, bridged.sequences)
    assert (torch.stack(fast.logits) - torch.stack(bridged.logits)).abs().max() <= 1e-5
    assert "_original_component" in model.original_model.model.layers[0]._modules  # the bridge is untouched
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda tensor, hook: seen.append(1))]):
        assert _decoder(model) is model.original_model
        mechvis.generate(model, "Once upon a time", max_new_tokens=3)
    assert len(seen) >= 3  # every decoding step went through the hooked bridge (+ the analysis pass)


@pytest.mark.parametrize("shape", [(96,), (1, 96), (1, 1, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_single_row_linear_matches_a_float64_product(shape, bias):
    """The decoding Linear computes W·x + b for one row (checked in float64) on the same
    parameters; several rows take nn.Linear's own path, bit for bit."""
    from mechvis.generation import _SingleRowLinear, _unwrapped

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    decoding = _unwrapped(torch.nn.Sequential(linear))[0]
    assert type(decoding) is _SingleRowLinear and decoding.weight is linear.weight
    assert type(linear) is torch.nn.Linear  # the model's own module is untouched
    x = torch.randn(shape)
    expected = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
    got = decoding(x)
    assert got.shape == shape[:-1] + (200,)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    rows = torch.randn(3, 96)
    assert torch.equal(decoding(rows), linear(rows))
    odd = torch.nn.Linear(96, 201)
    assert type(_unwrapped(torch.nn.Sequential(odd))[0]) is torch.nn.Linear  # halves need an even width


def test_sampling_follows_the_settings_and_the_seed(tiny):
    model, _ = tiny("llama")
    state = torch.random.get_rng_state()
    first = mechvis.generate(model, "Hello", max_new_tokens=8, temperature=1.3, top_k=5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    again = mechvis.generate(model, "Hello", max_new_tokens=8, temperature=1.3, top_k=5, seed=7)
    assert first.generated_ids == again.generated_ids
    support = (first.step_distributions > 0).sum(-1)
    assert (support <= 5).all() and (support >= 1).all()
    for step, token in enumerate(first.generated_ids):
        assert first.step_distributions[step, token] > 0  # every token came from its distribution
    # Temperature scales the raw logits before truncation.
    expected = (first.step_logits / 1.3).softmax(-1)
    top = expected.topk(5, dim=-1)
    renormalised = top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(first.step_distributions.gather(-1, top.indices), renormalised, atol=1e-5, rtol=1e-4)
    nucleus = mechvis.generate(model, "Hello", max_new_tokens=4, temperature=1.0, top_p=0.5, seed=1)
    kept = nucleus.step_distributions > 0
    raw = nucleus.step_logits.softmax(-1)
    assert ((raw * kept).sum(-1) >= 0.5 - 1e-6).all()


def test_chat_mode_uses_the_template(tiny):
    model, _ = tiny("llama")
    trace = mechvis.generate(model, "Hi there", chat=True, max_new_tokens=3)
    assert trace.run.text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in trace.run.text
    completion = mechvis.generate(model, "Hi there", max_new_tokens=3)
    assert completion.run.text.startswith("Hi there")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, min_p=2.0), "min_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=10_000), "context of 256"),
    ],
)
def test_bad_generation_settings(tiny, options, message):
    model, _ = tiny("llama")
    with pytest.raises(InvalidArgumentError, match=message):
        mechvis.generate(model, "Hello", **options)
    with pytest.raises(InvalidArgumentError, match="empty"):
        mechvis.generate(model, "  ")


@pytest.mark.integration
def test_embedded_greedy_matches_hf_and_the_demo_summary(embedded, embedded_reference):
    trace = mechvis.generate(embedded, DEMO_PROMPT, chat=True, max_new_tokens=40)
    prompt_ids = trace.run.tokens[: trace.prompt_length].tolist()
    assert trace.generated_ids == _hf_greedy(embedded_reference, prompt_ids, 40)[: len(trace.generated_ids)]
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    assert (teacher_forced - trace.step_logits.log_softmax(-1)).abs().max() <= 1e-4
    assert "Monday" in trace.generated_text
    summary = summarise(embedded, trace)
    assert "Generated text:" in summary and "Most focused other heads" in summary and "sinks" in summary
