"""generate: HF's KV-cached generation plus one teacher-forced analysis pass."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

import mechvis
from mechvis.demo import DEMO_PROMPT, summarise
from mechvis.errors import InvalidArgumentError
from mechvis.generation import Recorder, SamplingSettings


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
    from mechvis.generation.decoding.decoder import decoding_model

    model, _ = tiny("llama")
    mechvis.generate(model, "Once", max_new_tokens=2)  # transformers leaves its output-capturing hooks on HF modules
    assert any(module._forward_hooks or module._forward_pre_hooks for module in model.original_model.modules())
    plain = decoding_model(model)
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
        assert decoding_model(model) is model.original_model
        mechvis.generate(model, "Once upon a time", max_new_tokens=3)
    assert len(seen) >= 3  # every decoding step went through the hooked bridge (+ the analysis pass)


@pytest.mark.parametrize("shape", [(96,), (1, 96), (1, 1, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_single_row_linear_matches_a_float64_product(shape, bias):
    """The decoding Linear computes W·x + b for one row (checked in float64) on the same
    parameters; several rows take nn.Linear's own path, bit for bit."""
    from mechvis.generation.decoding.decoder import _unwrapped
    from mechvis.generation.decoding.halves import SingleRowLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    decoding = _unwrapped(torch.nn.Sequential(linear), halves=True, grouped=False)[0]  # whatever this machine measures
    assert type(decoding) is SingleRowLinear and decoding.weight is linear.weight
    assert type(linear) is torch.nn.Linear  # the model's own module is untouched
    x = torch.randn(shape)
    expected = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
    got = decoding(x)
    assert got.shape == shape[:-1] + (200,)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    rows = torch.randn(3, 96)
    assert torch.equal(decoding(rows), linear(rows))
    odd = torch.nn.Linear(96, 201)
    assert type(_unwrapped(torch.nn.Sequential(odd), halves=True, grouped=False)[0]) is torch.nn.Linear  # halves need an even width


def test_the_batched_kernel_is_kept_only_where_it_is_equal_and_faster(monkeypatch):
    import mechvis.generation.decoding.halves
    from mechvis.generation.decoding.decoder import _unwrapped
    from mechvis.generation.decoding.halves import halves_win, SingleRowLinear
    from mechvis.generation.decoding.memo import VERIFIED

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    with VERIFIED.isolated():
        monkeypatch.setattr(mechvis.generation.decoding.halves, "_halves_product", lambda weight, x, bias: torch.nn.functional.linear(x, weight) + 1.0)
        assert not halves_win(model)  # not equal: never chosen, however fast
        assert all(type(layer) is torch.nn.Linear for layer in _unwrapped(model))
    key = (((64, 128), 1), ((128, 64), 1)), torch.get_num_threads()
    with VERIFIED.isolated():
        VERIFIED.remember("halves", key, True)
        assert all(type(layer) is SingleRowLinear for layer in _unwrapped(model))  # measured once per model's shapes, remembered
        with mechvis.config_context(fast_decoding=False):
            assert all(type(layer) is torch.nn.Linear for layer in _unwrapped(model))  # the switch overrides what was measured
    slow = []
    with VERIFIED.isolated():
        monkeypatch.setattr(mechvis.generation.decoding.halves, "_halves_product", lambda weight, x, bias: slow.append(1) or torch.nn.functional.linear(x, weight))
        assert not halves_win(model)  # equal but never faster (it does the same product and more)
        assert len(slow) >= 2 * 3  # every weight, in every timed pass


def test_sampling_follows_the_settings_and_the_seed(tiny):
    model, _ = tiny("llama")
    state = torch.random.get_rng_state()
    first = mechvis.generate(model, "Hello", max_new_tokens=8, sampling=SamplingSettings(temperature=1.3, top_k=5, seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    again = mechvis.generate(model, "Hello", max_new_tokens=8, sampling=SamplingSettings(temperature=1.3, top_k=5, seed=7))
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
    nucleus = mechvis.generate(model, "Hello", max_new_tokens=4, sampling=SamplingSettings(temperature=1.0, top_p=0.5, seed=1))
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
        (dict(sampling=SamplingSettings(temperature=-0.1)), "temperature"),
        (dict(sampling=SamplingSettings(temperature=float("nan"))), "temperature"),
        (dict(sampling=SamplingSettings(temperature=1.0, top_p=0.0)), "top_p"),
        (dict(sampling=SamplingSettings(temperature=1.0, top_p=1.5)), "top_p"),
        (dict(sampling=SamplingSettings(temperature=1.0, top_k=0)), "top_k"),
        (dict(sampling=SamplingSettings(temperature=1.0, min_p=2.0)), "min_p"),
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


# --- hooked KV-cached decoding on every tiny architecture (transformers renamed the cache keyword) ---

TINY = ["llama", "qwen2", "gpt2", "gemma2"]


@pytest.mark.parametrize("architecture", TINY)
@pytest.mark.parametrize("hook", ["identity", "ablation"])
def test_hooked_generation_equals_the_teacher_forced_pass(tiny, architecture, hook):
    """With a hook on the bridge, every KV-cached step must see what a full pass under the same
    hook sees. (transformers 5.24 hands attention the cache as `cache=`, which transformer-lens
    4.3 ignored: each step attended to the new token alone, gaps of ~1 nat.)"""
    from mechvis.interventions import ablate_heads, intervene

    model, _ = tiny(architecture)
    prompt = "Once upon a time there was a little"  # longer than Gemma-2's window of 8
    if hook == "identity":
        context = model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda tensor, hook: tensor)])
    else:
        context = intervene(model, ablate_heads(model, [(1, 0), (2, 3)]))
    with context:
        trace = mechvis.generate(model, prompt, max_new_tokens=12)
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    assert (trace.step_logits.log_softmax(-1) - teacher_forced).abs().max() <= 1e-4


@pytest.mark.parametrize("architecture", TINY)
def test_transformer_lens_generate_decodes_like_hf(tiny, architecture):
    """transformer-lens' own KV-cached `generate` on a model mechvis loaded: HF's greedy tokens."""
    model, reference = tiny(architecture)
    prompt_ids = model.hf_tokenizer.encode("Once upon a time there was a little")
    with torch.no_grad():
        tokens = model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False, stop_at_eos=False,
                                verbose=False, use_past_kv_cache=True)
    assert tokens[0, len(prompt_ids):].tolist() == _hf_greedy(reference, prompt_ids, 10)


def test_an_unknown_cache_keyword_is_refused(tiny, monkeypatch):
    """A transformers release that hands the cache to decoder layers under a new keyword must be
    refused at load time, not decode wrongly."""
    from transformers.models.llama import modeling_llama

    from mechvis.errors import UnsupportedArchitectureError
    from mechvis.models.compat import check

    model, _ = tiny("llama")
    check(model)  # the installed convention is known

    def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, **kwargs):
        raise AssertionError("never run")

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    with pytest.raises(UnsupportedArchitectureError, match="kv_store|keyword"):
        check(model)


# --- sampling is exactly what mechvis's arguments say ---

def _with_shipped_generation_config(model):
    config = model.original_model.generation_config
    config.repetition_penalty = 3.0
    config.no_repeat_ngram_size = 2
    config.temperature = 0.3
    config.top_k = 5
    config.top_p = 0.5
    config.suppress_tokens = [11, 13]
    config.bad_words_ids = [[264]]
    config.min_new_tokens = 3
    return model


def test_a_shipped_generation_config_does_not_change_greedy_decoding(tiny):
    model, reference = tiny("llama")
    _with_shipped_generation_config(model)
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=8)
    assert trace.sampled_not_argmax.sum() == 0
    prompt_ids = trace.run.tokens[: trace.prompt_length].tolist()
    assert trace.generated_ids == _hf_greedy(reference, prompt_ids, 8)[: len(trace.generated_ids)]
    # ... and the model's own generation_config is left as it was
    assert model.original_model.generation_config.repetition_penalty == 3.0


def test_sampling_uses_exactly_the_distribution_asked_for(tiny):
    """At T = 1 with no truncation the distribution is the model's softmax over the whole
    vocabulary: no repetition penalty, no top-k of 50 (HF's default), nothing shipped."""
    model, _ = tiny("llama")
    _with_shipped_generation_config(model)
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=6, sampling=SamplingSettings(temperature=1.0, seed=0))
    torch.testing.assert_close(trace.step_distributions, trace.step_logits.softmax(-1), atol=1e-6, rtol=0)
    assert (trace.step_distributions > 0).all()
    hot = mechvis.generate(model, "Once upon a time", max_new_tokens=6, sampling=SamplingSettings(temperature=0.5, top_k=7, seed=0))
    expected = (hot.step_logits / 0.5).softmax(-1)
    kept = expected.topk(7).indices
    expected = torch.zeros_like(expected).scatter(-1, kept, expected.gather(-1, kept))
    torch.testing.assert_close(hot.step_distributions, expected / expected.sum(-1, keepdim=True), atol=1e-6, rtol=0)


# --- stream_generate ---

def _events_and_trace(stream):
    items = list(stream)
    assert isinstance(items[0], mechvis.PromptEvent)
    assert isinstance(items[-1], mechvis.Trace)
    assert all(isinstance(item, mechvis.TokenEvent) for item in items[1:-1])
    assert list(items[0].token_ids) == items[-1].run.tokens[: items[-1].prompt_length].tolist()
    return items[1:-1], items[-1]


def _assert_events_match(events, trace):
    assert [event.token_id for event in events] == trace.generated_ids
    assert [event.position for event in events] == list(trace.generated_positions)
    assert "".join(event.text for event in events) == trace.generated_text
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].double().log_softmax(-1)
    for event, log_probs, step_distribution, temperature in zip(
        events, teacher_forced, trace.step_distributions, trace.step_temperatures
    ):
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum()
        top = probs.topk(len(event.top_ids))
        assert abs(event.entropy - entropy) <= 1e-4
        assert abs(event.varentropy - (probs * (-log_probs - entropy) ** 2).sum()) <= 1e-4
        assert abs(event.margin - (top.values[0] - top.values[1])) <= 1e-4
        assert abs(event.logprob - log_probs[event.token_id]) <= 1e-4
        assert event.rank == int((log_probs > log_probs[event.token_id]).sum())
        assert list(event.top_ids) == top.indices.tolist()
        assert max(abs(a - b) for a, b in zip(event.top_probs, top.values.tolist())) <= 1e-4
        assert abs(event.probability - float(step_distribution[event.token_id])) <= 1e-5
        assert abs(event.temperature - float(temperature)) <= 1e-6


@pytest.mark.parametrize("case", ["greedy", "sampled", "hooked", "schedule", "processor"])
def test_stream_generate_events_equal_the_teacher_forced_trace(tiny, case):
    from mechvis.generation import EntropyTemperature
    from mechvis.interventions import KeywordBoost, ablate_heads, intervene

    model, _ = tiny("llama")
    options = {
        "greedy": {},
        "sampled": dict(sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=3)),
        "hooked": {},
        "schedule": dict(sampling=SamplingSettings(schedule=EntropyTemperature(), seed=1)),
        "processor": dict(recorders=[KeywordBoost(model, [" banana"], bias=3.0)], sampling=SamplingSettings(temperature=1.0, seed=2)),
    }[case]
    context = intervene(model, ablate_heads(model, [(0, 1)])) if case == "hooked" else contextlib.nullcontext()
    with context:
        events, trace = _events_and_trace(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=10, top_n=5, **options))
    _assert_events_match(events, trace)
    assert trace.stop_reason in ("eos", "max_new_tokens")
    assert all(event.monitor_probability is None for event in events)


def test_stream_generate_with_the_monitor_reports_its_probability(tiny):
    from mechvis.generation import MonitorTemperature

    model, _ = tiny("llama")
    schedule = MonitorTemperature()
    events, trace = _events_and_trace(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=6,
                                                              sampling=SamplingSettings(seed=0, schedule=schedule)))
    _assert_events_match(events, trace)
    for event in events:  # T = low + (high − low)·P
        assert abs(event.temperature - (schedule.low + (schedule.high - schedule.low) * event.monitor_probability)) <= 1e-5


def test_stream_generate_is_cancelled_by_closing_it(tiny):
    model, _ = tiny("llama")
    forwards = []
    handle = model.original_model.get_input_embeddings().register_forward_hook(lambda *args: forwards.append(1))
    try:
        stream = mechvis.stream_generate(model, "Once upon a time", max_new_tokens=100)
        assert isinstance(next(stream), mechvis.PromptEvent)
        first = [next(stream), next(stream)]
        stream.close()
        assert len(forwards) <= 4  # the prompt, the steps yielded, at most one more running when closed
        assert [event.step for event in first] == [0, 1]
        # the model is free again: a new generation runs to the end
        trace = mechvis.generate(model, "Once upon a time", max_new_tokens=3)
        assert len(trace.generated_ids) == 3
    finally:
        handle.remove()


def test_stream_generate_text_holds_back_unfinished_characters():
    """Each event's text is what the token adds to the decoded whole text; a token ending inside
    a multi-byte character adds "" and the one completing it adds the character."""
    from mechvis.generation.trace import _text_deltas

    class Tokenizer:
        pieces = {1: b"a", 2: "東".encode()[:2], 3: "東".encode()[2:], 4: b" b"}

        def decode(self, ids):
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    assert _text_deltas(Tokenizer(), [1, 2, 3, 4]) == ["a", "", "東", " b"]


def test_stream_generate_bad_input(tiny):
    model, _ = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="top_n"):
        next(mechvis.stream_generate(model, "Once", top_n=0))
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        next(mechvis.stream_generate(model, "Once", max_new_tokens=10_000))


def test_trace_and_run_reprs_are_short_summaries(tiny_llama):
    """repr(Trace) / repr(Run): token counts, a text preview and the cache's size — not every
    cache key (a full cache has hundreds)."""
    trace = mechvis.generate(tiny_llama, "Hello there, this is a long prompt " * 4, max_new_tokens=5)
    cache = trace.run.cache
    megabytes = sum(value.numel() * value.element_size() for value in cache.values()) / 2**20
    summary = f"cache {len(list(cache.keys()))} activations, {megabytes:.1f} MB"
    text = repr(trace)
    assert text.startswith(f"Trace({trace.prompt_length} prompt + 5 generated tokens (greedy")
    assert summary in text and "hook_" not in text and len(text) < 300
    run_text = repr(trace.run)
    assert run_text.startswith(f"Run({trace.prompt_length + 5} tokens, text='") and summary in run_text
    assert "…" in run_text and len(run_text) < 300  # the long text is cut


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma2"])
def test_long_prompts_are_prefilled_in_chunks_with_the_same_decoding(tiny, architecture, monkeypatch):
    """Above the score budget, HF's chunked prefill runs (several multi-token forwards, no (heads, N, N)
    score matrix); the tokens and step logits equal one prefill's and HF's own greedy decoding."""
    import mechvis.generation.streaming

    model, reference = tiny(architecture)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    prompt_ids = mechvis.encode(model, prompt).token_ids
    whole = mechvis.generate(model, prompt, max_new_tokens=6)
    lengths = []
    layer = _decoder_layers(model)[0]
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(_hidden(args, kwargs).shape[1]), with_kwargs=True)
    budget = model.cfg.n_heads * len(prompt_ids) * 64 * 4  # 64 queries per chunk
    monkeypatch.setattr(mechvis.generation.streaming, "_PREFILL_SCORE_BYTES", budget)
    try:
        chunked = mechvis.generate(model, prompt, max_new_tokens=6)
    finally:
        handle.remove()
    prefill = [length for length in lengths if 1 < length < len(chunked.run.tokens)]  # not the analysis pass
    assert len(prompt_ids) > 128 and len(prefill) >= 3 and max(prefill) <= 64 and sum(prefill) == len(prompt_ids)
    assert chunked.generated_ids == whole.generated_ids == _hf_greedy(reference, prompt_ids, 6)
    torch.testing.assert_close(chunked.step_logits, whole.step_logits, atol=1e-4, rtol=0)


def _decoder_layers(model):
    inner = model.original_model
    while not hasattr(inner, "layers"):
        inner = inner.model
    layers = inner.layers
    return [layer._modules.get("_original_component", layer) for layer in layers]


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def test_generation_without_the_analysis_pass_keeps_tokens_and_step_logits(tiny):
    model, _ = tiny("llama")
    full = mechvis.generate(model, "Once upon a time", max_new_tokens=5)
    light = mechvis.generate(model, "Once upon a time", max_new_tokens=5, analysis_pass=False)
    assert light.generated_ids == full.generated_ids and light.run.str_tokens == full.run.str_tokens
    assert torch.equal(light.run.tokens, full.run.tokens) and light.run.logits.shape == (len(full.run.tokens), 0)
    assert len(light.run.cache) == 0
    torch.testing.assert_close(light.step_logits, full.step_logits, atol=0, rtol=0)


def test_importing_mechvis_first_sets_how_openmp_threads_wait():
    """`import mechvis` before torch sets OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT=1000 (libgomp
    reads them when torch loads); a user's own setting, or torch loaded first, leaves them alone."""
    import os
    import subprocess
    import sys

    show = "import os; {0}import mechvis; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    clean = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def shown(code, **extra):
        return subprocess.run([sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True,
                              check=True).stdout.split()

    assert shown(show.format("")) == ["ACTIVE", "1000"]
    assert shown(show.format(""), OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "None"]
    assert shown(show.format(""), GOMP_SPINCOUNT="5") == ["None", "5"]
    assert shown(show.format("import torch; ")) == ["None", "None"]


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_grouped_eager_attention_equals_transformers_eager(queries, softcap):
    """Against transformers' own eager functions (Llama's, which repeats keys and values per
    query head, and Gemma-2's, with soft-capping), on random grouped queries and a causal mask."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    from mechvis.generation.decoding.grouped import _grouped_eager_attention

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, keys, head_dim = 6, 2, 9, 8
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.head_dim = heads // kv_heads, head_dim
    query = torch.randn(2, heads, queries, head_dim, generator=generator) * 3
    key, value = (torch.randn(2, kv_heads, keys, head_dim, generator=generator) for _ in range(2))
    visible = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
    mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None].expand(2, 1, queries, keys)
    if softcap is None:
        expected = llama_eager(module, query, key, value, mask, scaling=head_dim**-0.5)
    else:
        expected = gemma2_eager(module, query, key, value, mask, scaling=head_dim**-0.5, softcap=softcap)
    output, weights = _grouped_eager_attention(module, query, key, value, mask, scaling=head_dim**-0.5, softcap=softcap)
    assert weights.shape == (2, heads, queries, keys) and output.shape == (2, queries, heads, head_dim)
    torch.testing.assert_close(weights, expected[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output, expected[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma2"])
def test_grouped_query_decoding_is_used_where_checked_equal(tiny, architecture, monkeypatch):
    """Tiny GQA models (4 query, 2 key/value heads) decode through the grouped attention, with
    greedy tokens and step logits equal to HF's own generate on the untouched model; an attention
    that does not reproduce HF's logits at the first-use check is never used."""
    import mechvis.generation.decoding.grouped
    from mechvis.generation.decoding.decoder import decoding_model
    from mechvis.generation.decoding.grouped import _GROUPED_ATTENTION

    model, reference = tiny(architecture)
    attentions = [module for module in decoding_model(model).modules() if hasattr(module, "num_key_value_groups")]
    assert attentions and all(module.config._attn_implementation == _GROUPED_ATTENTION for module in attentions)
    assert model.original_model.config._attn_implementation == "eager"  # the model itself is unchanged
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=12, analysis_pass=False)
    prompt_ids = mechvis.encode(model, "Once upon a time").token_ids
    with torch.no_grad():
        hf = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=2,
                                output_logits=True, return_dict_in_generate=True)
    assert trace.generated_ids == hf.sequences[0, len(prompt_ids):].tolist()
    hf_log_probs = torch.cat(hf.logits)[: len(trace.generated_ids)].log_softmax(-1)  # the bridge centres the logits
    assert (trace.step_logits.log_softmax(-1) - hf_log_probs).abs().max() <= 1e-4

    model, _ = tiny(architecture, seed=1)  # a fresh model: the check runs again
    monkeypatch.setattr(mechvis.generation.decoding.grouped, "_grouped_eager_attention",
                        lambda module, query, key, value, mask, **kwargs: (torch.zeros_like(query.transpose(1, 2)), None))
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, _GROUPED_ATTENTION, mechvis.generation.decoding.grouped._grouped_eager_attention)
    attentions = [module for module in decoding_model(model).modules() if hasattr(module, "num_key_value_groups")]
    assert all(module.config._attn_implementation == "eager" for module in attentions)


# --- recorders and the deprecated keyword forms ---

def _same_trace(a, b):
    assert a.generated_ids == b.generated_ids
    for name in ("step_logits", "step_distributions", "step_temperatures"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.settings == b.settings and a.stop_reason == b.stop_reason


def _deprecated_cases(model):
    from mechvis.generation import EntropyTemperature, MonitorTemperature, ProcessLogits, find_induction_heads
    from mechvis.interventions import KeywordBoost

    boost = KeywordBoost(model, [" banana"], bias=3.0)
    induction = find_induction_heads(model, threshold=0.0, top=2)
    monitor = MonitorTemperature(induction=induction)
    return {  # old keywords, the new call, what the warning says to pass
        "sampled": (dict(temperature=0.9, top_p=0.95, seed=3), dict(sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=3)),
                    "pass sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=3)"),
        "min_p top_k": (dict(temperature=1.2, top_k=20, min_p=0.05, seed=4),
                        dict(sampling=SamplingSettings(temperature=1.2, top_k=20, min_p=0.05, seed=4)),
                        "pass sampling=SamplingSettings(temperature=1.2, top_k=20, min_p=0.05, seed=4)"),
        "schedule": (dict(temperature_schedule=EntropyTemperature(), seed=1),
                     dict(sampling=SamplingSettings(schedule=EntropyTemperature(), seed=1)), "pass sampling=SamplingSettings(schedule="),
        "monitor": (dict(temperature_schedule=monitor, seed=0), dict(sampling=SamplingSettings(schedule=monitor, seed=0)),
                    "pass sampling=SamplingSettings(schedule=MonitorTemperature"),
        "processors": (dict(logits_processors=[boost]), dict(recorders=[boost]), "pass recorders=[ProcessLogits(processor)"),
        "function": (dict(logits_processors=[_boost_first_token], temperature=1.0, seed=5),
                     dict(recorders=[ProcessLogits(_boost_first_token)], sampling=SamplingSettings(temperature=1.0, seed=5)),
                     "pass recorders=[ProcessLogits(processor)"),
    }


def _boost_first_token(input_ids, scores):
    return scores + 5.0 * torch.nn.functional.one_hot(torch.tensor([3]), scores.shape[-1])


def test_deprecated_keywords_warn_and_give_identical_traces(tiny):
    from mechvis.errors import MechvisDeprecationWarning

    model, _ = tiny("llama")
    for name, (old, new, message) in _deprecated_cases(model).items():
        with pytest.warns(MechvisDeprecationWarning, match=re.escape(message)):
            deprecated = mechvis.generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False, **old)
        _same_trace(deprecated, mechvis.generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False, **new))
        with pytest.warns(MechvisDeprecationWarning, match=r"stream_generate\(.*\) is deprecated"):
            old_items = list(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False, **old))
        new_items = list(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False, **new))
        assert old_items[:-1] == new_items[:-1], name  # the prompt event and every token event, value for value
        _same_trace(old_items[-1], new_items[-1])


def test_the_new_calls_do_not_warn(tiny):
    import warnings

    from mechvis.generation import EntropyTemperature

    model, _ = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechvis.generate(model, "Hello", max_new_tokens=2, sampling=SamplingSettings(schedule=EntropyTemperature(), seed=1),
                         analysis_pass=False)


def test_bad_sampling_and_recorders(tiny):
    from mechvis.generation import ProcessLogits

    model, _ = tiny("llama")
    cases = [
        (dict(sampling=0.7), InvalidArgumentError, r"sampling must be a mechvis.SamplingSettings.*got 0\.7"),
        (dict(sampling=SamplingSettings(temperature=0.5), temperature=0.7), InvalidArgumentError, "sampling settings once"),
        (dict(recorders=5), InvalidArgumentError, r"recorders must be a list.*got 5"),
        (dict(recorders=[_boost_first_token]), InvalidArgumentError, r"recorder 0 is not.*ProcessLogits\(f\)"),
        (dict(recorders=ProcessLogits(_boost_first_token)), InvalidArgumentError, r"pass \[recorder\]"),
        (dict(recorders=[ProcessLogits(lambda ids, scores: None)]), InvalidArgumentError, "returned None"),
        (dict(temprature=0.7), TypeError, "unexpected keyword argument 'temprature'"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            mechvis.generate(model, "Hello", max_new_tokens=2, **options)
    with pytest.raises(InvalidArgumentError, match="not callable"):
        ProcessLogits(3)
    settings = SamplingSettings(temperature=np.float32(0.5), top_k=np.int64(3))
    mechvis.generate(model, "Hello", max_new_tokens=2, sampling=settings, analysis_pass=False)
    assert type(settings.temperature) is np.float32  # the caller's settings are not changed


def test_the_prompt_event_comes_first(tiny):
    model, _ = tiny("llama")
    prompt = "Tokyo 東京 is great 🎉"
    stream = mechvis.stream_generate(model, prompt, max_new_tokens=3)
    event = next(stream)
    stream.close()
    assert isinstance(event, mechvis.PromptEvent)
    run = mechvis.run(model, prompt, names_filter=lambda name: False)
    assert list(event.token_ids) == run.tokens.tolist() and list(event.str_tokens) == run.str_tokens
    assert event.segments == mechvis.encode(model, prompt).segments and event.max_new_tokens == 3
    # fit_context: more tokens than fit decode until the context is full, and the event says how many
    room = model.cfg.n_ctx - len(event.token_ids)
    *_, trace = stream = list(mechvis.stream_generate(model, prompt, max_new_tokens=room + 50, fit_context=True,
                                                      analysis_pass=False))
    assert stream[0].max_new_tokens == room and len(trace.generated_ids) <= room
    with pytest.raises(InvalidArgumentError, match="context"):
        next(mechvis.stream_generate(model, prompt, max_new_tokens=room + 1))


class _Everything(Recorder):
    """Records every callback, and counts its hooks' calls."""

    def __init__(self, where):
        self.where, self.calls, self.steps, self.hooked = where, [], [], 0

    def start(self, model, prompt):
        self.calls.append(("start", prompt))

    def _hook(self, *args, **kwargs):
        self.hooked += 1

    def hook_points(self, model):
        return [("blocks.0.hook_resid_post", self._hook)] if self.where == "bridge" else []

    def module_hooks(self, model, *, bridge):
        if self.where == "bridge":
            return [] if bridge else None  # None: this recorder needs the bridge
        return [(model.blocks[0]._modules["_original_component"], self._hook)]  # the HF decoder layer

    def step(self, event):
        self.steps.append(event)

    def finish(self, trace):
        self.calls.append(("finish", trace))

    @property
    def result(self):
        return len(self.steps)


@pytest.mark.parametrize("where", ["bridge", "modules"])
def test_a_user_recorder_sees_every_step(tiny, where):
    from mechvis.generation.decoding import decoder

    model, _ = tiny("llama")
    recorder = _Everything(where)
    decoders = []
    original = decoder.decoding_model
    with pytest.MonkeyPatch.context() as patch:  # which model the decode runs
        patch.setattr("mechvis.generation.streaming.decoding_model", lambda *a, **k: decoders.append(original(*a, **k)) or decoders[-1])
        items = list(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=5, recorders=[recorder],
                                             sampling=SamplingSettings(temperature=1.0, seed=0)))
    prompt, events, trace = items[0], items[1:-1], items[-1]
    assert recorder.calls == [("start", prompt), ("finish", trace)]
    assert recorder.steps == events and recorder.result == len(trace.generated_ids) == 5
    assert recorder.hooked == len(events)  # one forward per decoded token; removed before the analysis pass
    assert decoders[0] is not model.original_model  # no intervention: the fast path was offered ...
    plain = mechvis.generate(model, "Once upon a time", max_new_tokens=5, sampling=SamplingSettings(temperature=1.0, seed=0))
    torch.testing.assert_close(trace.run.logits, plain.run.logits, atol=0, rtol=0)  # the analysis pass runs without hooks
    if where == "modules":  # recording on the HF modules changes nothing: the same fast decode
        _same_trace(trace, plain)
    else:  # ... which a hook-point hook leaves for the bridge: the same logits up to rounding
        assert trace.generated_ids == plain.generated_ids
        torch.testing.assert_close(trace.step_logits, plain.step_logits, atol=1e-4, rtol=0)


def test_a_logits_step_steers_exactly_as_the_processor(tiny):
    """A recorder whose logits step changes the scores samples exactly as the same function
    given as a logits processor (and KeywordBoost as a recorder as as a processor)."""
    import warnings

    from mechvis.generation import ProcessLogits
    from mechvis.interventions import KeywordBoost

    model, _ = tiny("llama")
    settings = SamplingSettings(temperature=0.8, top_k=40, seed=11)

    class Boost(Recorder):
        logits_step = staticmethod(_boost_first_token)

    boost = KeywordBoost(model, [" banana", " apple"], bias=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = mechvis.generate(model, "Once upon a time", max_new_tokens=8, sampling=settings,
                                     logits_processors=[_boost_first_token, boost])
    for recorders in ([Boost(), boost], [ProcessLogits(_boost_first_token), ProcessLogits(boost)]):
        steered = mechvis.generate(model, "Once upon a time", max_new_tokens=8, sampling=settings, recorders=recorders)
        _same_trace(steered, processed)
    plain = mechvis.generate(model, "Once upon a time", max_new_tokens=8, sampling=settings, analysis_pass=False)
    assert not torch.equal(plain.step_distributions, processed.step_distributions)  # the steps did steer


def test_the_monitor_as_a_recorder(tiny, streamed_features):
    from mechvis.analysis.repetition import repetition_features
    from mechvis.generation import MonitorRecorder, RepetitionMonitor, find_induction_heads

    model, _ = tiny("llama")
    induction = find_induction_heads(model, threshold=0.0, top=3)
    monitor = RepetitionMonitor([0.0] * 8, [1.0] * 8, [0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0], -1.0)
    recorder = MonitorRecorder(monitor, induction)
    items = list(mechvis.stream_generate(model, "one two one two one two", max_new_tokens=8, recorders=[recorder]))
    events, trace = items[1:-1], items[-1]
    assert streamed_features.paths == ["modules"]  # the HF modules' fast path
    assert [event.monitor_probability for event in events] == recorder.result.tolist() == recorder.probabilities
    torch.testing.assert_close(recorder.result, monitor.score(repetition_features(model, trace, induction)), atol=1e-5, rtol=0)
    _same_trace(trace, mechvis.generate(model, "one two one two one two", max_new_tokens=8))  # greedy, as without it
