"""Image metrics recorded while the model runs: `stream_image_attention` (one forward pass),
`StreamedImageDynamics` (a recorder of the decoding steps) and `stream_image_dynamics` (a
generation with it), hooks instead of a full cache."""

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
from mechvis.generation import Recorder, generate
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


class StreamedImageDynamics(Recorder):
    """A recorder for `generate(model, prompt, image=..., recorders=[recorder])`: hooks on the
    attention patterns summarise each decode step's last query row as it is computed (memory
    layers × heads × tokens for the metrics, plus layers × tokens × cells for the head-mean maps,
    instead of the teacher-forced cache's layers × heads × positions²). `result`: the
    `ImageDynamics` of the generated tokens, once the generation finished.

    Raises:
        InvalidArgumentError: bad layers or regions (here); a prompt without an image grid or a
            sink cell outside it (when the generation starts)."""

    def __init__(
        self,
        model: "TransformerBridge",
        *,
        layers: Sequence[int] | None = None,
        regions: Sequence[str] | Mapping[str, Box] = DEFAULT_REGIONS,
        sink_cells: Sequence[int] = (),
    ) -> None:
        self.layers = check_layers(model, layers)
        self.boxes = _boxes(regions)
        self.sink_cells = tuple(sink_cells)
        self._result: ImageDynamics | None = None

    def start(self, model: "TransformerBridge", prompt) -> None:
        self.grid = prompt.segments.image_grid
        if self.grid is None:
            raise InvalidArgumentError("This model's image layout has no grid yet; image dynamics need one.")
        self.keep = _keep(self.grid, self.sink_cells)
        self.cells = torch.tensor(self.grid.positions)
        self.parts: list[dict] = []
        self._rows: dict[int, Tensor] = {}
        self._result = None

    def _record(self, pattern: Tensor, hook, *, layer: int) -> None:
        if pattern.shape[-1] <= int(self.cells.max()):
            raise RuntimeError(
                f"A decode step's attention has {pattern.shape[-1]} keys, fewer than the image's last position "
                f"{int(self.cells.max())}: the KV-cached decode does not see the prompt through the hooks."
            )
        self._rows[layer] = pattern[0, :, -1:, self.cells.to(pattern.device)].detach().to("cpu", torch.float64)
        if layer == self.layers[-1]:
            rows = torch.stack([self._rows[l] for l in self.layers])
            self.parts.append(_summarise(rows, self.grid, self.boxes, self.keep))
            self._rows = {}

    def hook_points(self, model: "TransformerBridge") -> list:
        return [(pattern_hook(layer), functools.partial(self._record, layer=layer)) for layer in self.layers]

    def finish(self, trace: "Trace") -> None:
        parts = self.parts[: len(trace.generated_ids)]
        if len(parts) != len(trace.generated_ids):
            raise RuntimeError(f"Recorded {len(parts)} decode steps for {len(trace.generated_ids)} tokens; were the hooks active?")
        queries = [position - 1 for position in trace.generated_positions]
        self._result = _assemble(parts, trace.run.str_tokens[trace.prompt_length :], self.layers, self.grid, queries, self.boxes)

    @property
    def result(self) -> ImageDynamics | None:
        return self._result


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
    """Generate with `mechvis.generate` (options passed on) with a `StreamedImageDynamics`
    recorder plugged in: the image dynamics of each decode step, recorded while decoding. The
    returned trace's analysis pass caches nothing unless `names_filter` is passed."""

    recorder = StreamedImageDynamics(model, layers=layers, regions=regions, sink_cells=sink_cells)
    generate_options.setdefault("names_filter", lambda name: False)
    recorders = [*generate_options.pop("recorders", ()), recorder]
    trace = generate(model, prompt, image=image, chat=chat, recorders=recorders, **generate_options)
    return trace, recorder.result
