"""The one place the app meets the decoding loop: `token_stream` yields the prompt's
`mechvis.PromptEvent`, one `mechvis.TokenEvent` per decoded token, then the analysed `Trace`
(`mechvis.stream_generate`; `close()` cancels)."""

from __future__ import annotations

from collections.abc import Iterator

import mechvis


def token_stream(model, prompt, **options) -> Iterator:
    """`mechvis.stream_generate(model, prompt, **options)`."""
    return mechvis.stream_generate(model, prompt, **options)
