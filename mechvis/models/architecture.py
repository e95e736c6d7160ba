"""`inspect_model`: what a hooked model is made of — its architecture, module tree and hook names."""

from __future__ import annotations

import copy
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mechvis._validation import check_integer, check_layers
from mechvis.errors import InvalidArgumentError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



pass
# --- which keys each query sees ----------------------------------------------------------------

@dataclass(frozen=True)
class LayerAttention:
    """The attention mask of one layer, as the model's HF implementation builds it.

    kind: "full" (every earlier key and itself), "sliding" (the last `size` keys, itself
    included: key k is visible from query q when q − size < k ≤ q), or "chunked" (keys of the
    query's own block of `size` positions, blocks starting at position 0: k // size = q // size,
    k ≤ q; Llama 4's `attention_chunk_size`). `bidirectional`: queries also see later keys
    (a model configured with `use_bidirectional_attention`; a sliding window then keeps keys
    with |q − k| < size, as Gemma 3 does).
    """

    kind: str  # "full", "sliding" or "chunked"
    size: int | None = None  # tokens in the window or chunk
    bidirectional: bool = False

    def first_visible(self, query: torch.Tensor) -> torch.Tensor:
        """The first key each query (absolute positions) can see."""
        if self.kind == "sliding":
            return (query - self.size + 1).clamp_min(0)
        if self.kind == "chunked":
            return query - query % self.size
        return torch.zeros_like(query)

    def last_visible(self, query: torch.Tensor, n_positions: int) -> torch.Tensor:
        """The last key each query can see (itself under a causal mask)."""
        if not self.bidirectional:
            return query.clone()
        if self.kind == "sliding":
            return (query + self.size - 1).clamp_max(n_positions - 1)
        return torch.full_like(query, n_positions - 1)

    def visible_keys(self, n_positions: int) -> torch.Tensor:
        """(n_positions,) int64: how many keys each query sees, in a sequence of that length."""
        query = torch.arange(n_positions)
        return self.last_visible(query, n_positions) - self.first_visible(query) + 1

    def mask(self, n_positions: int) -> torch.Tensor:
        """(query, key) bool: True where the query may attend to the key."""
        query = torch.arange(n_positions)[:, None]
        key = torch.arange(n_positions)[None, :]
        return (key >= self.first_visible(query)) & (key <= self.last_visible(query, n_positions))

    def __str__(self) -> str:
        text = {"full": "full", "sliding": f"sliding window of {self.size}", "chunked": f"chunks of {self.size}"}[self.kind]
        return f"{text} (bidirectional)" if self.bidirectional else text


_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}


def attention_layout(model: "TransformerBridge") -> tuple[LayerAttention, ...]:
    """Each layer's attention mask, read from the model's HF (text) config the way transformers
    builds masks (`transformers.masking_utils.create_masks_for_generate`): per-layer
    `layer_types` ("full_attention", "sliding_attention" with `sliding_window`,
    "chunked_attention" with `attention_chunk_size`) when the config has them (Gemma 2/3/4,
    Cohere 2, Qwen2/3 with `use_sliding_window`, GPT-OSS, OLMo 3, Llama 4, ...); else GPT-Neo's
    `attention_layers` ("local" layers slide over `window_size`); else `sliding_window` on every
    layer (Mistral, Mixtral, Phi-3, Starcoder2, Qwen3-MoE; none when `use_sliding_window` is
    False); else `attention_chunk_size` on every layer; else full causal attention.

    Raises UnsupportedArchitectureError for layer types without a softmax attention mask that
    mechvis knows (linear/recurrent, compressed or indexed attention).
    """
    hf_config = model.original_model.config
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    n_layers = model.cfg.n_layers
    bidirectional = getattr(text_config, "use_bidirectional_attention", False) is True or (
        getattr(model.cfg, "attention_dir", "causal") == "bidirectional"
    )
    window = getattr(text_config, "sliding_window", None) or None
    chunk = getattr(text_config, "attention_chunk_size", None) or None

    def layer(kind: str) -> LayerAttention:
        size = {"sliding": window, "chunked": chunk}.get(kind)
        return LayerAttention("full", None, bidirectional) if kind != "full" and size is None else LayerAttention(kind, size, bidirectional)

    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted({kind for kind in layer_types[:n_layers] if kind not in _LAYER_TYPES})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{type(model.original_model).__name__} has layers of type {', '.join(unknown)}; mechvis knows "
                f"the visible keys of {', '.join(_LAYER_TYPES)} layers only, so it cannot normalise their "
                f"attention. Use the un-normalised values (entropy, patterns) for this model."
            )
        return tuple(layer(_LAYER_TYPES[kind]) for kind in layer_types[:n_layers])
    local_global = getattr(text_config, "attention_layers", None)  # GPT-Neo
    if local_global is not None and getattr(text_config, "window_size", None):
        window = text_config.window_size
        return tuple(layer("sliding" if kind == "local" else "full") for kind in local_global[:n_layers])
    if getattr(text_config, "use_sliding_window", True) is False:
        window = None
    if window is not None:
        return (layer("sliding"),) * n_layers
    return (layer("chunked" if chunk is not None else "full"),) * n_layers


@dataclass(frozen=True)
class ArchitectureSummary:
    """The numbers that define a transformer, read from the model's HF config and the bridge."""

    name: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    attention_kind: str  # "MHA", "GQA" or "MQA"
    d_head: int
    positional: str  # e.g. "RoPE (θ=100000)" or "learned absolute"
    norm: str  # "RMSNorm" or "LayerNorm"
    mlp: str  # e.g. "gated (silu), d_mlp=1536"
    d_vocab: int
    n_ctx: int
    sliding_window: int | None  # keys a windowed layer sees (None: no layer slides)
    n_params: int
    attention_chunk_size: int | None = None  # chunked attention (Llama 4), None if no layer is chunked
    local_layers: tuple[int, ...] = ()  # layers with a sliding window or chunks; the others are full
    dtype: str = "float32"  # the weights' floating-point dtype (torch name without "torch."), e.g. "bfloat16"

    def __str__(self) -> str:
        rows = [
            ("model", self.name),
            ("architecture", self.architecture),
            ("layers", self.n_layers),
            ("d_model", self.d_model),
            ("heads", f"{self.n_heads} query, {self.n_kv_heads} key/value ({self.attention_kind})"),
            ("head dim", self.d_head),
            ("positions", self.positional),
            ("norm", self.norm),
            ("MLP", self.mlp),
            ("vocab", self.d_vocab),
            ("context", self.n_ctx),
            ("sliding window", self._local_text(self.sliding_window, "sliding")),
            *([("chunked attention", self._local_text(self.attention_chunk_size, "chunked"))] if self.attention_chunk_size else []),
            ("parameters", f"{self.n_params:,}"),
            ("dtype", self.dtype),
        ]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)

    def _local_text(self, size: int | None, kind: str) -> str:
        if not size:
            return "none"
        layers = self.local_layers if self.local_layers else range(self.n_layers)
        if len(layers) == self.n_layers:
            return f"{size} tokens, every layer"
        shown = ", ".join(map(str, layers[:8])) + (", …" if len(layers) > 8 else "")
        return f"{size} tokens on {len(layers)} of {self.n_layers} layers ({shown}); the others full"


def _attention_kind(n_heads: int, n_kv_heads: int) -> str:
    if n_kv_heads == n_heads:
        return "MHA"
    return "MQA" if n_kv_heads == 1 else "GQA"


def _rope_theta(hf_config: object) -> float | None:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    return getattr(hf_config, "rope_theta", None)


def _count_parameters(hf_model: nn.Module) -> int:
    """Parameters of the model as published, counted on a fresh meta-device instance of its
    class and config: the bridge adds split q/k/v weights to some models and unties centred
    unembeddings, so the wrapped model's own parameters over-count."""
    with torch.device("meta"):
        fresh = type(hf_model)(copy.deepcopy(hf_model.config))
    return sum(parameter.numel() for parameter in fresh.parameters())


def inspect_model(model: "TransformerBridge") -> ArchitectureSummary:
    """Summarise a hooked model's architecture (from its HF config where the bridge's differs).

    Raises:
        InvalidArgumentError: `model` is not a model from `mechvis.load_model`."""
    if not hasattr(model, "cfg") or not hasattr(model, "original_model"):
        raise InvalidArgumentError(
            f"inspect_model takes a model from mechvis.load_model(...); got {type(model).__name__}."
        )
    cfg = model.cfg
    hf_config = model.original_model.config
    text_config = getattr(hf_config, "text_config", None) or hf_config
    n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
    if cfg.positional_embedding_type == "rotary":
        theta = _rope_theta(text_config)
        positional = f"RoPE (θ={theta:g})" if theta is not None else "RoPE"
    else:
        positional = {"standard": "learned absolute"}.get(cfg.positional_embedding_type, cfg.positional_embedding_type)
    norm = "RMSNorm" if getattr(cfg, "uses_rms_norm", False) or str(cfg.normalization_type).startswith("RMS") else "LayerNorm"
    mlp = f"{'gated' if cfg.gated_mlp else 'plain'} ({cfg.act_fn}), d_mlp={cfg.d_mlp}"
    try:
        layout = attention_layout(model)
    except UnsupportedArchitectureError:  # layer types without a known mask (hybrids): config as is
        window = getattr(text_config, "sliding_window", None)
        window = None if getattr(text_config, "use_sliding_window", True) is False else window
        chunk, local = getattr(text_config, "attention_chunk_size", None), ()
    else:
        window = next((layer.size for layer in layout if layer.kind == "sliding"), None)
        chunk = next((layer.size for layer in layout if layer.kind == "chunked"), None)
        local = tuple(index for index, layer in enumerate(layout) if layer.kind != "full")
    return ArchitectureSummary(
        name=str(getattr(cfg, "model_name", "") or getattr(hf_config, "_name_or_path", "")),
        architecture=type(model.original_model).__name__,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv_heads,
        attention_kind=_attention_kind(cfg.n_heads, n_kv_heads),
        d_head=cfg.d_head,
        positional=positional,
        norm=norm,
        mlp=mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        sliding_window=window,
        n_params=_count_parameters(model.original_model),
        attention_chunk_size=chunk,
        local_layers=local,
        dtype=_weights_dtype(model.original_model),
    )


def _weights_dtype(module: nn.Module) -> str:
    """The dtype of the floating-point weights ("float32", "bfloat16", ...); mixed dtypes are
    joined with "+" (most parameters first)."""

    counts = Counter(str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.is_floating_point())
    return "+".join(name for name, _ in counts.most_common()) or "float32"


def _bridge_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children that are components (not hook points, not the wrapped HF module)."""

    return [
        (name, child)
        for name, child in module.named_children()
        if name != "_original_component" and not isinstance(child, HookPoint)
    ]


def _component_label(module: nn.Module) -> str:
    original = getattr(module, "_modules", {}).get("_original_component")
    wrapped = f" → {type(original).__name__}" if original is not None else ""
    return f"{type(module).__name__}{wrapped}"


def module_tree(module: nn.Module, name: str = "", depth: int = 0) -> list[str]:
    """The bridge's component tree as indented lines, with the HF module each component wraps
    (`attn: PositionEmbeddingsAttentionBridge → LlamaAttention`); a list of identical-type
    components shows its first item and a count (`blocks: 30 × BlockBridge, each as blocks.0`)."""
    indent = "  " * depth
    children = _bridge_children(module)
    if isinstance(module, nn.ModuleList) and children and len({type(child) for _, child in children}) == 1:
        first_name, first = children[0]
        header = f"{indent}{name}: {len(children)} × {type(first).__name__}, each as {name}.{first_name}"
        return [header] + module_tree(first, f"{name}.{first_name}", depth + 1)[1:]
    lines = [f"{indent}{name.rpartition('.')[2] or type(module).__name__}: {_component_label(module)}"]
    for child_name, child in children:
        lines += module_tree(child, f"{name}.{child_name}" if name else child_name, depth + 1)
    return lines


def hook_names_by_component(model: "TransformerBridge") -> dict[str, list[str]]:
    """Hook names grouped by the component that owns them, layer indices written as `{i}`.

    {"blocks.{i}.attn": ["hook_pattern", "hook_z", ...], "embed": [...], "(model)": ["hook_embed"]}
    """
    groups: dict[str, set[str]] = defaultdict(set)
    for hook_name in model.hook_dict:
        generic = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", hook_name)
        component, _, hook = generic.rpartition(".")
        groups[component or "(model)"].add(hook)
    return {component: sorted(hooks) for component, hooks in sorted(groups.items())}


def format_inspection(model: "TransformerBridge") -> str:
    """The full `mechvis inspect` text: summary, module tree, hook names."""
    hooks = hook_names_by_component(model)
    hook_lines = [f"  {component}: {', '.join(names)}" for component, names in hooks.items()]
    return "\n".join(
        [
            str(inspect_model(model)),
            "",
            "Components (bridge component → the HF module it wraps):",
            *module_tree(model)[1:],
            "",
            f"Hook names ({len(model.hook_dict)} in all; blocks.{{i}} for i in 0..{model.cfg.n_layers - 1}):",
            *hook_lines,
        ]
    )


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def visible_keys(model: "TransformerBridge", layers: Sequence[int], n_positions: int) -> Int[Tensor, "layer query"]:
    """How many keys each query of a `n_positions`-token sequence can attend to, per chosen layer:
    i + 1 under a plain causal mask, min(i + 1, W) in a sliding window of W (Mistral, Gemma 2/3
    local layers, GPT-Neo's local layers, ...), (i mod C) + 1 in chunks of C (Llama 4), from
    `mechvis.models.architecture.attention_layout` (the masks transformers builds; checked against HF
    eager attention for every windowed architecture in the test suite).

    Raises UnsupportedArchitectureError for layers whose mask mechvis does not know,
    InvalidArgumentError for bad layers or a count of positions that is not a positive integer.
    """
    layers = check_layers(model, layers)
    n_positions = check_integer(n_positions, "n_positions", low=1)
    layout = attention_layout(model)
    return torch.stack([layout[layer].visible_keys(n_positions) for layer in layers])
