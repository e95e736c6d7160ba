"""Image metrics recorded while the model decodes: `stream_image_attention`,
`stream_image_dynamics` (hooks on the decoding steps instead of a full cache)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechvis._validation import check_layers, check_positions
from mechvis.analysis.dynamics import DEFAULT_REGIONS, ImageDynamics, _assemble, _boxes, _keep, _summarise
from mechvis.analysis.regions import Box
from mechvis.analysis.vision import ImageAttention, _from_rows
from mechvis.errors import InvalidArgumentError
from mechvis.generation import generate
from mechvis.generation.trace import Trace
from mechvis.images import encode_with_image
from mechvis.models.architecture import pattern_hook

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def stream_image_attention(
    model: "TransformerBridge",
    prompt: str,
    image: object,
    *,
    query_positions: Sequence[int] = (-1,),
    layers: Sequence[int] | None = None,
    chat: bool = False,
    sink_cells: Sequence[int] = (),
) -> ImageAttention:
    """image_attention without a cache: one forward pass whose hooks keep only the query rows ×
    image columns of each layer's attention (memory: layers × heads × queries × image tokens,
    instead of every activation and layers × heads × positions² patterns)."""

    chosen = check_layers(model, layers)
    encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    grid = encoded.segments.image_grid
    if grid is None:
        raise InvalidArgumentError("This model's image layout has no grid yet; image metrics need one.")
    queries = check_positions(len(encoded.token_ids), query_positions)
    cells = torch.tensor(grid.positions)
    kept: dict[int, Tensor] = {}

    def keep_rows(pattern: Tensor, hook: object, layer: int) -> None:
        kept[layer] = pattern[0][:, queries][..., cells].detach().clone()

    hooks = [(pattern_hook(layer), lambda pattern, hook, layer=layer: keep_rows(pattern, hook, layer)) for layer in chosen]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(torch.tensor([encoded.token_ids], device=model.cfg.device), **extra)
    return _from_rows(chosen, queries, grid, torch.stack([kept[layer] for layer in chosen]), sink_cells)


def stream_image_dynamics(
    model: "TransformerBridge",
    prompt: str,
    image: object,
    *,
    layers: Sequence[int] | None = None,
    regions: Sequence[str] | Mapping[str, Box] = DEFAULT_REGIONS,
    sink_cells: Sequence[int] = (),
    chat: bool = False,
    **generate_options,
) -> tuple["Trace", ImageDynamics]:
    """Generate with `mechvis.generate` (options passed on) while hooks on the attention patterns
    summarise each decode step's last query row as it is computed: memory layers × heads × tokens
    for the metrics (plus layers × tokens × cells for the head-mean maps) instead of the
    teacher-forced cache's layers × heads × positions². The returned trace's analysis pass caches
    nothing unless `names_filter` is passed."""

    chosen = check_layers(model, layers)
    boxes = _boxes(regions)
    encoded, _ = encode_with_image(model, prompt, image, chat=chat)
    grid = encoded.segments.image_grid
    if grid is None:
        raise InvalidArgumentError("This model's image layout has no grid yet; image dynamics need one.")
    keep = _keep(grid, sink_cells)
    cells = torch.tensor(grid.positions)
    parts: list[dict] = []
    state: dict = {"rows": {}, "decoding": True, "passes": 0}

    def record(pattern: Tensor, hook, *, layer: int) -> None:
        if not state["decoding"]:
            return
        if layer == chosen[0]:
            if state["passes"] > 0 and pattern.shape[2] > 1:  # the analysis pass after decoding
                state["decoding"] = False
                return
            state["passes"] += 1
        if pattern.shape[-1] <= int(cells.max()):
            raise RuntimeError(
                f"A decode step's attention has {pattern.shape[-1]} keys, fewer than the image's last position "
                f"{int(cells.max())}: the KV-cached decode does not see the prompt through the hooks."
            )
        state["rows"][layer] = pattern[0, :, -1:, cells.to(pattern.device)].detach().to("cpu", torch.float64)
        if layer == chosen[-1]:
            rows = torch.stack([state["rows"][l] for l in chosen])
            parts.append(_summarise(rows, grid, boxes, keep))
            state["rows"] = {}

    hooks = [(pattern_hook(layer), functools.partial(record, layer=layer)) for layer in chosen]
    generate_options.setdefault("names_filter", lambda name: False)
    with model.hooks(fwd_hooks=hooks):
        trace = generate(model, prompt, image=image, chat=chat, **generate_options)
    parts = parts[: len(trace.generated_ids)]
    if len(parts) != len(trace.generated_ids):
        raise RuntimeError(f"Recorded {len(parts)} decode steps for {len(trace.generated_ids)} tokens; were the hooks active?")
    queries = [position - 1 for position in trace.generated_positions]
    return trace, _assemble(parts, trace.run.str_tokens[trace.prompt_length :], chosen, grid, queries, boxes)
