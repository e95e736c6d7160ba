"""Visible keys per layer (sliding windows, local/global alternation, chunks) against the keys HF's
own eager attention lets each query see, for every windowed architecture transformer-lens loads."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformer_lens import ActivationCache

import mechvis
from mechvis.analysis import head_entropy
from mechvis.models.architecture import pattern_hook, visible_keys
from mechvis.models.architecture import LayerAttention, attention_layout, inspect_model
from mechvis.errors import UnsupportedArchitectureError
from tests.reference import entropy_rows, hf_forward
from tests.tiny import N_CTX, VOCAB

PROMPT = "Write a poem about the sea. The poem must mention the moon and the tide."
WINDOW = 4  # shorter than the prompt, so windows and chunks bite

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
_DECODER = dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=N_CTX)
_MOE = dict(num_experts_per_tok=1, moe_intermediate_size=32)

# HF class → config overrides giving a window (or chunk) of WINDOW tokens on some or all layers.
WINDOWED = {
    "MistralForCausalLM": dict(_DECODER, sliding_window=WINDOW),  # every layer, no layer_types
    "MixtralForCausalLM": dict(_DECODER, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=1),
    "Ministral3ForCausalLM": dict(_DECODER, sliding_window=WINDOW, head_dim=16),
    "Phi3ForCausalLM": dict(_DECODER, sliding_window=WINDOW),
    "Starcoder2ForCausalLM": dict(_DECODER, sliding_window=WINDOW),
    "Qwen2ForCausalLM": dict(_DECODER, sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2),
    "Qwen2MoeForCausalLM": dict(_DECODER, **_MOE, sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2,
                                num_experts=2, shared_expert_intermediate_size=32),
    "Qwen3ForCausalLM": dict(_DECODER, sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2, head_dim=16),
    "Qwen3MoeForCausalLM": dict(_DECODER, **_MOE, sliding_window=WINDOW, use_sliding_window=True, head_dim=16, num_experts=2),
    "SmolLM3ForCausalLM": dict(_DECODER, sliding_window=WINDOW, use_sliding_window=True),
    "Gemma2ForCausalLM": dict(_DECODER, sliding_window=WINDOW, head_dim=16),  # local/global alternation
    "Gemma3ForCausalLM": dict(_DECODER, sliding_window=WINDOW, head_dim=16, sliding_window_pattern=2),
    "Gemma4ForCausalLM": dict(_DECODER, sliding_window=WINDOW, head_dim=16),
    "Cohere2ForCausalLM": dict(_DECODER, sliding_window=WINDOW),
    "Exaone4ForCausalLM": dict(_DECODER, sliding_window=WINDOW, sliding_window_pattern=2),
    "GptOssForCausalLM": dict(_DECODER, sliding_window=WINDOW, head_dim=16, num_local_experts=2, num_experts_per_tok=1),
    "Olmo3ForCausalLM": dict(_DECODER, sliding_window=WINDOW),
    "AfmoeForCausalLM": dict(_DECODER, **_MOE, sliding_window=WINDOW, global_attn_every_n_layers=2, num_experts=2,
                             num_dense_layers=4, head_dim=16),
    "ModernBertDecoderForCausalLM": dict(_DECODER, local_attention=2 * WINDOW, global_attn_every_n_layers=2),
    "GPTNeoForCausalLM": dict(_COMMON, hidden_size=64, num_layers=4, num_heads=4, window_size=WINDOW,
                              attention_types=[[["global", "local"], 2]], max_position_embeddings=N_CTX),
    "Llama4ForCausalLM": dict(_DECODER, attention_chunk_size=WINDOW, head_dim=16, intermediate_size_mlp=128,
                              num_local_experts=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1, 0]),
}


def _windowed(name: str, seed: int = 0):
    model_class = getattr(transformers, name)
    config = model_class.config_class(**WINDOWED[name])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).eval()


@pytest.fixture(scope="module", params=sorted(WINDOWED))
def windowed(request, tokenizer):
    """(name, bridge, run of PROMPT, HF eager attentions of the same tokens from an untouched copy)."""
    hf_model = _windowed(request.param)
    with torch.no_grad():  # a large mean logit, so that centred and own logits differ (test_own_logits...)
        head = hf_model.get_output_embeddings()
        head.weight += torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(1)) * 0.5
    reference = copy.deepcopy(hf_model)
    bridge = mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
    result = mechvis.run(bridge, PROMPT)
    output = hf_forward(reference, result.tokens.tolist())
    result.hf_logits = output.logits[0]
    return request.param, bridge, result, torch.stack(output.attentions)[:, 0].double().numpy()


def _hf_mask(attentions: np.ndarray) -> np.ndarray:
    """(layer, query, key): keys with nonzero probability in some head. Every head of a layer shares
    its mask; the union guards against a sharp head whose softmax underflows to exactly 0 on an
    allowed key (Gemma 4's unscaled scores do that on a random model)."""
    return (attentions > 0).any(axis=1)


def test_visible_keys_are_the_keys_hf_eager_attention_sees(windowed):
    name, bridge, result, attentions = windowed
    hf_mask = _hf_mask(attentions)
    hf_counts = hf_mask.sum(-1)  # (layer, query)
    got = visible_keys(bridge, range(bridge.cfg.n_layers), attentions.shape[-1]).numpy()
    np.testing.assert_array_equal(got, hf_counts, err_msg=name)
    assert (hf_counts[:, -1] <= WINDOW).any(), f"{name}: no layer is windowed; the config did not take"
    masks = np.stack([layer.mask(attentions.shape[-1]).numpy() for layer in attention_layout(bridge)])
    np.testing.assert_array_equal(masks, hf_mask, err_msg=name)
    # The bridge's own patterns obey the same mask.
    bridge_mask = np.stack([(result.cache[pattern_hook(layer)][0] > 0).any(0).numpy()
                            for layer in range(bridge.cfg.n_layers)])
    np.testing.assert_array_equal(bridge_mask, hf_mask, err_msg=name)


def test_uniform_heads_have_normalised_entropy_one_and_hf_entropies_match(windowed):
    """A head spreading its mass evenly over the keys HF lets it see has entropy / log(visible) = 1
    (was 0.558 at the last query of a Mistral with a window of 4)."""
    name, bridge, result, attentions = windowed
    allowed = torch.from_numpy(_hf_mask(attentions)[:, None].repeat(attentions.shape[1], 1)).float()
    uniform = allowed / allowed.sum(-1, keepdim=True)
    cache = ActivationCache({pattern_hook(layer): uniform[layer][None] for layer in range(uniform.shape[0])}, bridge)
    normalised = head_entropy(cache, bridge).normalised
    several = allowed.sum(-1) > 1
    np.testing.assert_allclose(normalised[several].numpy(), 1.0, atol=1e-5, err_msg=name)
    assert normalised[~several].isnan().all()
    # On the model's own patterns: entropy and its normalisation from numpy on HF's attentions.
    entropy = head_entropy(result.cache, bridge)
    expected = entropy_rows(attentions)
    np.testing.assert_allclose(entropy.entropy.numpy(), expected, atol=1e-4, err_msg=name)
    counts = _hf_mask(attentions).sum(-1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_normalised = np.where(counts > 1, expected / np.log(counts), np.nan)
    np.testing.assert_allclose(entropy.normalised.numpy(), expected_normalised, atol=1e-4, err_msg=name)


def test_inspect_reports_the_window(windowed):
    name, bridge, _, attentions = windowed
    summary = inspect_model(bridge)
    n = attentions.shape[-1]
    local = tuple(int(layer) for layer in np.flatnonzero(_hf_mask(attentions).sum(-1)[:, -1] < n))
    assert summary.local_layers == local, name
    if name == "Llama4ForCausalLM":
        assert summary.attention_chunk_size == WINDOW and summary.sliding_window is None
        assert "chunked attention" in str(summary)
    else:
        assert summary.sliding_window == WINDOW and summary.attention_chunk_size is None
        assert f"{WINDOW} tokens" in str(summary)


def test_own_logits_equal_hf_logits(windowed):
    """The same fixtures check `mechvis.models.unembedding` on every windowed architecture: the bridge's
    centred logits plus the kept offset are the plain HF model's logits."""
    from mechvis.models.unembedding import centring_offset

    name, bridge, result, _ = windowed
    with torch.no_grad():
        own = result.logits + centring_offset(bridge, result.cache["unembed.hook_in"][0])[:, None]
    hf_logits = result.hf_logits
    torch.testing.assert_close(own, hf_logits, atol=2e-4, rtol=1e-5, msg=name)
    torch.testing.assert_close(result.logits.log_softmax(-1), hf_logits.log_softmax(-1), atol=2e-4, rtol=1e-5, msg=name)


def test_mistral_uniform_head_regression(tiny, tokenizer):
    """The reported case: a tiny Mistral with sliding_window=4, a head uniform over its window."""
    bridge = mechvis.load_model(_windowed("MistralForCausalLM"), tokenizer=tokenizer, device="cpu")
    n = 12
    mask = torch.ones(n, n).tril().triu(-(WINDOW - 1))  # keys q − 3 … q
    pattern = (mask / mask.sum(-1, keepdim=True)).expand(bridge.cfg.n_layers, bridge.cfg.n_heads, n, n)
    cache = ActivationCache({pattern_hook(layer): pattern[layer][None] for layer in range(bridge.cfg.n_layers)}, bridge)
    got = head_entropy(cache, bridge)
    assert got.normalised[0, 0, -1].item() == pytest.approx(1.0, abs=1e-6)
    assert got.entropy[0, 0, -1].item() == pytest.approx(math.log(WINDOW), abs=1e-6)


def _stub(n_layers: int = 4, **fields):
    config = transformers.PretrainedConfig(**fields)
    return SimpleNamespace(original_model=SimpleNamespace(config=config), cfg=SimpleNamespace(n_layers=n_layers))


def test_layout_rules_from_configs():
    assert attention_layout(_stub()) == (LayerAttention("full"),) * 4
    assert attention_layout(_stub(sliding_window=7)) == (LayerAttention("sliding", 7),) * 4
    assert attention_layout(_stub(sliding_window=7, use_sliding_window=False)) == (LayerAttention("full"),) * 4
    assert attention_layout(_stub(attention_chunk_size=5)) == (LayerAttention("chunked", 5),) * 4
    types = ["sliding_attention", "full_attention", "chunked_attention", "full_attention"]
    assert attention_layout(_stub(layer_types=types, sliding_window=3, attention_chunk_size=5)) == (
        LayerAttention("sliding", 3), LayerAttention("full"), LayerAttention("chunked", 5), LayerAttention("full"))
    with pytest.raises(UnsupportedArchitectureError, match="linear_attention"):
        attention_layout(_stub(layer_types=["linear_attention", "full_attention"] * 2))


@pytest.mark.parametrize("layer", [LayerAttention("full"), LayerAttention("sliding", 3), LayerAttention("chunked", 4),
                                   LayerAttention("full", None, True), LayerAttention("sliding", 3, True)])
def test_visible_counts_and_masks_against_hand_written_masks(layer):
    n = 11
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    if layer.bidirectional:
        expected = np.abs(q - k) < layer.size if layer.kind == "sliding" else np.ones((n, n), bool)
    else:
        expected = {"full": k <= q, "sliding": (k <= q) & (k > q - 3), "chunked": (k <= q) & (k // 4 == q // 4)}[layer.kind]
    np.testing.assert_array_equal(layer.mask(n).numpy(), expected)
    np.testing.assert_array_equal(layer.visible_keys(n).numpy(), expected.sum(-1))


@pytest.mark.parametrize("layer", [LayerAttention("full"), LayerAttention("sliding", 70), LayerAttention("chunked", 50)])
@pytest.mark.parametrize("n_queries, n_keys", [(150, 150), (70, 100)])
def test_banded_entropy_reads_every_visible_key(layer, n_queries, n_keys):
    """The block path reads only the band of keys each block can see; it must equal numpy on
    every row, and fall back to every key when a pattern has mass outside the mask."""
    from mechvis.analysis.attention import _visible_row_entropy

    generator = torch.Generator().manual_seed(n_queries + n_keys)
    scores = torch.randn(3, n_queries, n_keys, generator=generator) * 3
    allowed = layer.mask(n_keys)[-n_queries:]
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    got = _visible_row_entropy(pattern, layer, scratch=torch.empty_like(pattern))
    np.testing.assert_allclose(got.numpy(), entropy_rows(pattern.double().numpy()), atol=1e-5)
    leaky = scores.softmax(-1)  # mass everywhere
    got = _visible_row_entropy(leaky, layer, scratch=torch.empty_like(leaky))
    np.testing.assert_allclose(got.numpy(), entropy_rows(leaky.double().numpy()), atol=1e-5)
