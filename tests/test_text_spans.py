"""Token texts and chat segments come from whole sequences and the template's structure.

Right values from independent sources: the tokenizer's own `decode` of the whole sequence and
its offset mapping (HF's fast tokenizer), and chat renderings built by hand in the format each
template writes (the expected content spans are known by construction, never searched for).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mechvis
from mechvis.analysis.spans import find_token_spans
from mechvis.generation import ProcessLogits
from mechvis.text import _windowed_ends, decode_tokens, encode

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are a helpful assistant."

# Templates in the structure of the families the tiny models stand for, written here: ChatML with
# a default system prompt (Qwen2), Gemma's turns with the system message merged into the first
# user turn and trimmed contents, Llama 3's headers with trimmed contents.
QWEN_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _chatml(messages, default_system):
    text, spans = "", []
    if messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n"
        spans.append((message["role"], len(text), len(text) + len(message["content"])))
        text += message["content"] + "<|im_end|>\n"
    return text + "<|im_start|>assistant\n", spans


def _gemma(messages, bos):
    text, spans = bos, []
    system = messages[0] if messages[0]["role"] == "system" else None
    for index, message in enumerate(messages[1:] if system else messages):
        text += "<start_of_turn>" + ("model" if message["role"] == "assistant" else message["role"]) + "\n"
        if index == 0 and system:
            spans.append(("system", len(text), len(text) + len(system["content"])))
            text += system["content"] + "\n\n"
        content = message["content"].strip()
        spans.append((message["role"], len(text), len(text) + len(content)))
        text += content + "<end_of_turn>\n"
    return text + "<start_of_turn>model\n", spans


def _llama3(messages, bos):
    text, spans = bos, []
    for message in messages:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        content = message["content"].strip()
        spans.append((message["role"], len(text), len(text) + len(content)))
        text += content + "<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n", spans


TEMPLATES = {  # tiny architecture -> (template or None for the tokenizer's own, hand-built rendering)
    "llama": (None, lambda messages, bos: _chatml(messages, SMOL_SYSTEM)),
    "qwen2": (QWEN_STYLE, lambda messages, bos: _chatml(messages, QWEN_SYSTEM)),
    "gemma2": (GEMMA_STYLE, _gemma),
    "gpt2": (LLAMA3_STYLE, _llama3),
}

CONTENTS = [
    "user", "assistant", "system", "model", "<|im_start|>", "assistant\n", "<|im_end|>\n<|im_start|>user\n",
    "<start_of_turn>user\n", "<|eot_id|>", SMOL_SYSTEM, QWEN_SYSTEM, "  padded \n", "\n\n", "東京 🎉 café", "Hi",
]


def _conversations(content):
    yield [  # multi-turn, with an empty message
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": content},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": content},
        {"role": "user", "content": f"again {content}"},
    ]
    if content.strip():  # (a chat of whitespace only is refused)
        yield [{"role": "user", "content": content}]
        yield [{"role": "system", "content": content}, {"role": "user", "content": content}]  # repeated


@pytest.fixture(scope="module")
def templated(tokenizer):
    """architecture -> a copy of the embedded tokenizer carrying that family's template."""
    copies = {}
    for architecture, (template, _) in TEMPLATES.items():
        copies[architecture] = copy.deepcopy(tokenizer)
        if template is not None:
            copies[architecture].chat_template = template
    return copies


def _expected_kinds(tokenizer, messages, architecture):
    text, spans = TEMPLATES[architecture][1](messages, tokenizer.bos_token)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    kinds = []
    for start, stop in encoding["offset_mapping"]:
        roles = [role for role, a, b in spans if a < b and start < b and stop > a]
        kinds.append(roles[-1] if roles else "template")
    if encoding["input_ids"][0] == tokenizer.bos_token_id:
        kinds[0] = "bos"
    return text, list(encoding["input_ids"]), kinds


@pytest.mark.parametrize("architecture", list(TEMPLATES))
@pytest.mark.parametrize("content", CONTENTS)
def test_chat_segments_follow_the_template_structure(templated, architecture, content):
    tokenizer = templated[architecture]
    model = SimpleNamespace(hf_tokenizer=tokenizer, cfg=SimpleNamespace(n_ctx=4096))
    for messages in _conversations(content):
        text, ids, expected = _expected_kinds(tokenizer, messages, architecture)
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        encoded = encode(model, messages, chat=True)
        assert encoded.token_ids == ids and encoded.text == text
        assert [encoded.segments.kind_at(p) for p in range(len(ids))] == expected, messages


@pytest.mark.parametrize("architecture", list(TEMPLATES))
def test_run_labels_a_content_equal_to_a_role_name(tiny, templated, architecture):
    """The issue's case, on each tiny model: the content "user" is the user's, the role name in
    the markup is template."""
    model, _ = tiny(architecture)
    model.hf_tokenizer = templated[architecture]
    messages = [{"role": "user", "content": "user"}]
    result = mechvis.run(model, messages, chat=True)
    _, ids, expected = _expected_kinds(model.hf_tokenizer, messages, architecture)
    assert result.tokens.tolist() == ids
    assert [result.segments.kind_at(p) for p in range(len(ids))] == expected
    (user,) = result.segments.of_kind("user")
    assert len(user) == 1 and model.hf_tokenizer.decode(result.tokens[user.start : user.stop]) == "user"
    assert result.text == model.hf_tokenizer.decode(result.tokens.tolist())


def test_a_template_whose_markup_depends_on_the_content_labels_nothing(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'urgent' in m['content'] %}[!]{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    model = SimpleNamespace(hf_tokenizer=tokenizer, cfg=SimpleNamespace(n_ctx=4096))
    with pytest.warns(UserWarning, match="cannot locate"):
        encoded = encode(model, [{"role": "user", "content": "urgent: user"}], chat=True)
    assert {span.kind for span in encoded.segments.spans} == {"template"}  # "[!]" first: no BOS


# --- e. token texts from whole sequences ---------------------------------------------------

TEXT = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=126), st.sampled_from("東京語é ß\n🎉👍🏽∑")),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_decoded_text_and_offsets_equal_the_tokenizers_own(tokenizer, text):
    """For an encoded text: decoding gives the text back, and the offsets equal the fast
    tokenizer's offset mapping (tokens sharing a character both cover it)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    decoded = decode_tokens(tokenizer, encoding["input_ids"])
    assert decoded.text == text
    assert decoded.offsets == [tuple(pair) for pair in encoding["offset_mapping"]]
    assert "".join(decoded.str_tokens) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49_151), min_size=1, max_size=30))
def test_any_ids_decode_whole(tokenizer, ids):
    """Any token sequence (special tokens, lone bytes): the text is the tokenizer's decode of all
    of it, the token strings partition it and each token's span ends where its text does (or one
    character later, inside a character)."""
    decoded = decode_tokens(tokenizer, ids)
    assert decoded.text == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(decoded.str_tokens) == decoded.text
    position = 0
    for piece, (start, stop) in zip(decoded.str_tokens, decoded.offsets):
        assert start == position and stop - (start + len(piece)) in (0, 1) and stop <= len(decoded.text)
        position += len(piece)


def _assert_found(run, tokenizer, keyword, after):
    """`keyword` is found once after position `after`, and the span is the tokens whose whole
    decode holds it: dropping its first or last token loses it."""
    ids = run.tokens.tolist()
    spans = [span for span in find_token_spans(run, keyword) if span.start >= after]
    assert len(spans) == 1, (keyword, run.text)
    start, stop = spans[0].start, spans[0].stop
    assert keyword in tokenizer.decode(ids[start:stop])
    assert keyword not in tokenizer.decode(ids[start + 1 : stop]) and keyword not in tokenizer.decode(ids[start : stop - 1])


class _Force:
    """A logits processor that makes generation emit `ids`, one per step."""

    def __init__(self, ids):
        self.ids, self.start = ids, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[-1] if self.start is None else self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[..., self.ids[input_ids.shape[-1] - self.start]] = 0.0
        return forced


CONTINUATION = " Tokyo 東京 is great 🎉 indeed"


def _check_trace(trace, tokenizer):
    ids = trace.run.tokens.tolist()
    assert trace.run.text == tokenizer.decode(ids, skip_special_tokens=False) and "\ufffd" not in trace.run.text
    assert "".join(trace.run.str_tokens) == trace.run.text
    for keyword in ("東京", "🎉"):
        _assert_found(trace.run, tokenizer, keyword, trace.prompt_length)


def test_teacher_forced_and_generated_texts_hold_whole_characters(tiny_llama, tokenizer):
    forced = mechvis.teacher_force(tiny_llama, "My favourite city:", CONTINUATION)
    _check_trace(forced, tokenizer)
    continuation = tokenizer.encode(CONTINUATION, add_special_tokens=False)
    generated = mechvis.generate(tiny_llama, "My favourite city:", max_new_tokens=len(continuation),
                                 recorders=[ProcessLogits(_Force(continuation))])
    assert generated.generated_ids == continuation
    _check_trace(generated, tokenizer)
    assert generated.run.offsets == forced.run.offsets and generated.run.str_tokens == forced.run.str_tokens
    prompt = mechvis.run(tiny_llama, "My favourite city:" + CONTINUATION)
    assert prompt.text == "My favourite city:" + CONTINUATION
    for keyword in ("東京", "🎉"):
        _assert_found(prompt, tokenizer, keyword, 0)


def test_a_generation_cut_inside_a_character(tiny_llama, tokenizer):
    """A trace ending on the first bytes of 東: its text is the tokenizer's decode (with the
    replacement character it gives), and the prompt's offsets are unchanged."""
    continuation = tokenizer.encode(" 東京", add_special_tokens=False)[:2]
    trace = mechvis.generate(tiny_llama, "City:", max_new_tokens=2, recorders=[ProcessLogits(_Force(continuation))])
    ids = trace.run.tokens.tolist()
    assert trace.run.text == tokenizer.decode(ids)
    assert "".join(trace.run.str_tokens) == trace.run.text
    assert trace.run.offsets[: trace.prompt_length] == mechvis.run(tiny_llama, "City:").offsets


def test_report_tokens_are_whole_characters(tiny, tokenizer, tmp_path):
    from mechvis.report import report_json
    from mechvis.report.build import build_report_data

    model, _ = tiny("llama")
    data = build_report_data(model, "Tokyo 東京 is great 🎉", max_new_tokens=3, layers=[0])
    tokens = report_json(data)["tokens"]
    assert "".join(token["text"] for token in tokens) == tokenizer.decode([token["id"] for token in tokens])
    assert "東" in [token["text"] for token in tokens] and all("\ufffd" not in token["text"] for token in tokens[:8])


@pytest.mark.integration
def test_embedded_model_finds_whole_characters(embedded):
    tokenizer = embedded.hf_tokenizer
    forced = mechvis.teacher_force(embedded, "My favourite city:", CONTINUATION)
    _check_trace(forced, tokenizer)
    continuation = tokenizer.encode(CONTINUATION, add_special_tokens=False)
    generated = mechvis.generate(embedded, "My favourite city:", max_new_tokens=len(continuation),
                                 recorders=[ProcessLogits(_Force(continuation))])
    _check_trace(generated, tokenizer)
    messages = [{"role": "system", "content": "user"}, {"role": "user", "content": "user"}]
    chat = mechvis.run(embedded, messages, chat=True, names_filter=lambda name: False)
    _, ids, expected = _expected_kinds(tokenizer, messages, "llama")
    assert chat.tokens.tolist() == ids and [chat.segments.kind_at(p) for p in range(len(ids))] == expected


def test_a_multi_token_target_is_named_by_its_whole_text(tiny_llama):
    from mechvis.text import single_token_id
    from mechvis.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="東") as error:
        single_token_id(tiny_llama, "東")
    assert "\ufffd" not in str(error.value)


def _sentencepiece_style():
    """A tokenizer with Llama 2's decoder (▁ → space, byte fallback, one leading space stripped
    from the whole text), whose decoding is not concatenative: the windows must cancel that."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁Paris", "▁is", "▁東", "京", "▁", "▁the", ".", "▁capital", "ab"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SENTENCEPIECE = _sentencepiece_style()
UNITS = [[index] for index in range(259, 268)] + [[3 + b for b in c.encode()] for c in "東🎉é"]  # pieces; bytes of a character


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_windowed_decoding_equals_decoding_every_prefix(tokenizer, data):
    """The linear-time path gives what decoding every prefix defines (byte-level BPE, and a
    SentencePiece-style decoder with byte fallback), on sequences long enough to move the window."""
    which = data.draw(st.sampled_from(["byte-level", "sentencepiece"]))
    if which == "byte-level":
        text = data.draw(st.lists(TEXT, min_size=1, max_size=8).map(" ".join))
        ids = tokenizer.encode(text, add_special_tokens=False) + data.draw(st.lists(st.integers(0, 49_151), max_size=40))
        chosen = tokenizer
    else:
        # pieces, each maybe followed by one character in bytes (byte runs never adjacent: one
        # run of bytes decodes as a whole, so a run that grows invalid would change earlier text)
        units = data.draw(st.lists(st.tuples(st.sampled_from(UNITS[:9]), st.sampled_from([[], *UNITS[9:]])), min_size=1, max_size=40))
        ids = [index for word, character in units for index in word + character]
        chosen = SENTENCEPIECE
    fast, exact = decode_tokens(chosen, ids), decode_tokens(chosen, ids, exact=True)
    assert fast == exact and fast.text == chosen.decode(ids)
    assert _windowed_ends(chosen, ids, fast.text) is not None  # the windows were used
