"""The bridge's memory after loading: what `load_model` does to hold less (trimming glibc's heap,
centring the unembedding without cloning every weight) changes no weight, logit, activation or
generated token; and, measured by the OS in a subprocess, the embedded bridge holds far less than
before."""

from __future__ import annotations

import copy
import pytest
import torch

import mechvis
import mechvis.models.loading as loading
import mechvis.unembedding as unembedding
from mechvis.unembedding import ATTRIBUTE
from tests.tiny import tiny_hf_model

PROMPT = "The river valley is long, and the history of the river valley is full of surprises."


def _previous_loading(monkeypatch) -> None:
    """load_model as it was: no trim, transformer-lens' centring given the whole state dict."""
    monkeypatch.setattr(loading, "release_freed_memory", lambda: False)
    monkeypatch.setattr(
        unembedding, "_center_unembedding_only",
        lambda center_unembed, state_dict, keys, cfg, adapter: center_unembed(state_dict, cfg=cfg, adapter=adapter),
    )


def _outputs(model) -> dict[str, object]:
    run = mechvis.run(model, PROMPT)
    generation = mechvis.generate(model, PROMPT, max_new_tokens=8)
    sampled = mechvis.generate(model, PROMPT, max_new_tokens=8, temperature=0.9, seed=3)
    return {
        "weights": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "logits": run.logits.clone(),
        "cache": {name: tensor.clone() for name, tensor in run.cache.items()},
        "generated": (generation.generated_ids, sampled.generated_ids),
        "step_logits": generation.step_logits.clone(),
        "mean_logit": getattr(model, ATTRIBUTE),
    }


def _assert_identical(before: dict, after: dict) -> None:
    assert before["weights"].keys() == after["weights"].keys()
    for name, tensor in before["weights"].items():
        assert torch.equal(tensor, after["weights"][name]), name
    assert torch.equal(before["logits"], after["logits"])
    assert before["cache"].keys() == after["cache"].keys() and len(before["cache"]) > 100
    for name, tensor in before["cache"].items():
        assert torch.equal(tensor, after["cache"][name]), name
    assert before["generated"] == after["generated"]
    assert torch.equal(before["step_logits"], after["step_logits"])
    assert torch.equal(before["mean_logit"].weight, after["mean_logit"].weight)
    assert before["mean_logit"].bias == after["mean_logit"].bias


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "gemma2"])
def test_lighter_loading_changes_no_result_on_tiny_models(architecture, tokenizer, monkeypatch):
    """Weights, logits, every cached activation, greedy and sampled generation and the recorded
    mean logit are bit-identical with and without the memory savings (tied Llama, GPT-2 with
    biases and LayerNorm, Qwen2 with value biases, soft-capped Gemma 2)."""
    hf_model = tiny_hf_model(architecture)
    after = _outputs(mechvis.load_model(copy.deepcopy(hf_model), tokenizer=tokenizer, device="cpu"))
    with monkeypatch.context() as patch:
        _previous_loading(patch)
        before = _outputs(mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu"))
    _assert_identical(before, after)


def test_centring_only_the_unembedding_is_transformer_lens_centring(tiny_llama):
    """The reduced call gives the same centred weight and bias as transformer-lens' own call on
    the whole state dict, and passes every other entry through untouched."""
    from transformer_lens.weight_processing import ProcessWeights

    state_dict = {name: tensor.clone() for name, tensor in tiny_llama.state_dict().items()}
    weight_key = ProcessWeights._get_param_key("unembed.W_U", tiny_llama.adapter)
    bias_key = ProcessWeights._get_param_key("unembed.b_U", tiny_llama.adapter)
    state_dict[weight_key] = state_dict[weight_key] + 0.25  # uncentred again
    whole = ProcessWeights.center_unembed(dict(state_dict), cfg=tiny_llama.cfg, adapter=tiny_llama.adapter)
    reduced = unembedding._center_unembedding_only(
        ProcessWeights.center_unembed, state_dict, (weight_key, bias_key), tiny_llama.cfg, tiny_llama.adapter
    )
    assert whole.keys() == reduced.keys()
    assert not torch.equal(reduced[weight_key], state_dict[weight_key])
    for name in whole:
        assert torch.equal(whole[name], reduced[name]), name
        if name not in (weight_key, bias_key):
            assert reduced[name] is state_dict[name]


@pytest.mark.integration
def test_lighter_loading_changes_no_result_on_the_embedded_model(embedded, monkeypatch):
    """The same on SmolLM2-135M: the session's bridge (loaded with the savings) against one loaded
    the previous way."""
    after = _outputs(embedded)
    with monkeypatch.context() as patch:
        _previous_loading(patch)
        before = _outputs(mechvis.load_model(device="cpu"))
    _assert_identical(before, after)


@pytest.mark.integration
def test_embedded_bridge_memory_after_loading_measured_by_the_os():
    """In a fresh process: the bridge's resident memory after loading, over the plain HF model's
    (weights read by a forward pass), stays within what the untied, centred unembedding adds
    (49,152 × 576 float32 = 113 MB) plus slack: measured −56 MB, and +327 MB before the savings."""
    from benchmarks.bridge_memory import measure_in_subprocess

    hf, bridge = measure_in_subprocess("hf"), measure_in_subprocess("bridge")
    extra = (bridge["rss_mb"] - bridge["imports_mb"]) - (hf["rss_mb"] - hf["imports_mb"])
    assert extra < 300, (hf, bridge)
    assert bridge["peak_mb"] - bridge["imports_mb"] < 2050, bridge  # 2.14 GB before, 1.93 GB after
