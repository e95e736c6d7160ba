"""run / encode: tokens as the model's own pipeline makes them, segments, and bad input."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.errors import InvalidArgumentError
from mechvis.text import encode
from mechvis.running import run


def test_completion_tokens_match_the_tokenizer_and_logits_match_a_plain_forward(tiny, tokenizer):
    bridge, reference = tiny("llama")
    result = run(bridge, "The cat sat on the mat")
    assert result.tokens.tolist() == tokenizer("The cat sat on the mat").input_ids
    assert "".join(result.str_tokens) == "The cat sat on the mat"
    with torch.no_grad():
        expected = reference(result.tokens[None]).logits[0].log_softmax(-1)
    assert (result.logits.log_softmax(-1) - expected).abs().max() <= 1e-4
    assert result.cache["blocks.0.hook_resid_pre"].shape == (1, len(result.tokens), 64)
    assert [span.kind for span in result.segments.spans] == ["text"]
    assert result.segments.sink_positions == (0,)


def test_prepend_bos_adds_a_bos_span(tiny, tokenizer):
    bridge, _ = tiny("llama")
    encoded = encode(bridge, "Hello world", prepend_bos=True)
    assert encoded.token_ids[0] == tokenizer.bos_token_id
    assert [(s.kind, s.start, s.stop) for s in encoded.segments.spans] == [("bos", 0, 1), ("text", 1, 3)]
    assert encode(bridge, "Hello world", prepend_bos=False).token_ids == tokenizer("Hello world").input_ids


def test_chat_segments_hold_each_message_content(tiny, tokenizer):
    bridge, _ = tiny("llama")
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "List the days of the week."},
    ]
    encoded = encode(bridge, messages, chat=True)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert encoded.token_ids == list(expected["input_ids"])
    for role, message in zip(("system", "user"), messages):
        positions = encoded.segments.positions(role)
        assert tokenizer.decode([encoded.token_ids[p] for p in positions]) == message["content"]
    assert encoded.segments.kind_at(0) == "bos"
    assert encoded.segments.spans[-1].kind == "template"  # the assistant generation prompt
    covered = [p for span in encoded.segments.spans for p in span.positions]
    assert covered == list(range(len(encoded.token_ids)))


def test_chat_string_becomes_one_user_message(tiny):
    bridge, _ = tiny("llama")
    encoded = encode(bridge, "What is 2+2?", chat=True)
    assert len(encoded.segments.of_kind("user")) == 1
    assert "<|im_start|>assistant" in encoded.text


def test_names_filter_caches_only_the_named_hooks(tiny):
    bridge, _ = tiny("llama")
    result = run(bridge, "one two three", names_filter=lambda name: name.endswith("hook_pattern"))
    assert sorted(result.cache.keys()) == [f"blocks.{i}.attn.hook_pattern" for i in range(3)]


@pytest.mark.parametrize(
    ("prompt", "chat", "message"),
    [
        ("", False, "empty"),
        ("   \n", False, "empty"),
        ([], True, "no messages"),
        ([{"role": "robot", "content": "hi"}], True, "role"),
        ([{"role": "user", "content": ""}], True, "empty"),
        ([{"role": "user", "content": "hi"}], False, "chat=True"),
    ],
)
def test_bad_prompts(tiny, prompt, chat, message):
    bridge, _ = tiny("llama")
    with pytest.raises(InvalidArgumentError, match=message):
        run(bridge, prompt, chat=chat)


def test_prompt_longer_than_the_context(tiny):
    bridge, _ = tiny("llama")  # n_ctx = 256
    with pytest.raises(InvalidArgumentError, match="context holds 256"):
        run(bridge, "word " * 400)


def test_chat_without_template(tiny, tokenizer):
    bridge, _ = tiny("llama")
    bridge.hf_tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bridge.hf_tokenizer.chat_template = None
    with pytest.raises(InvalidArgumentError, match="chat=False"):
        run(bridge, "hi", chat=True)


@pytest.mark.integration
def test_embedded_chat_run(embedded):
    result = mechvis.run(embedded, "List the days of the week.", chat=True)
    user = result.segments.positions("user")
    assert "".join(result.str_tokens[p] for p in user) == "List the days of the week."
    assert result.logits.shape == (len(result.tokens), 49_152)
