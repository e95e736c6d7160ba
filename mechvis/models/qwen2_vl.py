"""The mechvis shim for Qwen2-VL (`Qwen2VLForConditionalGeneration`), which transformer-lens has no
adapter for.

Qwen2-VL and Qwen2.5-VL share the language backbone (a Qwen2 decoder at `model.language_model`
with mRoPE) and the module layout; their vision towers differ (Qwen2-VL: LayerNorm blocks with a
plain fc1/fc2 MLP; Qwen2.5-VL: RMSNorm, gated MLP, window attention). The shim is Qwen2.5-VL's
adapter with Qwen2-VL's vision MLP. Attention stays HF-native, so the model's own vision tower
and merger feed the backbone and its own mRoPE positions (image tokens at (t, h, w); text after
the image continuing from the largest image position + 1) are used, exactly as the real model
runs. `register()` (called when mechvis.models is imported) adds it to transformer-lens' table
of architectures: its entry-point registration alone is not consulted when a model boots.
"""

from __future__ import annotations

from typing import Any

from transformer_lens.factories import architecture_adapter_factory
from transformer_lens.model_bridge.generalized_components import LinearBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.qwen3_5_vision_encoder import (
    Qwen3_5VisionBlockBridge,
    Qwen3_5VisionEncoderBridge,
)
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter


class Qwen2VLShimAdapter(Qwen2_5_VLArchitectureAdapter):
    """Qwen2.5-VL's adapter with Qwen2-VL's vision MLP (fc1 → activation → fc2)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.component_mapping["vision_encoder"] = Qwen3_5VisionEncoderBridge(
            name="model.visual",
            config=self.cfg,
            submodules={
                "pos_embed": GeneralizedComponent(name="rotary_pos_emb"),
                "blocks": Qwen3_5VisionBlockBridge(
                    name="blocks",
                    submodules={
                        "mlp": GeneralizedComponent(
                            name="mlp",
                            submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
                        ),
                    },
                ),
            },
        )


ARCHITECTURE = "Qwen2VLForConditionalGeneration"


def register() -> None:
    """Make transformer-lens select the shim for Qwen2-VL models (idempotent)."""
    architecture_adapter_factory.SUPPORTED_ARCHITECTURES[ARCHITECTURE] = Qwen2VLShimAdapter
    architecture_adapter_factory.ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, Qwen2VLShimAdapter)
