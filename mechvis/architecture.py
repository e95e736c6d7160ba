"""`inspect_model`: what a hooked model is made of — its architecture, module tree and hook names."""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


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
    sliding_window: int | None
    n_params: int

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
            ("sliding window", self.sliding_window if self.sliding_window else "none"),
            ("parameters", f"{self.n_params:,}"),
        ]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


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
    """Summarise a hooked model's architecture (from its HF config where the bridge's differs)."""
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
    window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        window = None
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
    )


def _bridge_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children that are components (not hook points, not the wrapped HF module)."""
    from transformer_lens.hook_points import HookPoint

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
