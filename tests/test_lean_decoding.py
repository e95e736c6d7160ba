"""Lean decoding steps (`mechvis.generation.decoding.lean`) and the preallocated KV cache (`.cache`), against
transformers' own models: teacher-forced full forwards without a cache (eager, float32) and HF
`generate` with its default cache."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechvis
from mechvis.generation.decoding import decoding_stats
from mechvis.generation.decoding import lean as lean_decoding
from mechvis.generation.decoding.cache import _preallocated_layer, preallocated_cache
from mechvis.generation.decoding.lean import _plan, lean_decoding_equal, with_lean_steps
from mechvis.generation.decoding.memo import VERIFIED

from .tiny import tiny_config, tiny_hf_model


def _mistral(sliding_window=None, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=49_152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=sliding_window, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return MistralForCausalLM(config).eval()


def _qwen2_with_bias():
    model = tiny_hf_model("qwen2", seed=1)
    with torch.no_grad():  # random biases: the tiny model's start at zero
        for layer in model.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                linear.bias.normal_(0, 0.5)
    return model


def _lean_steps() -> int:
    """Single-token steps the lean path has computed in this process (`decoding_stats`)."""
    return decoding_stats().get("lean_steps", 0)


MODELS = {"llama": lambda: tiny_hf_model("llama"), "qwen2": _qwen2_with_bias, "mistral": _mistral}


def _teacher_forced(reference, ids):
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _close(logits, expected, tolerance=1e-4):
    """Equal log-probabilities: a loaded model's unembedding is centred (transformer-lens'
    weight processing), which shifts each row of logits by a constant."""
    difference = logits.log_softmax(-1) - expected.log_softmax(-1)
    return bool(difference.abs().max() <= tolerance)


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_generation_takes_lean_steps_with_the_logits_of_a_full_hf_forward(tokenizer, architecture):
    hf_model = MODELS[architecture]()
    reference = copy.deepcopy(hf_model)
    model = mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
    before = _lean_steps()
    trace = mechvis.generate(model, "The history of the printing press begins in Mainz, where", max_new_tokens=12)
    assert _lean_steps() - before >= len(trace.generated_ids) - 1  # the path taken
    ids = trace.run.tokens.tolist()
    full = _teacher_forced(reference, ids)[trace.prompt_length - 1 : -1]
    assert _close(trace.step_logits, full)
    with torch.no_grad():
        hf = reference.generate(torch.tensor([ids[: trace.prompt_length]]), max_new_tokens=12, do_sample=False,
                                attention_mask=torch.ones(1, trace.prompt_length, dtype=torch.long), pad_token_id=2)
    assert trace.generated_ids == hf[0, trace.prompt_length :].tolist()[: len(trace.generated_ids)]


def test_sampled_streams_are_the_same_with_and_without_lean_steps(tokenizer, monkeypatch):
    model = mechvis.load_model(tiny_hf_model("llama", seed=3), tokenizer=tokenizer, device="cpu")
    options = dict(max_new_tokens=20, temperature=1.3, top_p=0.95, seed=7, analysis_pass=False)
    before = _lean_steps()
    lean = list(mechvis.stream_generate(model, "Once upon a time", **options))
    assert _lean_steps() > before
    monkeypatch.setattr(mechvis.generation.decoding.decoder, "with_lean_steps", lambda decoder: None)
    before = _lean_steps()
    plain = list(mechvis.stream_generate(model, "Once upon a time", **options))
    assert _lean_steps() == before
    assert lean[0] == plain[0]  # the prompt event
    assert [event.token_id for event in lean[1:-1]] == [event.token_id for event in plain[1:-1]]
    assert (lean[-1].step_logits - plain[-1].step_logits).abs().max() <= 1e-5


def _decode(decoder, ids, prefill, capacity=None, **step_options):
    """Prefill `prefill` tokens, then decode the rest one at a time; the stacked step logits."""
    name, cache = preallocated_cache(decoder, capacity or len(ids))
    tokens = torch.tensor([ids])
    ones = torch.ones_like(tokens)
    with torch.inference_mode():
        decoder(input_ids=tokens[:, :prefill], attention_mask=ones[:, :prefill], use_cache=True, **{name: cache})
        return torch.cat([
            decoder(input_ids=tokens[:, position : position + 1], attention_mask=ones[:, : position + 1], use_cache=True,
                    **{name: cache}, **step_options).logits[0]
            for position in range(prefill, len(ids))
        ])


IDS = [1, 504, 282, 4649, 314, 260, 2328, 28, 216, 9030, 9863, 30, 657, 3600, 355, 17, 99, 4012]


@pytest.mark.parametrize("capacity", [None, 9])  # 9: the storage grows (doubles) mid-decoding
@pytest.mark.parametrize("halves", [False, True])  # F.linear, or the layers as `SingleRowLinear`s
def test_a_lean_step_gives_a_full_forwards_logits_on_a_plain_hf_model(capacity, halves):
    from mechvis.generation.decoding.halves import SingleRowLinear
    from mechvis.generation.decoding.decoder import _unwrapped

    hf_model = tiny_hf_model("llama", seed=5)
    decoder = _unwrapped(hf_model, halves=halves, grouped=False)
    assert any(type(module) is SingleRowLinear for module in decoder.modules()) == halves
    lean = with_lean_steps(decoder)
    assert lean is not None and lean.model is not hf_model.model and hf_model.model.forward.__func__ is type(hf_model.model).forward
    assert lean.model.__dict__["_mechvis_lean_plan"].halves == halves
    before = _lean_steps()
    stepped = _decode(lean, IDS, prefill=6, capacity=capacity)
    assert _lean_steps() - before == len(IDS) - 6
    full = _teacher_forced(hf_model, IDS)[6:]
    assert (stepped - full).abs().max() <= 1e-5 * full.abs().max()


def test_a_step_with_a_hook_or_capture_runs_hfs_forward(tokenizer):
    hf_model = tiny_hf_model("llama", seed=5)
    lean = with_lean_steps(hf_model)
    seen = []
    handle = hf_model.model.layers[1].mlp.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    before = _lean_steps()
    hooked = _decode(lean, IDS, prefill=6)
    handle.remove()
    assert _lean_steps() == before and len(seen) == 1 + len(IDS) - 6  # the hook saw the prefill and every step
    assert (hooked - _teacher_forced(hf_model, IDS)[6:]).abs().max() <= 1e-5 * hooked.abs().max()
    name, cache = preallocated_cache(lean, len(IDS))
    with torch.inference_mode():
        lean(input_ids=torch.tensor([IDS[:6]]), use_cache=True, **{name: cache})
        out = lean(input_ids=torch.tensor([IDS[6:7]]), use_cache=True, output_attentions=True, **{name: cache})
    assert out.attentions is not None and len(out.attentions) == 3 and _lean_steps() == before


@pytest.mark.parametrize("case", ["gemma2", "gpt2", "sliding window", "q/k norms", "float64", "soft-capping"])
def test_architectures_the_lean_step_does_not_reproduce_keep_hfs_forward(case):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if case in ("gemma2", "gpt2"):
        model = tiny_hf_model(case)
    elif case == "sliding window":
        model = _mistral(sliding_window=4)
    elif case == "q/k norms":
        model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in tiny_config("qwen2").to_dict().items()
                                                if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
                                             head_dim=16)).eval()
    elif case == "float64":
        model = tiny_hf_model("llama").to(torch.float64)
    else:
        model = tiny_hf_model("llama")
        model.config.attn_logit_softcapping = 30.0
    assert with_lean_steps(model) is None


def test_a_lean_step_that_differs_from_hf_is_refused(tokenizer, monkeypatch):
    from mechvis.generation.decoding.decoder import decoding_model, _unwrapped

    model = mechvis.load_model(tiny_hf_model("qwen2", seed=9), tokenizer=tokenizer, device="cpu")
    wrong = lean_decoding._Plan.step
    monkeypatch.setattr(lean_decoding._Plan, "step", lambda self, ids, cache: wrong(self, ids, cache) * 1.01)
    plain = _unwrapped(model.original_model)
    assert not lean_decoding_equal(model.original_model, plain, with_lean_steps(plain))
    decoder = decoding_model(model)
    assert "_mechvis_lean_plan" not in decoder.model.__dict__  # HF's forward decodes this model
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=6)
    full = _teacher_forced(model.original_model, trace.run.tokens.tolist())[trace.prompt_length - 1 : -1]
    assert _close(trace.step_logits, full)


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(1, 5), min_size=1, max_size=8), capacity=st.integers(1, 12),
       crop_after=st.integers(0, 8), crop=st.integers(1, 3))
def test_the_preallocated_cache_holds_what_concatenation_holds(chunks, capacity, crop_after, crop):
    """Any sequence of updates (prefill chunks, single tokens, past the capacity, a crop in the
    middle): the same keys and values as transformers' concatenating `DynamicLayer`."""
    from transformers.cache_utils import DynamicLayer

    layer, reference = _preallocated_layer(capacity), DynamicLayer()
    generator = torch.Generator().manual_seed(len(chunks) * 100 + capacity)
    for index, size in enumerate(chunks):
        keys, values = torch.randn(1, 2, size, 4, generator=generator), torch.randn(1, 2, size, 4, generator=generator)
        got, expected = layer.update(keys, values), reference.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        if index == crop_after and layer.get_seq_length() > crop:
            layer.crop(-crop)
            reference.crop(-crop)
    assert layer.get_seq_length() == reference.get_seq_length()


@pytest.mark.integration
def test_the_embedded_model_decodes_lean(embedded, embedded_reference):
    """The embedded SmolLM2 (a Llama): lean steps and the logits of HF's full forward."""
    from mechvis.generation.decoding.decoder import decoding_model

    assert "_mechvis_lean_plan" in decoding_model(embedded).model.__dict__
    before = _lean_steps()
    trace = mechvis.generate(embedded, "The capital of France is", max_new_tokens=8)
    assert _lean_steps() - before >= 7
    full = _teacher_forced(embedded_reference, trace.run.tokens.tolist())[trace.prompt_length - 1 : -1]
    assert _close(trace.step_logits, full)
    assert _plan(embedded_reference.model) is not None


def _hf_modules(model, class_name):
    return [module for module in model.original_model.modules() if type(module).__name__ == class_name]


def _max_difference(trace, reference):
    full = _teacher_forced(reference, trace.run.tokens.tolist())[trace.prompt_length - 1 : -1]
    return float((trace.step_logits.log_softmax(-1) - full.log_softmax(-1)).abs().max())


@pytest.mark.parametrize("change", ["instance forward", "subclass", "attention function"])
def test_a_module_changed_after_the_first_generate_runs_hfs_forward(tokenizer, change, monkeypatch):
    """What HF's modules compute changed after the check ran (no hook involved): the next
    generation runs HF's forward, with the change (found by a review: the lean step had kept
    computing the unchanged model)."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import LlamaMLP, eager_attention_forward

    hf_model = tiny_hf_model("llama", seed=11)
    reference = copy.deepcopy(hf_model)
    model = mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
    mechvis.generate(model, "Once upon a time", max_new_tokens=3, analysis_pass=False)  # the check passes
    if change == "attention function":
        def halved(module, query, key, value, attention_mask, **kwargs):
            output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return output * 0.5, weights

        AttentionInterface.register("mechvis_test_halved", halved)
        for target in (model.original_model, reference):
            target.set_attn_implementation("mechvis_test_halved")
    else:
        class Doubled(LlamaMLP):
            def forward(self, x):
                return super().forward(x) * 2.0

        for mlp in (_hf_modules(model, "LlamaMLP")[1], reference.model.layers[1].mlp):
            if change == "subclass":
                mlp.__class__ = Doubled
            else:
                original = mlp.forward
                mlp.forward = lambda x, original=original: original(x) * 3.0
    prompt = "The history of the printing press begins in Mainz, where"
    before = _lean_steps()
    trace = mechvis.generate(model, prompt, max_new_tokens=8, analysis_pass=False)
    assert _lean_steps() == before
    if change == "attention function":
        # The bridge's own forward does not run HF's attention functions, so the teacher-forced
        # reference is the decoding path without lean steps (HF's modules, with the function).
        monkeypatch.setattr(mechvis.generation.decoding.decoder, "with_lean_steps", lambda decoder: None)
        plain = mechvis.generate(model, prompt, max_new_tokens=8, analysis_pass=False)
        assert (trace.step_logits - plain.step_logits).abs().max() <= 1e-6
    else:
        assert _max_difference(trace, reference) <= 1e-4


def test_a_hook_at_the_first_generate_gets_no_check_tokens_and_does_not_turn_lean_steps_off(tokenizer):
    model = mechvis.load_model(tiny_hf_model("llama", seed=12), tokenizer=tokenizer, device="cpu")
    calls = []
    handle = _hf_modules(model, "LlamaMLP")[1].register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False)
    handle.remove()
    prompt = trace.prompt_length
    assert calls == [prompt] + [1] * (len(trace.generated_ids) - 1)  # the prefill and each step, nothing else
    before = _lean_steps()
    trace = mechvis.generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False)
    assert _lean_steps() - before >= len(trace.generated_ids) - 1


def test_the_check_counts_its_own_steps_not_other_threads(monkeypatch):
    """Another model decoding in another thread at the same time (a review found the process-wide
    count made this model's check fail, and lean steps stay off for it)."""
    hf_model = tiny_hf_model("llama", seed=13)
    lean = with_lean_steps(hf_model)
    step = lean_decoding._Plan.step

    def elsewhere_too(self, ids, cache):
        VERIFIED.count("lean_steps")  # a step of another plan, meanwhile
        return step(self, ids, cache)

    monkeypatch.setattr(lean_decoding._Plan, "step", elsewhere_too)
    assert lean_decoding_equal(hf_model, hf_model, lean)


def test_a_model_in_training_mode_runs_hfs_forward():
    hf_model = tiny_hf_model("llama", seed=14).train()
    assert with_lean_steps(hf_model) is None
