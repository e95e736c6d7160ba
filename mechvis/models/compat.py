"""A small compatibility layer between transformer-lens' bridge and the transformers versions
mechvis allows.

transformers 5.24 renamed the KV cache that decoder layers hand their attention modules from
`past_key_values` to `cache`. transformer-lens 4.3's `AttentionBridge._update_kv_cache` reads
only `past_key_values` / `layer_past`, so with any hook on the bridge, and in transformer-lens'
own `generate`, every KV-cached decoding step attended to the new token alone: silently wrong.
(Model outputs still answer `.past_key_values`, with a deprecation warning.)

`apply()` (called by `load_model`) makes the bridge read the cache under whichever name the
installed transformers uses; `check(model)` refuses, with a clear error, an installed pair whose
convention this layer does not know, rather than letting it compute wrong numbers.
"""

from __future__ import annotations

import functools
import inspect
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from mechvis.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

# The keyword under which transformers versions hand attention modules the KV cache.
CACHE_KEYWORDS = ("past_key_values", "layer_past", "cache")


def apply() -> None:
    """Patch transformer-lens' attention bridges (once per process) so that a cache passed as
    `cache=` reaches `_update_kv_cache` and the components that read `past_key_values` directly."""

    if getattr(AttentionBridge._update_kv_cache, "_mechvis_compat", False):
        return
    original = AttentionBridge._update_kv_cache

    @functools.wraps(original)
    def _update_kv_cache(self, k, v, **kwargs: Any):
        return original(self, k, v, **_with_legacy_cache_name(kwargs))

    _update_kv_cache._mechvis_compat = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache

    # Components that pop `past_key_values` from their kwargs themselves (multi-head latent
    # attention, GLM's DSA attention): rename before their forward runs.
    for module_name, class_name in (
        ("mla_attention", "MLAAttentionBridge"),
        ("glm_moe_dsa_attention", "GlmMoeDsaAttentionBridge"),
    ):
        try:
            module = __import__(f"transformer_lens.model_bridge.generalized_components.{module_name}", fromlist=[class_name])
        except ImportError:  # pragma: no cover - absent in some transformer-lens versions
            continue
        cls = getattr(module, class_name, None)
        if cls is None or getattr(cls.forward, "_mechvis_compat", False):
            continue
        cls.forward = _renaming_forward(cls.forward)



def _with_legacy_cache_name(kwargs: dict) -> dict:
    if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None and kwargs.get("cache") is not None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
    return kwargs


def _renaming_forward(forward):
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        return forward(self, *args, **_with_legacy_cache_name(kwargs))

    wrapped._mechvis_compat = True  # type: ignore[attr-defined]
    return wrapped


def cache_keyword(module: "torch.nn.Module") -> str | None:
    """The keyword under which the HF module `module` (a decoder layer or its attention) takes
    the KV cache, or None."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def check(model: "torch.nn.Module") -> None:
    """Refuse a model whose HF decoder layers take their KV cache under a keyword this layer does
    not know (a transformers release newer than mechvis was checked against): hooked KV-cached
    decoding would silently ignore the cache.

    Raises UnsupportedArchitectureError naming the installed versions and what to do.
    """

    blocks = getattr(model, "blocks", None)
    layer = blocks[0]._modules.get("_original_component") if blocks is not None and len(blocks) else None
    if layer is None or cache_keyword(layer) is not None:
        return
    raise UnsupportedArchitectureError(
        f"{type(layer).__name__}.forward takes its KV cache under a keyword mechvis does not know (known: "
        f"{', '.join(CACHE_KEYWORDS)}) with transformers {version('transformers')} and transformer-lens "
        f"{version('transformer-lens')}: hooked generation would ignore the cache. Install the versions in "
        f"mechvis's lock (make install) or a transformers release within pyproject's range."
    )
