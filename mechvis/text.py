"""Text in and out: prompts and chats to tokens with their spans (`encode`), tokens back to text
(`decode_tokens`), single-token lookups.

Tokenisation follows the model's own tokenizer (`model.hf_tokenizer`, kept by `load_model`), so
the tokens are exactly what the model's HF pipeline would feed it; chat mode renders the model's
chat template with the generation prompt appended."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mechvis._validation import check_bool, integer, shown
from mechvis.errors import InvalidArgumentError
from mechvis.types import CHAT_ROLES, DecodedTokens, Encoded, Message, Prompt, Segments, Span

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



def text_preview(text: str, limit: int = 60) -> str:
    """`text` quoted, cut in the middle with "…" beyond `limit` characters (for reprs)."""
    shown = text if len(text) <= limit else text[: limit // 2] + "…" + text[-(limit // 2 - 1):]
    return repr(shown)


def token_kinds(
    offsets: Sequence[tuple[int, int]], labelled: Sequence[tuple[str, int, int]], default: str
) -> list[str]:
    """The kind of each token: the labelled character range it overlaps, else `default`."""
    kinds = [default] * len(offsets)
    for kind, char_start, char_stop in labelled:
        for index, (token_start, token_stop) in enumerate(offsets):
            if token_start < char_stop and token_stop > char_start:
                kinds[index] = kind
    return kinds


def merge_spans(kinds: Sequence[str]) -> tuple[Span, ...]:
    """Consecutive positions of the same kind as one span."""
    spans: list[Span] = []
    for index, kind in enumerate(kinds):
        if spans and spans[-1].kind == kind:
            spans[-1] = Span(kind, spans[-1].start, index + 1)
        else:
            spans.append(Span(kind, index, index + 1))
    return tuple(spans)


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise InvalidArgumentError("The chat has no messages; pass at least one user message.")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise InvalidArgumentError(
                f"Message {index} must be a dict with 'role' in {CHAT_ROLES} and a 'content' string; "
                f"got {message!r}."
            )
        if not isinstance(message.get("content"), str):
            raise InvalidArgumentError(f"Message {index} has no 'content' string.")
        _check_text(message["content"], f"Message {index}")
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(message["content"].strip() for message in checked):
        raise InvalidArgumentError("Every message of the chat is empty; give the model some text.")
    return checked


_SENTINEL = re.compile("\ue000([0-9]+)\ue001")  # private-use characters around a message index


# How templates write a content: as given, or trimmed (Jinja's `trim`, e.g. Llama 3 and Gemma).
_CONTENT_FORMS: tuple[Callable[[str], str], ...] = (lambda c: c, str.strip, str.rstrip, str.lstrip)


def chat_content_spans(
    render: Callable[[list[str]], str], messages: Sequence[Message]
) -> tuple[str, list[tuple[str, int, int]]]:
    """The rendered chat and the character span of each message's content in it, from the
    template's structure, never from searching for the content's text.

    `render(contents)` renders the chat with message i's content replaced by `contents[i]`. The
    chat is rendered once as given and once with every non-empty content replaced by a sentinel
    (private-use characters around its index) that no template writes, so the sentinel rendering
    is the template's markup with a marked slot wherever a content goes (a content may appear
    once, several times, merged into another turn as Gemma does with the system message, or not
    at all). The real rendering is then matched against that markup: each slot holds the
    content as given or trimmed (`str.strip` / `rstrip` / `lstrip`, as Jinja's `trim` does), and
    the markup between slots must match exactly, so a content equal to a role name, a markup
    piece or another message is located where the template put it. A template whose markup
    depends on the contents themselves (so no such match exists) gets no content spans, with a
    warning: every token is then labelled "template" rather than guessed.

    Returns (rendered text, [(role, start, stop), ...]) with character positions in the text.
    """
    contents = [m["content"] for m in messages]
    text = render(contents)
    marked = render([f"\ue000{i}\ue001" if content else content for i, content in enumerate(contents)])
    parts = _SENTINEL.split(marked)  # markup at even indices, message indices at odd ones
    markup = parts[0::2]

    def match() -> list[tuple[int, int, int]] | None:
        """Depth-first over each slot's forms: [(message index, start, stop), ...] or None."""
        frames: list[list] = []  # per slot entered: [slot, where its content starts, forms, form tried]
        slot, cursor = 0, 0
        while True:
            if text.startswith(markup[slot], cursor):
                cursor += len(markup[slot])
                if slot == len(markup) - 1:
                    if cursor == len(text):
                        return [(int(parts[2 * f[0] + 1]), f[1], f[1] + len(f[2][f[3]])) for f in frames]
                else:
                    content = contents[int(parts[2 * slot + 1])]
                    frames.append([slot, cursor, list(dict.fromkeys(form(content) for form in _CONTENT_FORMS)), -1])
            while frames:  # the next form of the innermost slot that has one left
                frame = frames[-1]
                frame[3] += 1
                if frame[3] == len(frame[2]):
                    frames.pop()
                elif text.startswith(frame[2][frame[3]], frame[1]):
                    slot, cursor = frame[0] + 1, frame[1] + len(frame[2][frame[3]])
                    break
            else:
                return None

    slots = None
    if not any("\ue000" in piece or "\ue001" in piece for piece in markup):
        slots = match()
    if slots is None:
        warnings.warn(
            "The chat template's markup depends on the message contents, so mechvis cannot locate "
            "them in the rendered chat; every token is labelled 'template'.",
            stacklevel=3,
        )
        return text, []
    return text, [(messages[index]["role"], start, stop) for index, start, stop in slots if stop > start]


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenised, as the end of a sentence, or None. Python strings may hold
    lone surrogates (bytes decoded with errors="surrogateescape", as command-line arguments are,
    or a JSON escape such as \\ud800) that are not Unicode text: tokenizers refuse them with an
    unrelated TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds {text[error.start]!r} at character {error.start}, a lone surrogate that is not Unicode text "
                f"(bytes that are not UTF-8, or a broken \\ud800-style escape); pass valid UTF-8 text")
    return None


def _check_text(text: str, what: str) -> None:
    problem = text_problem(text)
    if problem:
        raise InvalidArgumentError(f"{what} {problem}.")


def check_prompt(prompt: object, chat: bool) -> None:
    """A prompt is a string or (chat mode) a list of messages; anything else is named."""
    if isinstance(prompt, str):
        _check_text(prompt, "The prompt")
        return
    if chat and isinstance(prompt, (list, tuple)):
        return

    if isinstance(prompt, (list, tuple)):
        raise InvalidArgumentError("A list of messages needs chat=True; completion mode takes a string.")
    raise InvalidArgumentError(
        "A prompt is a string, or (with chat=True) a list of {'role', 'content'} messages; "
        f"got {shown(prompt)}."
    )


def encode(
    model: "TransformerBridge", prompt: Prompt, *, chat: bool = False, prepend_bos: bool | None = None
) -> Encoded:
    """Tokenise `prompt` as the model's own pipeline does, with segments.

    Args:
        prompt: a string, or (with `chat=True`) a list of {"role", "content"} messages; a string
            with `chat=True` becomes one user message.
        chat: render the model's chat template, ending with the assistant's generation prompt.
        prepend_bos: completion mode only; None follows the tokenizer (SmolLM2 adds none),
            True/False force a BOS token at position 0 or not.
    """

    chat = check_bool(chat, "chat")
    if prepend_bos is not None:
        prepend_bos = check_bool(prepend_bos, "prepend_bos")
    check_prompt(prompt, chat)
    tokenizer = model.hf_tokenizer
    if chat:
        if prepend_bos is not None:
            raise InvalidArgumentError("prepend_bos applies to completion mode; the chat template decides in chat mode.")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError(
                "This model's tokenizer has no chat template; use chat=False (completion mode)."
            )
        messages = validate_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

        def render(contents: list[str]) -> str:
            chat_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
            return tokenizer.apply_chat_template(chat_messages, tokenize=False, add_generation_prompt=True)

        text, labelled = chat_content_spans(render, messages)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        default_kind = "template"
    else:
        if not isinstance(prompt, str):
            raise InvalidArgumentError("A list of messages needs chat=True; completion mode takes a string.")
        if not prompt.strip():
            raise InvalidArgumentError("The prompt is empty; give the model some text.")
        text = prompt
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        labelled = [("text", 0, len(text))]
        default_kind = "special"
    token_ids: list[int] = list(encoding["input_ids"])
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
    bos_id = tokenizer.bos_token_id
    if not chat and prepend_bos is not None and bos_id is not None:
        has_bos = bool(token_ids) and token_ids[0] == bos_id
        if prepend_bos and not has_bos:
            token_ids, offsets = [bos_id, *token_ids], [(0, 0), *offsets]
        elif not prepend_bos and has_bos:
            token_ids, offsets = token_ids[1:], offsets[1:]
    kinds = token_kinds(offsets, labelled, default_kind)
    if token_ids and token_ids[0] == bos_id:
        kinds[0] = "bos"
    n_ctx = model.cfg.n_ctx
    if len(token_ids) > n_ctx:
        raise InvalidArgumentError(
            f"The prompt is {len(token_ids)} tokens long; this model's context holds {n_ctx}. Shorten it."
        )
    decoded = decode_tokens(tokenizer, token_ids)
    return Encoded(decoded.text, token_ids, decoded.offsets, Segments(merge_spans(kinds), (0,)), decoded.str_tokens)


_PREFIX_BATCH = 256  # prefixes decoded per call by the exact path (bounds memory)


_WINDOW = 16  # tokens of context each windowed decode carries at least


def _common_prefix_length(text: str, other: str, at: int = 0) -> int:
    """The longest m with text[at : at + m] == other[:m], by bisection on C-speed comparisons."""
    low, high = 0, min(len(text) - at, len(other))
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(other[:middle], at):
            low = middle
        else:
            high = middle - 1
    return low


def _prefix_ends(tokenizer: object, ids: list[int], text: str) -> list[tuple[int, bool]]:
    """For each token i: (c_i, whether it ends inside a character), by decoding every prefix
    (the definition; quadratic in the length)."""
    ends = []
    for first in range(0, len(ids), _PREFIX_BATCH):
        prefixes = tokenizer.batch_decode(
            [ids[: i + 1] for i in range(first, min(len(ids), first + _PREFIX_BATCH))], skip_special_tokens=False
        )
        for prefix in prefixes:
            agrees = text.startswith(prefix)
            ends.append((len(prefix), False) if agrees else (_common_prefix_length(text, prefix), True))
    return ends


def _windowed_ends(tokenizer: object, ids: list[int], text: str) -> list[tuple[int, bool]] | None:
    """The same as `_prefix_ends` in linear time, or None where it cannot vouch for that.

    Each token is decoded with the tokens since a window start (as incremental detokenisers in
    TGI and vLLM do), between `_WINDOW` and 2 × `_WINDOW` tokens back, at a token that begins a
    character. The window's text before the anchor (its first decode, which covers tokens
    already placed) is set aside, so a decoder's effect at the window's start, like SentencePiece
    dropping a leading space, cancels; the rest is compared with `text` from the anchor exactly
    as `_prefix_ends` compares a prefix. None, for the caller to use the definition, if a window
    changes the text set aside (e.g. a byte run that turns invalid) or does not end the text."""
    ends: list[tuple[int, bool]] = []
    start, given, anchor = 0, "", 0  # window start, its text set aside, where the rest goes in `text`
    for i in range(len(ids)):
        window = tokenizer.decode(ids[start : i + 1], skip_special_tokens=False)
        if not window.startswith(given):
            return None
        tail = window[len(given) :]
        if not text.startswith(tail, anchor):
            ends.append((anchor + _common_prefix_length(text, tail, anchor), True))
            continue
        ends.append((anchor + len(tail), False))
        if i + 1 - start > 2 * _WINDOW:  # move the window up to the earliest of the last _WINDOW tokens that begins a character
            restart = next((j for j in range(i + 1 - _WINDOW, i + 1) if not ends[j - 1][1]), None)
            if restart is not None:
                start, given, anchor = restart, tokenizer.decode(ids[restart : i + 1], skip_special_tokens=False), ends[-1][0]
    return ends if ends and ends[-1] == (len(text), False) else None


def decode_tokens(tokenizer: object, token_ids: Sequence[int], *, exact: bool = False) -> DecodedTokens:
    """The text of a token sequence decoded whole, with each token's characters in it.

    `text` is `tokenizer.decode(token_ids)`, special tokens included (nothing skipped): a
    character that several byte-level tokens spell (東, 🎉) is whole, never U+FFFD.

    Offsets come from decoding prefixes: the text completed after token i is the longest prefix of
    `text` that `decode(token_ids[:i + 1])` agrees with (and never shorter than after token
    i − 1), so its length c_i never depends on decoding a token alone. Rule for each token i
    (c_{-1} = 0):

    - `str_tokens[i] = text[c_{i-1}:c_i]`, the characters token i completes; they partition
      `text` (``"".join(str_tokens) == text``). A token that ends inside a character (the first
      bytes of 東) completes nothing: its string is "" and the token that completes the
      character carries it.
    - `offsets[i] = (c_{i-1}, c_i)`, extended by one character when the token ends inside a
      character (its prefix decodes to something `text` does not start with): the span of whole
      characters that holds the token's bytes. Tokens sharing a character overlap on it, as the
      offsets of HF's fast tokenizers do, so a keyword search covers every token of the keyword.

    By default each token is decoded within a window of recent tokens (`_windowed_ends`, linear
    time), falling back to decoding every prefix (quadratic) when the windows cannot vouch for
    the same result; `exact=True` always decodes every prefix.
    """
    ids = [int(token) for token in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    ends = None if exact else _windowed_ends(tokenizer, ids, text)
    if ends is None:  # (characters of `text` completed, ends inside a character) for each token
        ends = _prefix_ends(tokenizer, ids, text)
    offsets, pieces, completed = [], [], 0
    for length, inside in ends:
        stop = max(completed, length)
        offsets.append((completed, min(stop + 1, len(text)) if inside else stop))
        pieces.append(text[completed:stop])
        completed = stop
    return DecodedTokens(text, offsets, pieces)


def str_tokens_of(model: "TransformerBridge", token_ids: Sequence[int]) -> list[str]:
    """The text each token of a SEQUENCE completes, from decoding it whole (`decode_tokens`).
    Vocabulary entries out of any sequence (lens top tokens, embedding rows) use `vocabulary_strings`."""
    return decode_tokens(model.hf_tokenizer, token_ids).str_tokens


def vocabulary_strings(model: "TransformerBridge", token_ids: Sequence[int]) -> list[str]:
    """Each vocabulary entry decoded on its own (e.g. ' Paris'), for tokens shown outside any
    sequence; a byte-level token that is part of a character decodes to U+FFFD."""
    return model.hf_tokenizer.batch_decode([[token] for token in token_ids])


def single_token_id(model: "TransformerBridge", token: int | str) -> int:
    """A token id from an id or a string that must be exactly one token (e.g. ' Paris')."""
    vocab = model.cfg.d_vocab
    if not isinstance(token, str):
        token_id = integer(token)
        if token_id is None:
            raise InvalidArgumentError(f"A token is an id or a string; got {token!r}.")
        if not 0 <= token_id < vocab:
            raise InvalidArgumentError(f"token id {token_id} is outside the vocabulary (0..{vocab - 1}).")
        return token_id
    ids = model.hf_tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = str_tokens_of(model, ids)  # decoded whole: a character split into bytes is not U+FFFD
        raise InvalidArgumentError(
            f"{token!r} is {len(ids)} tokens {pieces}, not one. Pass a single token "
            f"(mind the leading space: ' Paris' and 'Paris' differ) or a token id."
        )
    return ids[0]
