"""Executors that run the model and keep only the attention rows an analysis declares, so the
analyses of `mechvis.analysis` read them as they read a full cache (`mechvis.analysis.rows`).

- `record_attention_rows`: one forward pass whose hooks keep the chosen layers' query rows × key
  columns (memory layers × heads × queries × keys, instead of every activation and
  layers × heads × positions² patterns);
- `record_while_decoding`: `mechvis.generate` while hooks keep, at every decoding step, the
  chosen layers' last query row (the state that produces the next token) over the key columns:
  the rows `image_dynamics` and `keyword_dynamics` read, with no cache;
- the blocked long-context forward is `mechvis.studies.longcontext.analyse_long`.

    image_attention(record_attention_rows(model, prompt, image=picture, query_positions=[-1]),
                    query_positions=[-1])  ==  image_attention(mechvis.run(model, prompt, image=picture),
                                                               query_positions=[-1])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechvis._validation import check_layers, check_positions
from mechvis.analysis.rows import RecordedRows
from mechvis.errors import InvalidArgumentError
from mechvis.generation import Recorder, generate
from mechvis.images import encode_with_image
from mechvis.models.architecture import pattern_hook
from mechvis.text import encode
from mechvis.types import Prompt

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation.trace import PromptEvent, Trace


def _encoded(model: "TransformerBridge", prompt: Prompt, image: object | None, chat: bool):
    if image is None:
        return encode(model, prompt, chat=chat), {}
    encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    if encoded.segments.image_grid is None:
        raise InvalidArgumentError("This model's image layout has no grid yet; image metrics need one.")
    return encoded, extra


def _keys(encoded, key_positions: Sequence[int] | None, n_positions: int) -> list[int]:
    """The declared key columns: the given positions, else the image tokens, else every position."""
    if key_positions is not None:
        return check_positions(n_positions, key_positions)
    grid = encoded.segments.image_grid
    return list(grid.positions) if grid is not None else list(range(n_positions))


def record_attention_rows(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    image: object | None = None,
    chat: bool = False,
    layers: Sequence[int] | None = None,
    query_positions: Sequence[int] = (-1,),
    key_positions: Sequence[int] | None = None,
) -> RecordedRows:
    """One forward pass of `prompt` (with `image`) whose hooks keep only the attention rows of
    `query_positions` over `key_positions` (default: the image tokens, or every position without
    an image) in `layers` (default all): a row source for `image_attention` and the other
    analyses that read those rows.

    Raises:
        InvalidArgumentError: a bad prompt or image, an image layout without a grid, layers or
            positions out of range."""
    chosen = check_layers(model, layers)
    encoded, extra = _encoded(model, prompt, image, chat)
    n = len(encoded.token_ids)
    queries = check_positions(n, query_positions)
    keys = _keys(encoded, key_positions, n)
    columns = torch.tensor(keys)
    kept: dict[int, Tensor] = {}

    def keep_rows(pattern: Tensor, hook: object, *, layer: int) -> None:
        kept[layer] = pattern[0][:, queries][..., columns.to(pattern.device)].detach().to("cpu", copy=True)

    hooks = [(pattern_hook(layer), functools.partial(keep_rows, layer=layer)) for layer in chosen]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(torch.tensor([encoded.token_ids], device=model.cfg.device), **extra)
    return RecordedRows(model, n, chosen, queries, keys, torch.stack([kept[layer] for layer in chosen]),
                        segments=encoded.segments, recorded_by="record_attention_rows' layers, query_positions and key_positions")


class DecodingRows(Recorder):
    """A recorder (`generate(..., recorders=[DecodingRows(model)])`) keeping, at every decoding
    step, the chosen layers' last query row (the state that produces the next token, position
    P + s − 1 for generated token s) over `key_positions` of the prompt (default: the image tokens,
    or every prompt position without an image). Its `result`, once the generation finished, is the
    `RecordedRows` the analyses read (`image_dynamics(recorder.result)`).

    Memory: layers × heads × generated tokens × keys, instead of the teacher-forced cache's
    layers × heads × positions².

    Raises:
        InvalidArgumentError: bad layers (here), bad key positions (when decoding starts).
        RuntimeError: the decoding steps were not seen by the hooks."""

    def __init__(self, model: "TransformerBridge", *, layers: Sequence[int] | None = None,
                 key_positions: Sequence[int] | None = None) -> None:
        self.model = model
        self.layers = check_layers(model, layers)
        self.key_positions = key_positions
        self._result: RecordedRows | None = None

    def start(self, model: "TransformerBridge", prompt: "PromptEvent") -> None:
        self.keys = _keys(prompt, self.key_positions, len(prompt.token_ids))
        self.columns = torch.tensor(self.keys)
        self.steps: list[Tensor] = []
        self._rows: dict[int, Tensor] = {}
        self._result = None

    def _record(self, pattern: Tensor, hook: object, *, layer: int) -> None:
        if pattern.shape[-1] <= int(self.columns.max()):
            raise RuntimeError(
                f"A decode step's attention has {pattern.shape[-1]} keys, fewer than the last declared key "
                f"{int(self.columns.max())}: the KV-cached decode does not see the prompt through the hooks."
            )
        self._rows[layer] = pattern[0, :, -1:, self.columns.to(pattern.device)].detach().to("cpu", copy=True)
        if layer == self.layers[-1]:
            self.steps.append(torch.stack([self._rows[each] for each in self.layers]))  # (layer, head, 1, key)
            self._rows = {}

    def hook_points(self, model: "TransformerBridge") -> list:
        return [(pattern_hook(layer), functools.partial(self._record, layer=layer)) for layer in self.layers]

    def finish(self, trace: "Trace") -> None:
        steps = self.steps[: len(trace.generated_ids)]
        if len(steps) != len(trace.generated_ids):
            raise RuntimeError(f"Recorded {len(steps)} decode steps for {len(trace.generated_ids)} tokens; were the hooks active?")
        queries = [position - 1 for position in trace.generated_positions]
        rows = torch.cat(steps, dim=2) if steps else torch.zeros(len(self.layers), self.model.cfg.n_heads, 0, len(self.keys))
        self._result = RecordedRows(
            self.model, len(trace.run.tokens), self.layers, queries, self.keys, rows, segments=trace.run.segments, trace=trace,
            recorded_by="record_while_decoding's layers and key_positions (every generated token's producing state)")

    @property
    def result(self) -> RecordedRows | None:
        return self._result


def record_while_decoding(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    image: object | None = None,
    chat: bool = False,
    layers: Sequence[int] | None = None,
    key_positions: Sequence[int] | None = None,
    **generate_options,
) -> RecordedRows:
    """`mechvis.generate` (options passed on) with a `DecodingRows` recorder plugged in: the
    attention rows of every decoding step, with no cache. The result's `trace` is the generation;
    its analysis pass caches nothing unless `names_filter` is passed.

    Raises:
        InvalidArgumentError: as `generate`; an image layout without a grid, bad layers or keys.
        RuntimeError: the decoding steps were not seen by the hooks."""
    if image is not None:
        _encoded(model, prompt, image, chat)  # an image layout without a grid is refused before decoding
    recorder = DecodingRows(model, layers=layers, key_positions=key_positions)
    generate_options.setdefault("names_filter", lambda name: False)
    recorders = [*generate_options.pop("recorders", ()), recorder]
    generate(model, prompt, image=image, chat=chat, recorders=recorders, **generate_options)
    return recorder.result
