"""Pure analyses: a run, trace or cache in, a result out. Analyses never run the model and never draw.

`hooks_for` names the hooks an analysis reads, for `run(..., names_filter=...)`. What must run the
model (input attribution, the instruction check, streamed image metrics, the long-context pass)
lives in `mechvis.studies`; its old names here still work for one release, with a warning.
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
from mechvis.analysis.attention import HeadEntropy, Rollout, RolloutRows, SpanAttention, attention_patterns, attention_to_spans, head_entropy, rollout, rollout_rows
from mechvis.analysis.spans import find_token_spans
from mechvis.models.architecture import pattern_hook, visible_keys
from mechvis._numerics import row_entropy
from mechvis.analysis.crossmodal import CrossModal, cross_modal
from mechvis.analysis.dynamics import ImageDynamics, KeywordDynamics, image_dynamics, keyword_dynamics
from mechvis.analysis.geometry import (
    compare_geometry,
    earth_movers_distance,
    hausdorff_distance,
    hull_area,
    map_geometry,
    mass_contour,
)
from mechvis.analysis.information import discrete_mutual_information, grid_regions, region_token_information
from mechvis.analysis.spans import semantic_token_spans
from mechvis.analysis.regions import NAMED_REGIONS, named_region_masses, region_mass
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
from mechvis._deprecation import moved_names
from mechvis._validation import with_model
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
    "ActivationNorms", "ActivationStatistics", "HeadEntropy", "HighEntropyPositions",
    "LayerSimilarity", "LogitAttribution", "LogitLens", "Projection", "ResidualDecomposition", "Rollout",
    "SpanAttention", "TokenSignals", "activation_norms", "activation_statistics", "attention_patterns",
    "attention_to_spans", "decompose_residual", "direct_logit_attribution", "embedding_projection",
    "find_token_spans", "head_entropy", "head_results", "hidden_state_projection",
    "high_entropy_positions", "hooks_for", "layer_similarity", "logit_lens", "pca", "rollout",
    "RolloutRows", "rollout_rows", "row_entropy", "token_signals", "unembed_logits", "visible_keys",
    "CrossModal", "ImageDynamics", "KeywordDynamics", "NAMED_REGIONS", "compare_geometry",
    "cross_modal", "discrete_mutual_information", "earth_movers_distance", "grid_regions", "hausdorff_distance",
    "hull_area", "image_dynamics", "keyword_dynamics",
    "map_geometry", "mass_contour", "named_region_masses", "region_mass",
    "region_token_information", "semantic_token_spans", "with_model",
]


# Names that moved to mechvis.studies (they run the model): deprecated here for one release.
__getattr__ = moved_names(__name__, {
    "InputAttribution": "mechvis.studies.attribution:InputAttribution",
    "gradient_x_input": "mechvis.studies.attribution:gradient_x_input",
    "occlusion": "mechvis.studies.attribution:occlusion",
    "stream_image_dynamics": "mechvis.studies.streamed:stream_image_dynamics",
    "attention_gradient_relevancy": "mechvis.studies.gradients:attention_gradient_relevancy",
    "integrated_gradients": "mechvis.studies.gradients:integrated_gradients",
    "pixel_integrated_gradients": "mechvis.studies.gradients:pixel_integrated_gradients",
    "instruction_attention_check": "mechvis.studies.instructions:instruction_attention_check",
    "LongContextAnalysis": "mechvis.studies.longcontext:LongContextAnalysis",
    "analyse_long": "mechvis.studies.longcontext:analyse_long",
})
