"""Every metric of the report for long inputs in bounded memory: one forward pass through the
bridge whose attention runs in blocks of queries and is reduced to what the metrics need as it
goes, then row-block passes over the residual streams it kept.

The cache-based analyses hold every layer's attention pattern (layers × heads × N² floats: 72 GB
for the embedded model at 8,192 tokens) and the logits of every position (N × vocab). Here:
- attention: each layer's softmax is computed for `block_size` queries at a time over the keys
  the layer's mask lets them see (`mechvis.models.architecture.attention_layout`: causal, sliding
  window, chunks), exactly as the bridge's own attention computes it (scaling, GQA, soft-capping),
  and reduced on the spot to each row's entropy (nats) and sink mass, the rows of chosen queries
  the repetition signals read, and the attention output; the N × N pattern never exists.
- residual streams: every layer's `hook_resid_post` is kept (layers × N × d_model floats, 19 MB
  per layer at 8,192 × 576): layer similarity, activation norms, the logit lens, DLA and the
  rollout's second pass read them.
- logits: computed in row blocks from the final residual stream (token signals, the repetition
  signals' logits); the logit lens decodes its chosen positions only, layer by layer.
- rollout rows (Abnar & Zuidema 2020): e_qᵀ Â_L ⋯ Â_1 needs the top layer first, so after the
  forward a second pass walks the layers from the top down, recomputes each layer's queries and
  keys from its stored input residual (the block's own ln1 and attention projections, rotary
  included) and propagates the rows through Â_ℓ in query blocks: O(k · N²) per layer.

Results are the cache-based functions' own types (`TokenSignals`, `LogitLens`, `HeadEntropy`,
`ActivationNorms`, `ActivationStatistics`, `LayerSimilarity`, `RolloutRows`, `LogitAttribution`,
`RepetitionFeatures`); the logit lens and DLA run the cache-based functions themselves on the rows
they need.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pydoc_data.topics import topics
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)

from mechvis._deprecation import deprecated
from mechvis._numerics import row_entropy
from mechvis._validation import (
    check_bool,
    check_integer,
    check_k,
    check_layers,
    check_positions,
    check_real,
    check_token_ids,
    shown,
    with_model,
)
from mechvis.analysis.activations import ActivationNorms, ActivationStatistics, layer_statistics
from mechvis.analysis.attention import HeadEntropy, RolloutRows
from mechvis.analysis.dynamics import DEFAULT_REGIONS, image_dynamics
from mechvis.analysis.lens import LogitLens, lens_hook_names, logit_lens, unembed_logits
from mechvis.analysis.repetition import SeedScore
from mechvis.analysis.residual import LayerSimilarity, LogitAttribution, direct_logit_attribution
from mechvis.analysis.rows import Reads, select_recorded
from mechvis.analysis.tokens import HighEntropyPositions, TokenSignals, block_signals, high_entropy_positions
from mechvis.analysis.vision import image_attention, vision_rollout
from mechvis.errors import InvalidArgumentError, UnsupportedArchitectureError
from mechvis.generation.monitor import InductionHeads, RepetitionFeatures, feature_layer, feature_values
from mechvis.models.architecture import LayerAttention, attention_layout
from mechvis.models.loading import large_allocations_mapped, release_freed_memory
from mechvis.results import Result
from mechvis.text import encode, single_token_id

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.analysis.dynamics import ImageDynamics
    from mechvis.analysis.repetition import SeedScore
    from mechvis.analysis.vision import ImageAttention, VisionRollout
    from mechvis.generation import Trace
    from mechvis.generation.monitor import InductionHeads, RepetitionFeatures
    from mechvis.types import ImageGrid

_SCORE_BYTES = 48 << 20  # one query block's scores (heads × block × keys float32) stay under this
_LOGIT_ROWS = 256  # rows of logits decoded at once (256 × 49,152 float32 = 50 MB)


@dataclass
class LongContextAnalysis(Result):
    """What `analyse_long` computed for one sequence; every field is the type the cache-based
    analysis of the same name returns (None where not requested)."""

    tokens: Int[Tensor, " pos"]
    signals: TokenSignals
    lens: LogitLens
    entropy: HeadEntropy
    norms: dict[str, ActivationNorms]  # "resid_post", "attn_out", "mlp_out"
    statistics: dict[str, ActivationStatistics]  # "mlp_post", "attn_out"
    similarity: LayerSimilarity
    rollout: RolloutRows | None
    attribution: LogitAttribution | None
    repetition: "RepetitionFeatures | None"
    block_size: int
    high_entropy: HighEntropyPositions | None = None  # the report's: highest-entropy positions but the last
    residuals: dict[int, Tensor] = field(default_factory=dict)  # layer -> hook_resid_post (pos, d_model), `keep_residuals`
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    # `image_queries` × `image_positions` of every layer's attention (layer, head, query, cell), float32
    image_rows: Tensor | None = None
    image_queries: list[int] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)
    captured: dict[str, Tensor] = field(default_factory=dict)  # `capture`'s hooks, whole (batch dimension kept)
    seed: "SeedScore | None" = None  # the seed's loop score of the generated tokens (with `prompt_length`)
    # rank of token t + 1 in the distribution predicted at t (0 = top), the last position's -1
    next_ranks: Tensor | None = None
    model: Any = field(default=None, repr=False, compare=False)  # the model analysed (the row source's)

    # --- a row source (mechvis.analysis.rows): image_attention(result, ...), image_dynamics(result, trace=...),
    # vision_rollout(result, ...) read the image rows, rollout rows and hooks this forward kept.
    @property
    def n_positions(self) -> int:
        return self.tokens.numel()

    @property
    def hooks(self) -> dict[str, Tensor]:
        """The hooks `capture` kept and the kept residual streams (`blocks.ℓ.hook_resid_post`), batch dimension first."""
        residuals = {f"blocks.{layer}.hook_resid_post": residual[None] for layer, residual in self.residuals.items()}
        return {**self.captured, **residuals}

    def attention_rows(self, reads: Reads) -> Float[Tensor, "layer head query key"]:
        if self.image_rows is None:
            raise InvalidArgumentError(
                "This analysis kept no image rows: run analyse_long with image_queries= and image_positions= (the image tokens)."
            )
        recorded = (range(self.image_rows.shape[0]), self.image_queries, self.image_positions)
        return select_recorded(self.image_rows, recorded, reads, "analyse_long's image_queries and image_positions")

    def rollout_rows(self, queries: Sequence[int], head_fusion: str, residual_weight: float) -> Float[Tensor, "query key"]:
        rolled = self.rollout
        if rolled is None or any(query not in rolled.queries for query in queries):
            raise InvalidArgumentError(f"analyse_long computed rollout rows for {None if rolled is None else rolled.queries}; "
                                       f"include the queries {list(queries)} in its queries=.")
        if (head_fusion, residual_weight) != (rolled.head_fusion, rolled.residual_weight):
            raise InvalidArgumentError(f"analyse_long's rollout rows fuse heads by {rolled.head_fusion!r} with residual weight "
                                       f"{rolled.residual_weight}; ask for the same, or pass those to analyse_long.")
        return rolled.rows[[rolled.queries.index(query) for query in queries]].double()


class _Intercepted(Exception):
    """Raised from the bridge's post-rotary key hook to hand its queries and keys to mechvis's
    blocked attention instead of the bridge's full N × N one."""


def check_long_context_support(model: "TransformerBridge") -> None:
    """Refuse, before any work, attention variants the blocked path does not reproduce.

    Raises:
        UnsupportedArchitectureError: learned sinks, gated, split or non-rotary attention, ..."""

    config = model.cfg
    for layer, block in enumerate(model.blocks):
        attention = block.attn
        hf_attention = attention.original_component
        reasons = []
        if not isinstance(attention, PositionEmbeddingsAttentionBridge) or not hasattr(attention, "hook_rot_k"):
            reasons.append(f"its attention ({type(attention).__name__}) is not a rotary attention bridge")
        if getattr(hf_attention, "sinks", None) is not None:
            reasons.append("it has learned attention sinks")
        if any(getattr(config, flag, False) for flag in ("gated_q_proj", "use_attn_result", "use_split_qkv_input",
                                                          "use_attn_in", "qk_norm_after_rope")):
            reasons.append("it gates, splits or post-normalises its attention")
        if attention._modules.get("gate") is not None or getattr(type(attention), "_pre_output_projection", None) is not (
            PositionEmbeddingsAttentionBridge._pre_output_projection
        ):
            reasons.append("it transforms the attention output before the output projection")
        if getattr(getattr(hf_attention, "config", None), "clip_qkv", None) is not None:
            reasons.append("it clips q/k/v")
        if reasons:
            raise UnsupportedArchitectureError(
                f"Long-context analysis does not support {config.model_name} (layer {layer}: {'; '.join(reasons)}). "
                "Use mechvis.run with a names_filter on a shorter input instead."
            )


def _query_blocks(n_positions: int, block_size: int, layer: LayerAttention) -> list[tuple[int, int, int, int]]:
    """(query start, query stop, first key, key stop) for each block of queries."""
    starts = torch.arange(0, n_positions, block_size)
    stops = (starts + block_size).clamp_max(n_positions)
    firsts = layer.first_visible(starts)
    lasts = layer.last_visible(stops - 1, n_positions)
    return list(zip(starts.tolist(), stops.tolist(), firsts.tolist(), (lasts + 1).tolist()))


def _block_pattern(
    query: Float[Tensor, "kv group q d"], key: Float[Tensor, "kv k d"], scaling: float, softcap: float | None,
    layer: LayerAttention, query_start: int, key_start: int,
) -> Float[Tensor, "head q k"]:
    """softmax(q kᵀ · scaling [soft-capped], masked) of one block, as the bridge computes it
    (float32 softmax); GQA by grouping query heads over their shared key head, not copying keys."""
    scores = torch.matmul(query, key[:, None].transpose(-1, -2)).mul_(scaling).flatten(0, 1)  # (head, q, k)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    n_queries, n_keys = scores.shape[-2:]
    # Only the columns some query of the block cannot see need the mask: before the last query's
    # first visible key (windows, chunks) and after the first query's last visible key (causal).
    last_query = torch.tensor([query_start + n_queries - 1])
    all_from = int(layer.first_visible(last_query)) - key_start
    all_to = int(layer.last_visible(torch.tensor([query_start]), 1 << 62)) - key_start + 1
    for low, high in ((0, min(all_from, n_keys)), (max(all_to, 0), n_keys)):
        if high > low:
            queries = torch.arange(query_start, query_start + n_queries)[:, None]
            keys = torch.arange(key_start + low, key_start + high)[None, :]
            visible = (keys >= layer.first_visible(queries)) & (keys <= layer.last_visible(queries, 1 << 62))
            scores[..., low:high].masked_fill_(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


@dataclass
class _LayerState:
    entropy: Tensor | None = None  # (head, pos)
    sink_mass: Tensor | None = None  # (head, pos)
    sink_rows: Tensor | None = None  # (head, state, sinks): repetition's sink columns
    induction_rows: dict[int, Tensor] = field(default_factory=dict)  # head -> (state, pos)
    image_rows: Tensor | None = None  # (head, image query, image cell)
    mean_row_entropy: Tensor | None = None  # (state,): entropy of the head-mean row (the seed score's F_t), float64


class _Recorder:
    """The forward's hooks and blocked attention; keeps only reductions and residual streams."""

    def __init__(self, model, n_positions, block_size, sinks, states, induction_heads, lens_positions,
                 include_resid_mid, dla_position, image_queries=(), image_positions=(), capture=()):
        self.model = model
        self.image_queries = torch.tensor(list(image_queries), dtype=torch.long)
        self.image_positions = torch.tensor(list(image_positions), dtype=torch.long)
        self.capture = list(capture)
        self.captured_activations: dict[str, Tensor] = {}
        self.n = n_positions
        self.block_size = block_size
        self.sinks = list(sinks)
        self.states = list(states)
        self.induction: dict[int, list[int]] = {}
        for layer, head in induction_heads:
            self.induction.setdefault(layer, []).append(head)
        self.layout = attention_layout(model)
        self.layers = [_LayerState() for _ in range(model.cfg.n_layers)]
        self.residuals: list[Tensor | None] = [None] * (model.cfg.n_layers + 1)  # embed, then each resid_post
        self.position_embeddings: list[Any] = [None] * model.cfg.n_layers
        self.lens_positions = lens_positions
        self.include_resid_mid = include_resid_mid
        self.lens_rows: dict[str, Tensor] = {}
        self.dla_position = dla_position
        self.dla_rows: dict[str, Tensor] = {}
        self.norms = {kind: [None] * model.cfg.n_layers for kind in ("resid_post", "attn_out", "mlp_out")}
        self.statistics = {kind: [None] * model.cfg.n_layers for kind in ("mlp_post", "attn_out")}
        self.captured: dict[str, Tensor] = {}
        self.progress = None

    # --- attention -----------------------------------------------------------------------------
    def _attention_forward(self, layer: int):
        attention = self.model.blocks[layer].attn
        original = attention.forward

        def forward(*args, **kwargs):
            self.position_embeddings[layer] = kwargs.get("position_embeddings")
            try:
                original(*args, **kwargs)
            except _Intercepted:
                pass
            else:
                raise UnsupportedArchitectureError("The attention bridge never reached its rotary key hook.")
            query, key, value = self.captured.pop("q"), self.captured.pop("k"), self.captured.pop("v")
            hidden_shape = (*value.shape[:-1], -1, attention.original_component.head_dim)
            value = value.view(hidden_shape).transpose(1, 2)
            z = self._blocked_attention(layer, query[0], key[0], value[0])  # (pos, head · d_head)
            output = attention.hook_out(attention.o(z[None]))
            if self.progress is not None:
                self.progress.update()
            return output, None

        return forward

    def _grouped(self, layer: int, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor, float, float | None]:
        hf_attention = self.model.blocks[layer].attn.original_component
        n_kv = key.shape[0]
        grouped = query.view(n_kv, query.shape[0] // n_kv, *query.shape[1:])
        head_dim = query.shape[-1]
        return grouped, key, getattr(hf_attention, "scaling", head_dim**-0.5), getattr(hf_attention, "attn_logit_softcapping", None)

    def _blocked_attention(self, layer: int, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Attention output (pos, head · d_head) by query blocks, recording the layer's reductions."""
        grouped, key, scaling, softcap = self._grouped(layer, query, key)
        n_heads, n_kv = query.shape[0], key.shape[0]
        group = n_heads // n_kv
        state = self.layers[layer]
        entropy = torch.empty(n_heads, self.n)
        sink_mass = torch.zeros(n_heads, self.n)
        output = torch.empty(self.n, n_heads, value.shape[-1], dtype=value.dtype)
        states = torch.tensor(self.states, dtype=torch.long)
        sinks = torch.tensor(self.sinks, dtype=torch.long)
        if len(self.states):
            state.sink_rows = torch.zeros(n_heads, len(self.states), len(self.sinks))
            if layer == self.model.cfg.n_layers - 1:
                state.mean_row_entropy = torch.zeros(len(self.states), dtype=torch.float64)
            state.induction_rows = {head: torch.zeros(len(self.states), self.n) for head in self.induction.get(layer, [])}
        image_queries, cells = self.image_queries, self.image_positions
        if len(image_queries):
            state.image_rows = torch.zeros(n_heads, len(image_queries), len(cells))
        for start, stop, first, key_stop in _query_blocks(self.n, self.block_size, self.layout[layer]):
            pattern = _block_pattern(grouped[:, :, start:stop], key[:, first:key_stop], scaling, softcap,
                                     self.layout[layer], start, first)  # (head, q, k)
            mixed = torch.matmul(pattern.view(n_kv, group, stop - start, -1), value[:, None, first:key_stop])
            output[start:stop] = mixed.flatten(0, 1).transpose(0, 1)
            float_pattern = pattern.float()
            entropy[:, start:stop] = row_entropy(float_pattern)  # −Σ p ln p, 0 ln 0 = 0
            in_block = sinks[(sinks >= first) & (sinks < key_stop)]
            if len(in_block):
                sink_mass[:, start:stop] = float_pattern[..., in_block - first].sum(-1)
            chosen = ((states >= start) & (states < stop)).nonzero()[:, 0]
            if len(chosen):
                rows = float_pattern[:, states[chosen] - start]  # (head, chosen, k)
                for column, sink in enumerate(self.sinks):
                    if first <= sink < key_stop:
                        state.sink_rows[:, chosen, column] = rows[..., sink - first]
                for head, stored in state.induction_rows.items():
                    stored[chosen, first:key_stop] = rows[head]
                if state.mean_row_entropy is not None:  # keys outside the block's span hold 0: nothing to add
                    state.mean_row_entropy[chosen] = row_entropy(rows.double().mean(0))
            # image rows: the chosen queries' mass on each image token (the cells this block's keys hold;
            # a cell no key of the block covers is one the query cannot see: 0)
            chosen = ((image_queries >= start) & (image_queries < stop)).nonzero()[:, 0]
            inside = ((cells >= first) & (cells < key_stop)).nonzero()[:, 0]
            if len(chosen) and len(inside):
                rows = float_pattern[:, image_queries[chosen] - start][..., cells[inside] - first]  # (head, chosen, inside)
                state.image_rows[:, chosen[:, None], inside[None, :]] = rows
        state.entropy, state.sink_mass = entropy, sink_mass
        return output.flatten(1)

    def rollout_factor_rows(self, layer: int, rows: Tensor, head_fusion: str, residual_weight: float) -> Tensor:
        """rows · Â_ℓ with layer ℓ's queries and keys recomputed from its stored input residual."""
        block = self.model.blocks[layer]
        attention = block.attn
        hidden = block.ln1(self.residuals[layer][None])
        self.captured.clear()
        try:
            attention.__class__.forward(attention, hidden, position_embeddings=self.position_embeddings[layer], attention_mask=None)
        except _Intercepted:
            pass
        query, key = self.captured.pop("q")[0], self.captured.pop("k")[0]
        self.captured.clear()
        grouped, key, scaling, softcap = self._grouped(layer, query, key)
        result = torch.zeros_like(rows)
        for start, stop, first, key_stop in _query_blocks(self.n, self.block_size, self.layout[layer]):
            pattern = _block_pattern(grouped[:, :, start:stop], key[:, first:key_stop], scaling, softcap,
                                     self.layout[layer], start, first)
            # Â rows = ((1 − w)·fuse_h(A) + w·I) / their sum, applied without building Â: the
            # fused heads (float32, one block) times the rows' weights scaled per query, plus w on
            # the diagonal; float64 from the fused block on.
            fused = {"mean": pattern.mean(0), "max": pattern.amax(0), "min": pattern.amin(0)}[head_fusion].double()
            row_sums = (1.0 - residual_weight) * fused.sum(-1) + residual_weight  # (block,)
            weights = rows[:, start:stop] / row_sums  # (query rows, block)
            result[:, first:key_stop] += ((1.0 - residual_weight) * weights) @ fused
            result[:, start:stop] += residual_weight * weights  # the diagonal key q of each query q
        return result

    # --- hooks ---------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Any]]:
        n_layers = self.model.cfg.n_layers
        hooks: list[tuple[str, Any]] = [("blocks.0.hook_resid_pre", self._residual(0))]
        for layer in range(n_layers):
            hooks += [
                (f"blocks.{layer}.hook_resid_post", self._residual(layer + 1)),
                (f"blocks.{layer}.hook_attn_out", self._output(layer, "attn_out")),
                (f"blocks.{layer}.hook_mlp_out", self._output(layer, "mlp_out")),
                (f"blocks.{layer}.mlp.hook_post", self._mlp_post(layer)),
            ]
            if self.include_resid_mid:
                name = f"blocks.{layer}.hook_resid_mid"
                hooks.append((name, self._rows_of(self.lens_rows, self.lens_positions, name)))
        if self.dla_position is not None:
            names = ["hook_embed", "ln_final.hook_scale"] + [
                f"blocks.{layer}.{hook}" for layer in range(n_layers) for hook in ("hook_attn_out", "hook_mlp_out", "attn.hook_z")
            ]
            if "hook_pos_embed" in self.model.hook_dict:
                names.append("hook_pos_embed")
            names += [f"blocks.{layer}.ln1_post.hook_scale" for layer in range(n_layers)
                      if f"blocks.{layer}.ln1_post.hook_scale" in self.model.hook_dict]
            hooks += [(name, self._rows_of(self.dla_rows, [self.dla_position], name)) for name in names]
        hooks += [(name, self._keep_whole(name)) for name in self.capture]
        hooks.append(("unembed.hook_in", self._stop))
        return hooks

    def _keep_whole(self, name: str):
        def hook(tensor, hook):
            self.captured_activations[name] = tensor.detach().clone()
        return hook

    def _residual(self, index: int):
        def hook(tensor, hook):
            residual = tensor[0].detach().float().clone()
            self.residuals[index] = residual
            if index > 0:
                self.norms["resid_post"][index - 1] = residual.norm(dim=-1)
        return hook

    def _output(self, layer: int, kind: str):
        def hook(tensor, hook):
            values = tensor[0].detach()
            self.norms[kind][layer] = values.float().norm(dim=-1)
            if kind == "attn_out":
                self.statistics[kind][layer] = layer_statistics(values.flatten()[None])
        return hook

    def _mlp_post(self, layer: int):
        def hook(tensor, hook):
            self.statistics["mlp_post"][layer] = layer_statistics(tensor[0].detach().flatten()[None])
        return hook

    @staticmethod
    def _rows_of(store: dict[str, Tensor], positions: Sequence[int], name: str):
        index = torch.tensor(list(positions), dtype=torch.long)

        def hook(tensor, hook):
            store[name] = tensor.detach()[:, index.to(tensor.device)].clone()
        return hook

    @staticmethod
    def _stop(tensor, hook):
        raise _StopForward

    def raw_hooks(self) -> list:
        """Plain torch hooks (HF layout, no transformer-lens conversion) on q/k/v."""
        handles = []
        for block in self.model.blocks:
            attention = block.attn
            handles.append(attention.v.register_forward_hook(lambda module, args, out: self.captured.__setitem__("v", out.detach())))
            handles.append(attention.hook_rot_q.register_forward_hook(
                lambda module, args, out: self.captured.__setitem__("q", out.detach())))

            def key_hook(module, args, out):
                self.captured["k"] = out.detach()
                raise _Intercepted

            handles.append(attention.hook_rot_k.register_forward_hook(key_hook))
        return handles


class _StopForward(Exception):
    """Stops the forward before the unembedding (N × vocab logits that no metric needs whole)."""


def _tokens_of(model: "TransformerBridge", prompt_or_tokens: "str | Sequence[int] | Tensor", chat: bool) -> Tensor:
    if isinstance(prompt_or_tokens, str) or (isinstance(prompt_or_tokens, Sequence) and prompt_or_tokens
                                             and isinstance(prompt_or_tokens[0], dict)):

        tokens = torch.tensor(encode(model, prompt_or_tokens, chat=chat).token_ids, dtype=torch.long)
    else:
        tokens = check_token_ids(model, prompt_or_tokens).long().cpu()
    if tokens.numel() > model.cfg.n_ctx:
        raise InvalidArgumentError(
            f"The input is {tokens.numel()} tokens long; this model's context holds {model.cfg.n_ctx}. Shorten it."
        )
    return tokens


def _blocked_forward(model: "TransformerBridge", tokens: Tensor, recorder: _Recorder, forward_inputs: "dict[str, Any] | None",
                     progress: bool) -> None:
    """The executor of `analyse_long`: one forward pass through the bridge whose attention runs in
    query blocks (`recorder`'s), keeping the reductions and rows the recorder was told to keep,
    stopped before the unembedding; the bridge is left as it was, whatever happens."""
    n, n_layers = tokens.numel(), model.cfg.n_layers
    attentions = [block.attn for block in model.blocks]
    handles = recorder.raw_hooks()
    for layer, attention in enumerate(attentions):
        object.__setattr__(attention, "forward", recorder._attention_forward(layer))  # the bridge's __setattr__ would pass it to the HF module
    recorder.progress = tqdm(total=n_layers, desc=f"long context ({n} tokens)", unit="layer", disable=not progress)
    # The blocked attention reads each layer's mask from its layout, never the mask tensor HF builds
    # for the layers: with eager attention that is an N × N float32 tensor (268 MB at 8,192 tokens),
    # with SDPA none for a causal unpadded sequence. Only the mask HF builds changes, for this forward.
    hf_config = model.original_model.config
    # (a vision-language model's text config only: its vision tower keeps eager attention, whose
    # pattern hooks `capture` may read)
    text_config = getattr(hf_config, "text_config", None)
    configs = [hf_config] if text_config is None or text_config is hf_config else [text_config]
    implementations = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            try:
                model.run_with_hooks(tokens[None].to(model.cfg.device), fwd_hooks=recorder.hooks(), return_type=None,
                                     **(forward_inputs or {}))
            except _StopForward:
                pass
    finally:  # the bridge as it was, whatever happened
        for config, implementation in zip(configs, implementations):
            config._attn_implementation = implementation
        for attention in attentions:
            attention.__dict__.pop("forward", None)
        for handle in handles:
            handle.remove()
        recorder.progress.close()
        recorder.progress = None


def default_block_size(model: "TransformerBridge", n_positions: int) -> int:
    """Queries per block so one block's scores (heads × block × N float32) stay under 48 MB."""
    return int(max(16, min(n_positions, _SCORE_BYTES // (4 * model.cfg.n_heads * max(n_positions, 1)))))


@dataclass(frozen=True)
class LongReads:
    """What `analyse_long`'s blocked forward keeps besides its per-block reductions: the rows and
    hooks the analyses read afterwards (`LongContextAnalysis` is a row source,
    `mechvis.analysis.rows`). Positions may be negative (from the end).

    queries: positions whose rollout rows to compute (None or empty: no rollout; `vision_rollout`
        reads them). lens_positions: positions the logit lens decodes (default: the last 16, as
        the report); include_resid_mid: also decode each block's resid_mid (as `logit_lens`).
    sink_positions: positions whose attention mass `HeadEntropy.sink_mass` holds.
    image_queries, image_positions: query positions and the image tokens' positions whose
        attention weights every layer keeps (`image_rows`: layer × head × query × cell, the rows
        `image_attention` and `image_dynamics` read).
    capture: hook names kept whole (`captured`), e.g. the vision tower's attention patterns
        `vision_rollout` reads (`mechvis.analysis.vision.vision_rollout_hooks`).
    keep_residuals: layers whose `hook_resid_post` (pos, d_model) the result keeps (`residuals`;
        `cross_modal` and `hidden_state_projection` read them)."""

    queries: Sequence[int] | None = (-1,)
    lens_positions: Sequence[int] | None = None
    include_resid_mid: bool = False
    sink_positions: Sequence[int] = (0,)
    image_queries: Sequence[int] = ()
    image_positions: Sequence[int] = ()
    capture: Sequence[str] = ()
    keep_residuals: Sequence[int] = ()


@dataclass(frozen=True)
class LongOptions:
    """The options of the analyses `analyse_long` reduces its rows to.

    attribution: (answer, counterfactual or None) for direct logit attribution at
        `attribution_position` (per head), or None to skip it.
    prompt_length: with generated tokens from this position on, the repetition signals of every
        generated token (`repetition_features`; `induction` from `find_induction_heads`) and the
        seed's loop score.
    head_fusion, residual_weight: as in `rollout_rows`. k: top tokens kept by the token signals
        and the lens. high_entropy: how many highest-entropy positions (all but the last, as the
        report) get `high_entropy_positions`' top-k tokens and own logits (0: none)."""

    attribution: tuple[int | str, int | str | None] | None = None
    attribution_position: int = -1
    prompt_length: int | None = None
    induction: "InductionHeads | None" = None
    head_fusion: str = "mean"
    residual_weight: float = 0.5
    k: int = 5
    high_entropy: int = 10


def _grouped(reads: LongReads | None, options: LongOptions | None, keywords: dict[str, Any]) -> tuple[LongReads, LongOptions]:
    """`reads` and `options` with the deprecated flat keywords of the old signature folded in (warned)."""
    groups = {"reads": (LongReads, reads), "options": (LongOptions, options)}
    names = {field.name: group for group, (kind, _) in groups.items() for field in dataclasses.fields(kind)}
    unknown = [name for name in keywords if name not in names]
    if unknown:
        raise TypeError(f"analyse_long() got an unexpected keyword argument {unknown[0]!r}")
    out = {}
    for group, (kind, given) in groups.items():
        flat = {name: value for name, value in keywords.items() if names[name] == group}
        if flat and given is not None:
            raise TypeError(f"analyse_long() got {sorted(flat)} both flat and in {group}=; pass them in {group}= only.")
        if given is not None and not isinstance(given, kind):
            raise InvalidArgumentError(f"{group} must be a {kind.__name__}; got {shown(given)}.")
        out[group] = given if given is not None else kind(**flat)
    if keywords:
        shown_reads = ", ".join(f"{name}=..." for name in keywords if names[name] == "reads")
        shown_options = ", ".join(f"{name}=..." for name in keywords if names[name] == "options")
        deprecated(f"analyse_long's flat keyword arguments are deprecated: call analyse_long(model, tokens, "
                   f"reads=LongReads({shown_reads}), options=LongOptions({shown_options})).", stacklevel=4)
    return out["reads"], out["options"]


def analyse_long(
    model: "TransformerBridge",
    prompt_or_tokens: "str | Sequence[int] | Tensor",
    *,
    chat: bool = False,
    reads: LongReads | None = None,
    options: LongOptions | None = None,
    forward_inputs: "dict[str, Any] | None" = None,
    block_size: int | None = None,
    progress: bool = True,
    **deprecated_keywords: Any,
) -> LongContextAnalysis:
    """Every report metric of one long sequence, in memory that grows with N (never N²) apart
    from the per-block attention scores (heads × `block_size` × N): the blocked forward (the
    executor) records per-block reductions and the declared rows (`reads`), then the analyses
    reduce them (`options`).

    Args:
        prompt_or_tokens: a prompt (tokenised as `mechvis.encode` does; `chat` as there) or token ids.
        reads: what the forward keeps for the analyses that read rows (`LongReads`; default: the
            last position's rollout row, the last 16 positions' lens, sink position 0).
        options: the analyses' options (`LongOptions`).
        forward_inputs: extra inputs of the forward pass, e.g. a vision-language model's image
            inputs (`pixel_values`, ...: the `extra` of `mechvis.images.encode_with_image`).
        block_size: queries per attention block (default: `default_block_size`).
        deprecated_keywords: the old flat keywords (`queries=`, `k=`, `image_queries=`, ...: the
            fields of `LongReads` and `LongOptions`); they work for one release and warn.

    Returns:
        `LongContextAnalysis`, whose fields equal the cache-based functions' results on the same
        sequence (`token_signals`, `logit_lens`, `head_entropy`, `activation_norms`,
        `activation_statistics`, `layer_similarity` over positions 1.., `rollout_rows`,
        `direct_logit_attribution`, `repetition_features`, and with `prompt_length` `seed_score`,
        whose attention term reads the last layer's head-mean rows, reduced to their entropy per
        query block). It is a row source: `image_attention(result, ...)`, `image_dynamics(result,
        trace=...)`, `vision_rollout(result, ...)` and `cross_modal(result, ...)` read its rows.

    Raises:
        InvalidArgumentError: an input longer than `model.cfg.n_ctx`, a query, lens, sink or
            attribution position outside the sequence, a bad fusion or weight; all before the forward.
        UnsupportedArchitectureError: attention the blocked path does not reproduce (learned sinks,
            gated or non-rotary attention, ...).
        TypeError: an unknown keyword, or a keyword given both flat and in `reads`/`options`.
    """
    reads, options = _grouped(reads, options, deprecated_keywords)
    queries, lens_positions, include_resid_mid, sink_positions = (
        reads.queries, reads.lens_positions, reads.include_resid_mid, reads.sink_positions)
    image_queries, image_positions, capture, keep_residuals = (
        reads.image_queries, reads.image_positions, reads.capture, reads.keep_residuals)
    attribution, attribution_position, prompt_length, induction = (
        options.attribution, options.attribution_position, options.prompt_length, options.induction)
    head_fusion, residual_weight, k, high_entropy = options.head_fusion, options.residual_weight, options.k, options.high_entropy
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    chat, include_resid_mid, progress = (check_bool(value, name) for value, name in (
        (chat, "chat"), (include_resid_mid, "include_resid_mid"), (progress, "progress")))
    tokens = _tokens_of(model, prompt_or_tokens, chat)
    n = tokens.numel()
    n_layers = model.cfg.n_layers
    if head_fusion not in ("mean", "max", "min"):
        raise InvalidArgumentError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}.")
    residual_weight = check_real(residual_weight, "residual_weight", low=0.0, high=1.0)
    k = check_k(k, model.cfg.d_vocab)
    high_entropy = check_integer(high_entropy, "high_entropy", low=0, hint=" (how many positions; 0 = none)")
    query_list = check_positions(n, queries, empty=True) if queries is not None else []
    lens_list = check_positions(n, lens_positions if lens_positions is not None else range(max(0, n - 16), n))
    sinks = check_positions(n, sink_positions, empty=True)
    dla_position = check_positions(n, [attribution_position])[0] if attribution is not None else None
    if attribution is not None:
        if isinstance(attribution, (str, bytes)) or not isinstance(attribution, (tuple, list)) or len(attribution) != 2:
            raise InvalidArgumentError(f"attribution must be a pair (answer, counterfactual or None); got {attribution!r}.")
        answer = single_token_id(model, attribution[0])
        counterfactual = None if attribution[1] is None else single_token_id(model, attribution[1])
    states: list[int] = []
    if prompt_length is not None:
        prompt_length = check_integer(prompt_length, "prompt_length", low=1, high=n - 1,
                                      hint=" (tokens after it are generated)")
        states = list(range(prompt_length - 1, n - 1))
    induction = induction if induction is not None else InductionHeads(torch.zeros(n_layers, model.cfg.n_heads), [])
    if block_size is None:
        block_size = default_block_size(model, n)
    block_size = check_integer(block_size, "block_size", low=1)
    empty = isinstance(keep_residuals, Sequence) and not isinstance(keep_residuals, str) and len(keep_residuals) == 0
    kept_layers = [] if empty else check_layers(model, keep_residuals)
    image_query_list = check_positions(n, image_queries, empty=True)
    image_position_list = check_positions(n, image_positions, empty=True)
    if bool(image_query_list) != bool(image_position_list):
        raise InvalidArgumentError("image_queries and image_positions go together: give both or neither.")
    if isinstance(capture, str) or not isinstance(capture, Sequence) or not all(isinstance(name, str) for name in capture):
        raise InvalidArgumentError(f"capture must be a list of hook names; got {shown(capture)}.")
    unknown = [name for name in capture if name not in model.hook_dict]
    if unknown:
        raise InvalidArgumentError(f"No hook {unknown[0]!r} in this model to capture.")
    check_long_context_support(model)

    # Per-block scratch (scores, patterns, logits: 1–48 MB of varying sizes) gets its own mappings, so
    # glibc's heap cannot fragment under it; freed memory is trimmed between stages.
    with large_allocations_mapped():
        recorder = _Recorder(model, n, block_size, sinks, states, induction.heads, lens_list, include_resid_mid, dla_position,
                             image_query_list, image_position_list, capture)
        _blocked_forward(model, tokens, recorder, forward_inputs, progress)
        seconds["forward"] = time.perf_counter() - started
        release_freed_memory()
        if any(residual is None for residual in recorder.residuals):
            raise UnsupportedArchitectureError("The forward pass did not reach every layer's residual stream hook.")

        head_entropy_result = _head_entropy(recorder, sinks)

        norms, statistics, similarity = _residual_summaries(recorder)
        seconds["reductions"] = time.perf_counter() - started - sum(seconds.values())

        # --- logits in row blocks -> token signals -------------------------------------------------------
        final = recorder.residuals[-1]
        next_ids = torch.zeros(n, dtype=torch.long)
        next_ids[:-1] = tokens[1:]
        blocks = []
        ranks = []
        state_logits = []
        state_index = torch.tensor(states, dtype=torch.long)
        scratch = None  # one buffer reused by every block
        for start in tqdm(range(0, n, _LOGIT_ROWS), desc="token signals", unit="block", disable=not progress or n < 4 * _LOGIT_ROWS):
            with torch.no_grad():
                logits = unembed_logits(model, final[start : start + _LOGIT_ROWS].to(model.cfg.device)).float().cpu()
            if scratch is None:
                scratch = torch.empty_like(logits)
            block_next = next_ids[start : start + _LOGIT_ROWS]
            ranks.append((logits > logits.gather(-1, block_next[:, None])).sum(-1))  # before `block_signals` reuses `logits`
            blocks.append(block_signals(logits, block_next, max(k, 2), scratch[: logits.shape[0]]))
            inside = state_index[(state_index >= start) & (state_index < start + _LOGIT_ROWS)]
            if len(inside):
                state_logits.append(logits[inside - start])
            del logits
        entropy_t, varentropy, top_probs, top_ids, surprisal = (torch.cat(parts) for parts in zip(*blocks))
        next_ranks = torch.cat(ranks)
        next_ranks[-1] = -1
        surprisal[-1] = torch.nan
        signals = TokenSignals(entropy_t, varentropy, top_probs[:, 0], top_probs[:, 0] - top_probs[:, 1], surprisal,
                               top_ids[:, :k], top_probs[:, :k])
        high = None
        if high_entropy > 0:
            considered = signals.entropy[:-1] if n > 1 else signals.entropy
            chosen = considered.argsort(descending=True)[: min(high_entropy, considered.numel())].sort().values
            with torch.no_grad():
                rows = final[chosen].to(model.cfg.device)
                chosen_logits = unembed_logits(model, rows).float()
                unembed_input = {"unembed.hook_in": model.ln_final(rows)[None]}
            high = high_entropy_positions(with_model(unembed_input, model), logits=chosen_logits, n=len(chosen), k=k)
            high = dataclasses.replace(high, positions=[int(chosen[i]) for i in high.positions])
        seconds["token_signals"] = time.perf_counter() - started - sum(seconds.values())
        release_freed_memory()

        # --- logit lens: the cache-based function on the chosen rows ------------------------------------
        index = torch.tensor(lens_list, dtype=torch.long)
        names = lens_hook_names(model, include_resid_mid)
        rows_cache: dict[str, Tensor] = {}
        for name in names:
            if name == "blocks.0.hook_resid_pre":
                rows_cache[name] = recorder.residuals[0][index][None]
            elif name.endswith("hook_resid_post"):
                rows_cache[name] = recorder.residuals[int(name.split(".")[1]) + 1][index][None]
            else:
                rows_cache[name] = recorder.lens_rows[name]
        lens = logit_lens(with_model(rows_cache, model), k=k)
        lens = dataclasses.replace(lens, positions=lens_list)
        seconds["logit_lens"] = time.perf_counter() - started - sum(seconds.values())

        # --- DLA on the one position's rows --------------------------------------------------------------
        dla = None
        if dla_position is not None:
            dla_cache = dict(recorder.dla_rows)
            dla_cache[f"blocks.{n_layers - 1}.hook_resid_post"] = final[[dla_position]][None]
            dla = direct_logit_attribution(with_model(dla_cache, model), answer=answer, counterfactual=counterfactual, position=0)
            dla = dataclasses.replace(dla, position=dla_position)

        # --- repetition signals ---------------------------------------------------------------------------
        repetition = seed = None
        if states:
            resid_layer = feature_layer(model, None)
            n_heads = model.cfg.n_heads

            def pattern_rows(layer: int) -> Tensor:
                state = recorder.layers[layer]
                rows = torch.zeros(n_heads, len(states), n)
                rows[..., sinks] = state.sink_rows
                for head, stored in state.induction_rows.items():
                    rows[head] = stored
                return rows

            values = feature_values(torch.cat(state_logits), recorder.residuals[resid_layer + 1], tokens, pattern_rows, states,
                                     induction=induction, n_layers=n_layers, sinks=sinks, prompt_length=prompt_length,
                                     recurrence_window=64)
            repetition = RepetitionFeatures([s + 1 for s in states], values)
            seed = _seed_score(torch.cat(state_logits), recorder, states)

        rollout = None
        if query_list:
            rollout = _rollout_rows(recorder, query_list, head_fusion, residual_weight, progress)
            seconds["rollout"] = time.perf_counter() - started - sum(seconds.values())
        kept = {layer: recorder.residuals[layer + 1] for layer in kept_layers}
        image_rows = torch.stack([state.image_rows for state in recorder.layers]) if image_query_list else None
        return LongContextAnalysis(tokens, signals, lens, head_entropy_result, norms, statistics, similarity, rollout, dla,
                                   repetition, block_size, high, kept, seconds, image_rows, image_query_list,
                                   image_position_list, recorder.captured_activations, seed, next_ranks, model)


def _head_entropy(recorder: _Recorder, sinks: list[int]) -> HeadEntropy:
    """`head_entropy` from the row entropies and sink masses the blocked forward reduced per block."""
    n, layers = recorder.n, list(range(len(recorder.layers)))
    entropy = torch.stack([state.entropy for state in recorder.layers])
    sink_mass = torch.stack([state.sink_mass for state in recorder.layers])
    log_visible = torch.stack([recorder.layout[layer].visible_keys(n) for layer in layers]).float().log()[:, None, :]
    normalised = torch.where(log_visible > 0, entropy / log_visible.clamp_min(1e-12), torch.nan)
    return HeadEntropy(layers, entropy, normalised, sink_mass, tuple(sinks))


def _residual_summaries(recorder: _Recorder) -> tuple[dict[str, ActivationNorms], dict[str, ActivationStatistics], LayerSimilarity]:
    """`activation_norms`, `activation_statistics` and `layer_similarity` (positions 1..) from the
    norms and statistics the forward's hooks reduced and the residual streams it kept."""
    n = recorder.n
    norms = {}
    for kind, per_layer in recorder.norms.items():
        stacked_norms = torch.stack(per_layer)
        change = (stacked_norms[1:] - stacked_norms[:-1]) / stacked_norms[:-1].clamp_min(torch.finfo(stacked_norms.dtype).tiny)
        norms[kind] = ActivationNorms(kind, stacked_norms, change)
    statistics = {}
    for kind, per_layer in recorder.statistics.items():
        mean, std, percentiles, kurtosis = (torch.cat(parts) for parts in zip(*per_layer))
        statistics[kind] = ActivationStatistics(kind, mean, std, percentiles, kurtosis)
    similarity_positions = list(range(min(1, n - 1), n))
    units = [torch.nn.functional.normalize(residual[similarity_positions], dim=-1) for residual in recorder.residuals]
    gram = torch.stack([torch.stack([(a * b).sum() for b in units]) for a in units]) / len(similarity_positions)
    del units
    similarity = LayerSimilarity(["embed"] + [str(i) for i in range(len(recorder.layers))], gram, similarity_positions)
    return norms, statistics, similarity


def _rollout_rows(recorder: _Recorder, query_list: list[int], head_fusion: str, residual_weight: float, progress: bool) -> RolloutRows:
    """`rollout_rows` for `query_list`: a second pass from the top layer down, each layer's queries
    and keys recomputed from its stored input residual (`_Recorder.rollout_factor_rows`)."""
    layers = list(range(len(recorder.layers)))
    rows = torch.zeros(len(query_list), recorder.n, dtype=torch.float64)
    rows[torch.arange(len(query_list)), torch.tensor(query_list)] = 1.0
    handles = recorder.raw_hooks()
    try:
        with torch.no_grad():
            for layer in tqdm(list(reversed(layers)), desc="rollout rows", unit="layer", disable=not progress):
                rows = recorder.rollout_factor_rows(layer, rows, head_fusion, residual_weight)
    finally:
        for handle in handles:
            handle.remove()
    return RolloutRows(rows.float(), query_list, head_fusion, residual_weight, layers)


def _seed_score(logits: Float[Tensor, "state vocab"], recorder: _Recorder, states: list[int]) -> "SeedScore":
    """`mechvis.analysis.repetition.seed_score` (α = β = δ = 1) from the states' logits, the last
    layer's residual stream and the head-mean rows' entropies the forward reduced per query block."""


    vocab = logits.shape[-1]
    log_probs = logits.double().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    norms = recorder.residuals[-1].double().norm(dim=-1)
    rise = norms[states] - norms[[q - 1 for q in states]]
    spread = rise.max() - rise.min()
    rise = (rise - rise.min()) / spread if spread > 0 else torch.zeros_like(rise)
    uniformity = (1.0 - (math.log(vocab) - entropy)).clamp(0.0, 1.0)
    last = len(recorder.layers) - 1
    n_keys = recorder.layout[last].visible_keys(recorder.n)[states].double()
    focus = 1.0 - recorder.layers[last].mean_row_entropy / torch.log(n_keys)
    entropy_term = entropy / math.log(vocab)
    score = entropy_term + rise + uniformity + focus
    return SeedScore([q + 1 for q in states], *(t.float() for t in (entropy_term, rise, uniformity, focus, score)))


def real_text_tokens(model: "TransformerBridge", n_tokens: int) -> Int[Tensor, " pos"]:
    """`n_tokens` tokens of real English prose: the Python Language Reference shipped with the
    interpreter (`pydoc_data.topics`, PSF licence), its topics concatenated in order and repeated
    if needed, tokenised by the model's tokenizer (BOS first if the tokenizer adds one)."""

    if not 1 <= n_tokens <= model.cfg.n_ctx:
        raise InvalidArgumentError(f"n_tokens must be in 1..{model.cfg.n_ctx}; got {n_tokens}.")
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = model.hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, as the kernel counts it (VmHWM of
    /proc/self/status; `resource.getrusage` where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX only (absent on Windows)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PROBE = 13  # probe length: a size no dimension of a supported model has, so position axes are recognisable


def estimated_cache_bytes(model: "TransformerBridge", n_tokens: int) -> int:
    """Bytes of a full `run_with_cache` of `n_tokens` tokens (every hook, as the report caches) and
    its logits, from one cached forward of 13 tokens: each tensor's axes of length 13 are position
    axes, so its size at N is its size at 13 × (N / 13)^(position axes) (exact for every hook whose
    shape is positions × fixed sizes, e.g. patterns N², residuals N, logits N)."""
    probe = torch.arange(_PROBE, dtype=torch.long)[None] % model.cfg.d_vocab
    with torch.no_grad():
        logits, cache = model.run_with_cache(probe.to(model.cfg.device))
    total = 0.0
    for tensor in [logits, *cache.values()]:
        axes = sum(1 for size in tensor.shape if size == _PROBE)
        total += tensor.numel() * tensor.element_size() * (n_tokens / _PROBE) ** axes
    return int(total)


def needs_long_context(model: "TransformerBridge", n_tokens: int, *, available_bytes: int | None = None) -> bool:
    """Whether a full cache of `n_tokens` tokens would not fit: more than half of the memory
    available now (`psutil.virtual_memory().available` unless given), leaving the other half for
    the forward pass and the analyses."""
    if available_bytes is None:
        import psutil  # optional: not a dependency of mechvis; used where installed

        available_bytes = psutil.virtual_memory().available
    return estimated_cache_bytes(model, n_tokens) > available_bytes // 2


# --- deprecated (one release): the image metrics of analyse_long's rows under their own names ------------


def long_image_attention(
    result: LongContextAnalysis, grid: "ImageGrid", *, query_positions: Sequence[int], sink_cells: Sequence[int] = (),
) -> "ImageAttention":
    """Deprecated: `image_attention(result, grid=grid, query_positions=..., sink_cells=...)`."""
    deprecated("long_image_attention(result, grid, ...) is deprecated: call image_attention(result, grid=grid, query_positions=..., "
               "sink_cells=...) (analyse_long's result is a row source).")
    return image_attention(_with_model(result, None), grid=grid, query_positions=query_positions, sink_cells=sink_cells)


def long_image_dynamics(
    result: LongContextAnalysis, trace: "Trace", *, regions: "Sequence[str] | None" = None, sink_cells: Sequence[int] = (),
) -> "ImageDynamics":
    """Deprecated: `image_dynamics(result, trace=trace, regions=..., sink_cells=...)`."""
    deprecated("long_image_dynamics(result, trace, ...) is deprecated: call image_dynamics(result, trace=trace, ...) "
               "(analyse_long's result is a row source).")
    return image_dynamics(_with_model(result, None), trace=trace, regions=DEFAULT_REGIONS if regions is None else regions,
                          sink_cells=sink_cells)


def long_vision_rollout(
    result: LongContextAnalysis, model: "TransformerBridge", grid: "ImageGrid", *, query_positions: Sequence[int],
) -> "VisionRollout":
    """Deprecated: `vision_rollout(result, grid=grid, query_positions=..., head_fusion=..., residual_weight=...)`
    with analyse_long's head fusion and residual weight."""
    deprecated("long_vision_rollout(result, model, grid, ...) is deprecated: call vision_rollout(result, grid=grid, "
               "query_positions=...) (analyse_long's result is a row source).")
    rolled = result.rollout
    fusion = dict(head_fusion=rolled.head_fusion, residual_weight=rolled.residual_weight) if rolled is not None else {}
    return vision_rollout(_with_model(result, model), grid=grid, query_positions=query_positions, **fusion)


def _with_model(result: LongContextAnalysis, model: "TransformerBridge | None") -> LongContextAnalysis:
    if not isinstance(result, LongContextAnalysis):
        raise InvalidArgumentError(f"Expected analyse_long's result; got {shown(result)}.")
    if result.model is None and model is not None:
        return dataclasses.replace(result, model=model)
    if result.model is None:
        raise InvalidArgumentError("This analysis does not name its model; pass it (LongContextAnalysis.model).")
    return result
