"""The preallocated KV cache: HF's `DynamicCache` with each layer writing into storage for the
whole generation (`_PreallocatedLayer`). Reference: transformers' `DynamicLayer` (the same keys
and values after any sequence of updates and crops; tests/test_lean_decoding.py checks it).

Why: `DynamicLayer.update` concatenates the whole cache with the new states at every step (2
copies of N positions per layer per token): at N ≈ 3,000 the embedded model's steps took 51–55 ms
that way and 45–49 ms here. Lean steps (`lean`) run only on this cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mechvis.config import get as setting


def preallocated_cache(decoder: torch.nn.Module, capacity: int) -> tuple[str, object] | None:
    """The keyword and the KV cache HF's `generate` would make for `decoder` (a `DynamicCache`
    for its text config), with each plain `DynamicLayer` replaced by a `_PreallocatedLayer` for
    `capacity` positions; None where the cache is not built that way (the transformers version,
    or a model that makes its own), so that generate makes its default one; None too while
    `mechvis.config(fast_decoding=False)`."""
    return new_preallocated_cache(decoder, capacity) if setting("fast_decoding") else None


def new_preallocated_cache(decoder: torch.nn.Module, capacity: int) -> tuple[str, object] | None:
    """`preallocated_cache` whatever the switch says (the lean check compares steps on it)."""
    try:
        cache = DynamicCache(config=decoder.config.get_text_config(decoder=True))
        layers = cache.layers
        if not decoder._supports_default_dynamic_cache():
            return None
    except Exception:  # noqa: BLE001 - another transformers layout, or a model with its own cache: generate's
        return None
    replaced = False
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[index] = _preallocated_layer(capacity)
            replaced = True
    if not replaced:
        return None
    # transformers 5.24 renamed generate's and the models' `past_key_values` to `cache`.
    keyword = "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"
    return keyword, cache


class _PreallocatedLayer(DynamicLayer):
    """`DynamicLayer` whose keys and values are views of the first positions of storage for
    `capacity` positions, into which each update writes. Must hold what `DynamicLayer.update`
    holds (each step's states written once); the storage doubles if a step goes past it, and is
    rebuilt from the current states if another method (crop, reorder, reset, offload) replaced them."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._stores: tuple[Tensor, Tensor] | None = None
        self._views: tuple = (None, None)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        stores = self._stores
        if (stores is None or self.keys is not self._views[0] or self.values is not self._views[1]
                or end > stores[0].shape[-2] or stores[0].shape[:2] != key_states.shape[:2]
                or stores[1].shape[:2] != value_states.shape[:2] or stores[0].dtype != key_states.dtype
                or stores[0].device != key_states.device):
            size = max(end, self.capacity, 2 * length)
            stores = tuple(
                states.new_empty((*states.shape[:2], size, states.shape[-1])) for states in (key_states, value_states)
            )
            if length:
                stores[0][..., :length, :] = self.keys
                stores[1][..., :length, :] = self.values
            self._stores = stores
        stores[0][..., length:end, :] = key_states
        stores[1][..., length:end, :] = value_states
        self.keys, self.values = stores[0][..., :end, :], stores[1][..., :end, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values


def _preallocated_layer(capacity: int) -> _PreallocatedLayer:
    return _PreallocatedLayer(capacity)


def all_preallocated(cache: object) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is _PreallocatedLayer for layer in layers)
