"""Deprecated (one release): `stream_image_attention` and `stream_image_dynamics`, today the
executors of `mechvis.studies.executors` followed by the one analysis of each metric:

    image_attention(record_attention_rows(model, prompt, image=image, query_positions=q), query_positions=q)
    image_dynamics(record_while_decoding(model, prompt, image=image, max_new_tokens=n))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mechvis._deprecation import deprecated
from mechvis.analysis.dynamics import DEFAULT_REGIONS, ImageDynamics, image_dynamics
from mechvis.analysis.regions import Box
from mechvis.analysis.vision import ImageAttention, image_attention
from mechvis.studies.executors import record_attention_rows, record_while_decoding

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace


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
    """Deprecated: `image_attention(record_attention_rows(model, prompt, image=image, layers=layers,
    query_positions=query_positions), query_positions=query_positions, sink_cells=sink_cells)`
    (one forward whose hooks keep only the query rows × image columns)."""
    deprecated("stream_image_attention is deprecated: call image_attention(record_attention_rows(model, prompt, image=image, "
               "query_positions=q), query_positions=q, ...) (mechvis.studies.executors).")
    recorded = record_attention_rows(model, prompt, image=image, chat=chat, layers=layers, query_positions=query_positions)
    return image_attention(recorded, query_positions=recorded.queries, layers=recorded.layers, sink_cells=sink_cells)


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
    """Deprecated: `recorded = record_while_decoding(model, prompt, image=image, layers=layers,
    **generate_options)`, then `(recorded.trace, image_dynamics(recorded, regions=regions,
    sink_cells=sink_cells))` (hooks while decoding, no cache)."""
    deprecated("stream_image_dynamics is deprecated: call image_dynamics(record_while_decoding(model, prompt, image=image, ...), "
               "...) (mechvis.studies.executors); the trace is the recording's .trace.")
    recorded = record_while_decoding(model, prompt, image=image, chat=chat, layers=layers, **generate_options)
    return recorded.trace, image_dynamics(recorded, layers=recorded.layers, regions=regions, sink_cells=sink_cells)
