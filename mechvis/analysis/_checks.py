"""Validation shared by the analyses: hooks present, indices in range, one sequence per cache."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechvis.errors import InvalidArgumentError, MissingActivationsError
from mechvis.running import str_tokens_of

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


def activation(cache: "ActivationCache", name: str) -> Tensor:
    """`cache[name]` for the single sequence of the cache (batch dimension removed)."""
    if name not in cache:
        raise MissingActivationsError(
            f"The cache has no '{name}'. Run without a names_filter, or include it: "
            f"mechvis.run(model, prompt, names_filter=mechvis.analysis.hooks_for(model, ...))."
        )
    tensor = cache[name]
    if tensor.shape[0] != 1:
        raise InvalidArgumentError(
            f"Analyses take one sequence; this cache holds a batch of {tensor.shape[0]}. "
            f"Select one first: cache.apply_slice_to_batch_dim(i)."
        )
    return tensor[0]


def stacked(cache: "ActivationCache", names: Sequence[str]) -> Tensor:
    """The named activations of one sequence stacked along a new first dimension."""
    return torch.stack([activation(cache, name) for name in names])


def require_hooks(cache: "ActivationCache", names: Iterable[str]) -> None:
    missing = [name for name in names if name not in cache]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise MissingActivationsError(
            f"The cache lacks {shown}. Run without a names_filter, or include them: "
            f"mechvis.run(model, prompt, names_filter=mechvis.analysis.hooks_for(model, ...))."
        )


def integer(value: object) -> int | None:
    """`value` as an int if it is an integer (numpy integers and one-element integer tensors
    included), else None: bools, floats and strings are not integers."""
    if isinstance(value, (bool, float, str, bytes)) or getattr(value, "dtype", None) == torch.bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _indices(values: Iterable[int], count: int, what: str, owner: str) -> list[int]:
    """Indices in -count..count-1 (negative counts from the end), normalised to 0..count-1.
    Integer-likes (numpy integers, one-element integer tensors) count as integers; bools,
    floats and strings do not."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or (isinstance(values, torch.Tensor) and values.ndim == 0):
        raise InvalidArgumentError(f"{what}s must be a list of integers; got {values!r} (for one {what}, pass [{what}]).")
    checked = []
    for value in values:
        index = integer(value)
        if index is None:
            raise InvalidArgumentError(f"{what} {value!r} is not an integer: {owner} has {what}s 0..{count - 1}.")
        if not -count <= index < count:
            raise InvalidArgumentError(f"{what} {index} is out of range: {owner} has {what}s 0..{count - 1}.")
        checked.append(index % count)
    return checked


def check_layers(model: "TransformerBridge", layers: Iterable[int] | None) -> list[int]:
    """Layer indices validated against the model; None = all layers."""
    n_layers = model.cfg.n_layers
    return list(range(n_layers)) if layers is None else _indices(layers, n_layers, "layer", "this model")


def check_heads(model: "TransformerBridge", heads: Iterable[int]) -> list[int]:
    """Head indices validated against the model."""
    return _indices(heads, model.cfg.n_heads, "head", "this model")


def check_positions(n_positions: int, positions: Iterable[int] | None) -> list[int]:
    """Token positions validated against the sequence; None = all positions."""
    if positions is None:
        return list(range(n_positions))
    checked = _indices(positions, n_positions, "position", "the sequence")
    if not checked:
        raise InvalidArgumentError("No positions given; pass at least one token position.")
    return checked


def single_token_id(model: "TransformerBridge", token: int | str) -> int:
    """A token id from an id or a string that must be exactly one token (e.g. ' Paris')."""
    vocab = model.cfg.d_vocab
    if not isinstance(token, str):
        token_id = integer(token)
        if token_id is None:
            raise InvalidArgumentError(f"A token is an id or a string; got {token!r}.")
        if not 0 <= token_id < vocab:
            raise InvalidArgumentError(f"token id {token_id} is outside the vocabulary (0..{vocab - 1}).")
        return token_id
    ids = model.hf_tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = str_tokens_of(model, ids)  # decoded whole: a character split into bytes is not U+FFFD
        raise InvalidArgumentError(
            f"{token!r} is {len(ids)} tokens {pieces}, not one. Pass a single token "
            f"(mind the leading space: ' Paris' and 'Paris' differ) or a token id."
        )
    return ids[0]
