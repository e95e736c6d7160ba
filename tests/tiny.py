"""Tiny randomly initialised models built offline from HF configs, for unit tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 49_152  # the embedded model's tokenizer, reused by every tiny model
N_CTX = 256

TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2", "gemma2")


def tiny_config(architecture: str, **overrides):
    """A config with 3 layers, d_model 64, 4 heads; `overrides` replace any field."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=N_CTX)  # GQA: 4 query, 2 kv heads
    fields = {
        "llama": dict(decoder, tie_word_embeddings=True),
        "qwen2": decoder,
        "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=N_CTX),
        "gemma2": dict(decoder, head_dim=16, sliding_window=8),  # window shorter than test prompts
    }[architecture]
    return CONFIG_CLASSES[architecture](**{**common, **fields, **overrides})


CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config, "gemma2": Gemma2Config}
MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gemma2": Gemma2ForCausalLM,
}


def tiny_hf_model(architecture: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random model in eval mode with eager attention, deterministic for a seed."""
    config = tiny_config(architecture, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return MODEL_CLASSES[architecture](config).eval()


def tiny_llava_config(*, vocab_size: int = VOCAB, image_token: int = VOCAB - 1):
    """A tiny LLaVA: CLIP at 32 × 32 px with 8 px patches (4 × 4 = 16 image tokens), a 2-layer
    Llama with GQA."""
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=image_token,
    )
