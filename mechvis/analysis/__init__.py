"""Pure analyses over an `ActivationCache` (and the model where an unembedding or norm is needed).

Analyses never run the model (input attribution, which must, is the exception) and never draw.
`hooks_for` names the hooks an analysis reads, for `run(..., names_filter=...)`.
`analyse_long` is the exception for long inputs: it runs the model once itself and computes the
report's metrics without a cache (mechvis.analysis.longcontext).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechvis.analysis.activations import (
    ActivationNorms,
    ActivationStatistics,
    activation_hook_names,
    activation_norms,
    activation_statistics,
)
from mechvis.analysis.attention import (
    HeadEntropy,
    Rollout,
    RolloutRows,
    SpanAttention,
    attention_patterns,
    attention_to_spans,
    find_token_spans,
    head_entropy,
    pattern_hook,
    rollout,
    rollout_rows,
    row_entropy,
    visible_keys,
)
from mechvis.analysis.attribution import InputAttribution, gradient_x_input, occlusion
from mechvis.analysis.crossmodal import CrossModal, cross_modal
from mechvis.analysis.dynamics import ImageDynamics, KeywordDynamics, image_dynamics, keyword_dynamics, stream_image_dynamics
from mechvis.analysis.geometry import (
    compare_geometry,
    earth_movers_distance,
    hausdorff_distance,
    hull_area,
    map_geometry,
    mass_contour,
)
from mechvis.analysis.gradients import attention_gradient_relevancy, integrated_gradients, pixel_integrated_gradients
from mechvis.analysis.information import discrete_mutual_information, grid_regions, region_token_information
from mechvis.analysis.instructions import instruction_attention_check, semantic_token_spans
from mechvis.analysis.regions import NAMED_REGIONS, named_region_masses, region_mass
from mechvis.analysis.longcontext import LongContextAnalysis, analyse_long
from mechvis.analysis.lens import LogitLens, lens_hook_names, logit_lens, unembed_logits
from mechvis.analysis.projection import Projection, embedding_projection, hidden_state_projection, pca
from mechvis.analysis.residual import (
    LayerSimilarity,
    LogitAttribution,
    ResidualDecomposition,
    decompose_residual,
    direct_logit_attribution,
    head_results,
    layer_similarity,
)
from mechvis.analysis.tokens import HighEntropyPositions, TokenSignals, high_entropy_positions, token_signals
from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def _residual_hooks(model: "TransformerBridge") -> list[str]:
    layers = range(model.cfg.n_layers)
    return (
        ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        + [f"blocks.{i}.{hook}" for i in layers for hook in ("hook_attn_out", "hook_mlp_out", "attn.hook_z", "ln1_post.hook_scale")]
    )


_HOOKS = {
    "lens": lambda model: lens_hook_names(model, include_resid_mid=True),
    "residual": _residual_hooks,
    "similarity": lambda model: lens_hook_names(model),
    "attention": lambda model: [pattern_hook(layer) for layer in range(model.cfg.n_layers)],
    "norms": lambda model: [name for kind in ("resid_post", "attn_out", "mlp_out") for name in activation_hook_names(model, kind)],
    "statistics": lambda model: activation_hook_names(model, "mlp_post") + activation_hook_names(model, "attn_out"),
}


def hooks_for(model: "TransformerBridge", *analyses: str) -> list[str]:
    """Hook names the named analyses read: any of "lens", "residual", "similarity", "attention",
    "norms", "statistics". Pass the result as `run(..., names_filter=...)`."""
    if not analyses:
        raise InvalidArgumentError(f"Name at least one analysis, e.g. hooks_for(model, 'lens'); choose from {sorted(_HOOKS)}.")
    unknown = [name for name in analyses if name not in _HOOKS]
    if unknown:
        raise InvalidArgumentError(f"Unknown analyses {unknown}; choose from {sorted(_HOOKS)}.")
    return sorted({hook for name in analyses for hook in _HOOKS[name](model)})


__all__ = [
    "ActivationNorms", "ActivationStatistics", "HeadEntropy", "HighEntropyPositions", "InputAttribution",
    "LayerSimilarity", "LogitAttribution", "LogitLens", "Projection", "ResidualDecomposition", "Rollout",
    "SpanAttention", "TokenSignals", "activation_norms", "activation_statistics", "attention_patterns",
    "attention_to_spans", "decompose_residual", "direct_logit_attribution", "embedding_projection",
    "find_token_spans", "gradient_x_input", "head_entropy", "head_results", "hidden_state_projection",
    "high_entropy_positions", "hooks_for", "layer_similarity", "logit_lens", "occlusion", "pca", "rollout",
    "RolloutRows", "rollout_rows", "row_entropy", "token_signals", "unembed_logits", "visible_keys",
    "CrossModal", "ImageDynamics", "KeywordDynamics", "NAMED_REGIONS", "attention_gradient_relevancy", "compare_geometry",
    "cross_modal", "discrete_mutual_information", "earth_movers_distance", "grid_regions", "hausdorff_distance",
    "hull_area", "image_dynamics", "instruction_attention_check", "integrated_gradients", "keyword_dynamics",
    "map_geometry", "mass_contour", "named_region_masses", "pixel_integrated_gradients", "region_mass",
    "region_token_information", "semantic_token_spans", "stream_image_dynamics",
    "LongContextAnalysis", "analyse_long",
]
