"""Validation shared by mechvis's public functions: hooks present, indices in range, one sequence
per cache, and the argument kinds every edge checks the same way (integers and reals within
bounds, bools, Spans, tensors of a given rank and dtype, token ids, hook-name filters). Each
check returns the value normalised (e.g. a numpy integer as an int) or raises an
`InvalidArgumentError` that says what was given and what is expected."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mechvis._deprecation import deprecated
from mechvis.errors import InvalidArgumentError, MissingActivationsError
from mechvis.types import Span

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge



def _check_cache(cache: object) -> None:
    """A cache is an ActivationCache (`run.cache`) or a mapping {hook name: tensor}."""
    searchable = hasattr(cache, "__contains__") or hasattr(cache, "__iter__")  # ActivationCache: `in` iterates
    if not (searchable and hasattr(cache, "__getitem__")) or isinstance(cache, (str, bytes, Tensor, np.ndarray)):
        raise InvalidArgumentError(
            f"cache must be an ActivationCache (run.cache) or a dict {{hook name: tensor}}; got {shown(cache)}."
        )


def activation(cache: "ActivationCache", name: str) -> Tensor:
    """`cache[name]` for the single sequence of the cache (batch dimension removed)."""
    _check_cache(cache)
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
    _check_cache(cache)
    missing = [name for name in names if name not in cache]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise MissingActivationsError(
            f"The cache lacks {shown}. Run without a names_filter, or include them: "
            f"mechvis.run(model, prompt, names_filter=mechvis.analysis.hooks_for(model, ...))."
        )


def integer(value: object) -> int | None:
    """`value` as an int if it is an integer (numpy integers and 0-d integer tensors or arrays
    included), else None: bools, floats, strings and tensors of one or more dimensions are not
    integers."""
    if isinstance(value, (bool, float, str, bytes)) or getattr(value, "dtype", None) in (torch.bool, np.bool_):
        return None
    if getattr(value, "ndim", 0) != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def real(value: object) -> float | None:
    """`value` as a float if it is a real number (numpy floats and integers, 0-d tensors
    included), else None: bools and strings are not numbers."""
    if isinstance(value, (bool, str, bytes)) or getattr(value, "dtype", None) in (torch.bool, np.bool_):
        return None
    if isinstance(value, complex) or (isinstance(value, Tensor) and value.is_complex()):
        return None
    try:
        return float(value) if getattr(value, "ndim", 0) == 0 else None
    except (TypeError, ValueError):
        return None


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for messages that echo what was given."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return ""


def check_integer(
    value: object, name: str, *, low: int | None = None, high: int | None = None, hint: str = "", bounds: str | None = None,
) -> int:
    """`value` as an int within [low, high] (either bound optional); integer-likes (numpy
    integers, 0-d integer tensors) accepted.

    Raises:
        InvalidArgumentError: not an integer (a float such as 1.5, a bool, a string, a tensor of
            more than 0 dimensions), or outside the bounds. The message names `name`."""
    checked = integer(value)
    if checked is None or (low is not None and checked < low) or (high is not None and checked > high):
        bounds = _bounds(low, high) if bounds is None else bounds
        raise InvalidArgumentError(f"{name} must be an integer{' ' + bounds if bounds else ''}{hint}; got {shown(value)}.")
    return checked


def check_real(
    value: object, name: str, *, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, hint: str = "",
) -> float:
    """`value` as a finite float within its bounds (open or closed at each end).

    Raises:
        InvalidArgumentError: not a real number (a string, a bool, a tensor of more than 0
            dimensions), NaN or infinite, or outside the bounds."""
    checked = real(value)
    if (
        checked is None or not math.isfinite(checked)
        or (low is not None and (checked <= low if low_open else checked < low))
        or (high is not None and (checked >= high if high_open else checked > high))
    ):
        bounds = _bounds(low, high, low_open, high_open)
        raise InvalidArgumentError(f"{name} must be a finite number{' ' + bounds if bounds else ''}{hint}; got {shown(value)}.")
    return checked


def check_bool(value: object, name: str) -> bool:
    """`value` if it is a bool (numpy bools included): strings such as "no" and numbers are not.

    Raises:
        InvalidArgumentError: anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgumentError(f"{name} must be True or False; got {shown(value)}.")


def check_k(k: object, vocab: int) -> int:
    """A top-k count: an integer in [1, vocab].

    Raises:
        InvalidArgumentError: anything else (0, negative, above the vocabulary, 1.5, ...)."""
    return check_integer(k, "k", low=1, high=vocab, hint=" (how many top tokens to keep)")


def check_span(value: object, name: str) -> Span:
    """`value` if it is a `mechvis.Span` with integer 0 ≤ start ≤ stop.

    Raises:
        InvalidArgumentError: a tuple such as (0, 5) or anything else that is not a Span."""
    if not isinstance(value, Span):
        raise InvalidArgumentError(
            f"{name} must be a mechvis.Span(kind, start, stop), e.g. Span('keyword', 3, 5) or one from "
            f"find_token_spans / run.segments; got {shown(value)}."
        )
    start, stop = integer(value.start), integer(value.stop)
    if start is None or stop is None or not 0 <= start <= stop:
        raise InvalidArgumentError(f"{name} needs integer positions 0 ≤ start ≤ stop; got {shown(value)}.")
    return value


def check_spans(values: object, name: str) -> list[Span]:
    """A list of `mechvis.Span`s (each checked by `check_span`).

    Raises:
        InvalidArgumentError: one Span not in a list, a tuple of positions, anything else."""
    if isinstance(values, Span):
        raise InvalidArgumentError(f"{name} must be a list of Spans; got one Span (pass [span]).")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(f"{name} must be a list of mechvis.Span; got {shown(values)}.")
    return [check_span(value, f"each of {name}") for value in values]


_KINDS = {"float": "floating-point", "int": "integer"}


def check_tensor(
    value: object, name: str, *, ndim: int, shape: str, kind: str = "float", empty: bool = False, lists: bool = False,
    what: str | None = None,
) -> Tensor:
    """`value` as a torch tensor of `ndim` dimensions (`shape` names them in messages) and of
    `kind` "float" (floating-point) or "int" (integer). A numpy array is converted (no copy where
    possible); with `lists`, a (nested) list of numbers too. `empty` allows zero elements. `what`
    words the expectation in messages (default "a <shape> tensor").

    Raises:
        InvalidArgumentError: another type, dimension count or dtype, or no elements."""
    tensor = value
    if isinstance(value, np.ndarray) or (lists and isinstance(value, (list, tuple))):
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            tensor = None
    what = what or f"a {shape} tensor ({ndim}-D)"
    if not isinstance(tensor, Tensor):
        raise InvalidArgumentError(f"{name} must be {what}; got {type(value).__name__} {shown(value)}.")
    if tensor.ndim != ndim:
        raise InvalidArgumentError(f"{name} must be {what}; got shape {tuple(tensor.shape)}.")
    floating = tensor.is_floating_point()
    if kind == "float" and not floating or kind == "int" and (floating or tensor.is_complex() or tensor.dtype == torch.bool):
        raise InvalidArgumentError(f"{name} must hold {_KINDS[kind]} values; got dtype {tensor.dtype}.")
    if not empty and tensor.numel() == 0:
        raise InvalidArgumentError(f"{name} is empty (shape {tuple(tensor.shape)}); it needs at least one element.")
    return tensor


def check_token_ids(model: "TransformerBridge", tokens: object, name: str = "tokens") -> Tensor:
    """A sequence of token ids: a 1-D integer tensor (a list or numpy array is converted), not
    empty, every id in the model's vocabulary.

    Raises:
        InvalidArgumentError: anything else; an id outside the vocabulary is named."""
    tensor = check_tensor(tokens, name, ndim=1, shape="(pos,)", kind="int", lists=True,
                          what="one non-empty sequence (pos,) of token ids")
    vocab = model.cfg.d_vocab
    outside = (tensor < 0) | (tensor >= vocab)
    if bool(outside.any()):
        where = int(outside.nonzero()[0, 0])
        raise InvalidArgumentError(
            f"{name} holds id {int(tensor[where])} at position {where}, outside the vocabulary (0..{vocab - 1})."
        )
    return tensor


def _indices(values: Iterable[int], count: int, what: str, owner: str) -> list[int]:
    """Indices in -count..count-1 (negative counts from the end), normalised to 0..count-1.
    Integer-likes (numpy integers, 0-d integer tensors) count as integers; bools, floats,
    strings and nested lists do not. A tensor or array of indices must be 1-D."""
    if (
        isinstance(values, (str, bytes)) or not isinstance(values, Iterable)
        or (getattr(values, "ndim", 1) != 1 and isinstance(values, (Tensor, np.ndarray)))
    ):
        shape = f" of shape {tuple(values.shape)}" if isinstance(values, (Tensor, np.ndarray)) else ""
        raise InvalidArgumentError(
            f"{what}s must be a list of integers (or a 1-D tensor); got {shown(values)}{shape} (for one {what}, pass [{what}])."
        )
    checked = []
    for value in values:
        index = integer(value)
        if index is None:
            raise InvalidArgumentError(f"{what} {shown(value)} is not an integer: {owner} has {what}s 0..{count - 1}.")
        if not -count <= index < count:
            raise InvalidArgumentError(f"{what} {index} is out of range: {owner} has {what}s 0..{count - 1}.")
        checked.append(index % count)
    return checked


def check_model(model: object) -> "TransformerBridge":
    """`model` if it is a hooked model (what `mechvis.load_model` returns).

    Raises:
        InvalidArgumentError: anything else (None, a plain HF model, a name)."""
    if not (hasattr(model, "cfg") and hasattr(model, "hook_dict")):
        raise InvalidArgumentError(
            f"model must be a model loaded with mechvis.load_model(...); got {shown(model)}."
        )
    return model


def cache_and_model(
    source: object, model: object = None, *, call: str = "analysis", warn: bool = True,
) -> tuple["ActivationCache", "TransformerBridge"]:
    """The cache and model of an analysis's first argument: a `Run` (its cache), a `Trace` (its
    run's cache) or an `ActivationCache`; the model is the cache's own (`cache.model`). This is the
    convention of every analysis, `analysis(run_or_cache, *, options)`. A plain mapping
    {hook name: tensor} carries its model with `with_model(mapping, model)`.

    `model` is the deprecated second positional argument of the old `(cache, model)` form: when
    given, it warns (naming `call`, the new form) and is used as before (checked, and preferred to
    the cache's own).

    Raises:
        InvalidArgumentError: a source that is none of these, a bad deprecated `model`, or a
            mapping cache with no model."""
    if _is_cache(source):
        cache = source
    else:
        run = getattr(source, "run", None)  # a Trace
        cache = getattr(run if run is not None else source, "cache", None)
        if cache is None:
            try:
                _check_cache(source)  # the message every analysis gave for a bad cache
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"{call} takes a Run, a Trace or a cache: {error}") from None
            cache = source
    _check_cache(cache)
    if model is not None:
        if warn:
            deprecated(f"Passing the model is deprecated: call {call} (the model is the cache's own, cache.model).", stacklevel=4)
        return cache, check_model(model)
    own = getattr(cache, "model", None)
    if own is None:
        raise InvalidArgumentError(
            f"{call} needs the model: this cache has none (a plain dict of tensors); pass an ActivationCache from "
            f"mechvis.run, or mechvis.analysis.with_model(cache, model).")
    return cache, check_model(own)


class ModelCache(dict):
    """A mapping {hook name: tensor} that knows its model, as an ActivationCache does
    (`with_model`)."""

    model: "TransformerBridge"


def with_model(cache: object, model: "TransformerBridge") -> ModelCache:
    """`cache` (a mapping {hook name: tensor}, batch dimension first) as a cache that carries
    `model`, for analyses called on tensors that no `mechvis.run` produced.

    Raises:
        InvalidArgumentError: `cache` not a mapping, `model` not a hooked model."""
    _check_cache(cache)
    out = ModelCache(getattr(cache, "cache_dict", cache))
    out.model = check_model(model)
    return out


def analysis_form(call: str, *, options: tuple[str, ...] = ()):
    """Decorator: an analysis written as `func(cache, model, **options)` becomes the public
    `func(run_or_cache, *, **options)`, the model taken from the cache (`cache_and_model`). `call`
    is the new form, named by the warnings.

    The old forms keep working for one release, each with a `MechvisDeprecationWarning`:
    `func(cache, model, ...)` (the model second, positionally or as `model=`), `cache=` as a
    keyword, and the `options` that used to be positional (after the model), in that order."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if args:
                source, args = args[0], args[1:]
            elif "run_or_cache" in kwargs:
                source = kwargs.pop("run_or_cache")
            elif "cache" in kwargs:
                source = kwargs.pop("cache")
                deprecated(f"The keyword cache= is deprecated: call {call}.", stacklevel=3)
            else:
                raise TypeError(f"{func.__name__}() needs a Run, a Trace or an ActivationCache: {call}.")
            by_keyword = "model" in kwargs
            model = kwargs.pop("model", None)
            if args and not by_keyword:
                model, args = args[0], args[1:]
                if not (hasattr(model, "cfg") and hasattr(model, "hook_dict")):
                    raise InvalidArgumentError(
                        f"model must be a model loaded with mechvis.load_model(...); got {shown(model)}. The model is the "
                        f"cache's own and options are keyword-only: call {call}.")
            warned = False
            if args:
                if len(args) > len(options):
                    raise TypeError(f"{func.__name__}() takes its options by keyword: {call}.")
                named = options[: len(args)]
                deprecated(f"Passing {'the model and ' if model is not None else ''}{', '.join(named)} positionally is "
                           f"deprecated: call {call} (the model is the cache's own, cache.model).", stacklevel=3)
                warned = True
                for name, value in zip(named, args):
                    if name in kwargs:
                        raise TypeError(f"{func.__name__}() got {name} twice.")
                    kwargs[name] = value
            cache, model = cache_and_model(source, model, call=call, warn=not warned)
            return func(cache, model, **kwargs)

        wrapper.__signature__ = _public_signature(func, "run_or_cache")
        wrapper.new_form = call
        return wrapper

    return decorate


def _public_signature(func, first: str) -> inspect.Signature:
    """The signature an analysis shows: `first` positional, then every option of `func` after its
    old (source, model) pair as keyword-only."""
    signature = inspect.signature(func)
    options = list(signature.parameters.values())[2:]
    return inspect.Signature([inspect.Parameter(first, inspect.Parameter.POSITIONAL_ONLY)]
                             + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in options],
                             return_annotation=signature.return_annotation)


def trace_form(call: str, *, options: tuple[str, ...] = ()):
    """Decorator: an analysis of a generation written as `func(model, trace, **options)` becomes
    the public `func(trace, *, **options)`, the model taken from the trace's cache. The old form
    `func(model, trace, ...)` (and the `options` that used to be positional after the trace, in
    that order) keeps working for one release, with a `MechvisDeprecationWarning` naming `call`."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            model = kwargs.pop("model", None)
            if args and model is None and hasattr(args[0], "cfg") and hasattr(args[0], "hook_dict"):
                model, args = args[0], args[1:]
            if args:
                trace, args = args[0], args[1:]
            elif "trace" in kwargs:
                trace = kwargs.pop("trace")
            else:
                raise TypeError(f"{func.__name__}() needs a Trace: {call}.")
            if len(args) > len(options):
                raise TypeError(f"{func.__name__}() takes its options by keyword: {call}.")
            for name, value in zip(options, args):
                if name in kwargs:
                    raise TypeError(f"{func.__name__}() got {name} twice.")
                kwargs[name] = value
            if model is not None or args:
                deprecated(f"{func.__name__}(model, trace, ...) is deprecated: call {call} (the model is the trace's cache's own).",
                           stacklevel=3)
            if model is None:
                _, model = cache_and_model(trace, call=call)
            return func(check_model(model), trace, **kwargs)

        wrapper.__signature__ = _public_signature(func, "trace")
        wrapper.new_form = call
        return wrapper

    return decorate


def _is_cache(source: object) -> bool:
    return hasattr(source, "cache_dict") or (isinstance(source, dict))


def check_layers(model: "TransformerBridge", layers: Iterable[int] | None) -> list[int]:
    """Layer indices validated against the model; None = all layers.

    Raises:
        InvalidArgumentError: not a model, not a list of integers, an index out of range, or an
            empty list."""
    check_model(model)
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    checked = _indices(layers, n_layers, "layer", "this model")
    if not checked:
        raise InvalidArgumentError(f"No layers given; pass at least one layer (0..{n_layers - 1}), or None for all.")
    return checked


def check_heads(model: "TransformerBridge", heads: Iterable[int]) -> list[int]:
    """Head indices validated against the model."""
    return _indices(heads, model.cfg.n_heads, "head", "this model")


def check_positions(n_positions: int, positions: Iterable[int] | None, *, empty: bool = False) -> list[int]:
    """Token positions validated against the sequence; None = all positions. `empty` allows
    an empty list (e.g. no sink positions).

    Raises:
        InvalidArgumentError: a bare integer, not a list/1-D tensor of integers, out of range, or
            (unless `empty`) no positions."""
    if positions is None:
        return list(range(n_positions))
    checked = _indices(positions, n_positions, "position", "the sequence")
    if not checked and not empty:
        raise InvalidArgumentError("No positions given; pass at least one token position.")
    return checked


def check_names_filter(model: "TransformerBridge", names_filter: object) -> object:
    """A transformer-lens `names_filter` checked before any model work: None (every hook), a
    function name → bool, a hook name the model has, or a list/tuple of hook names (returned as a
    list) of which at least one is the model's (`model.hook_dict`). Names the model lacks are
    ignored in a list that matches others, as transformer-lens does: `hooks_for` lists hooks some
    architectures lack (e.g. `ln1_post`), and an analysis that needs a hook that was not cached
    raises `MissingActivationsError` naming it.

    Raises:
        InvalidArgumentError: another type, an unknown single name, or a list of which no name is
            the model's (the message suggests the closest names)."""

    if names_filter is None or callable(names_filter):
        return names_filter
    names = [names_filter] if isinstance(names_filter, str) else names_filter
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise InvalidArgumentError(
            f"names_filter must be None, a hook name, a list of hook names or a function (name → bool); "
            f"got {shown(names_filter)}."
        )
    known = model.hook_dict
    unknown = [name for name in names if name not in known]
    if unknown and len(unknown) == len(names):
        close = difflib.get_close_matches(unknown[0], list(known), n=3)
        raise InvalidArgumentError(
            f"names_filter names no hook this model has: {unknown[:4]}"
            + (f"; did you mean {close}?" if close else ".")
            + " The model's hook names are `model.hook_dict`'s keys (mechvis.analysis.hooks_for names "
            "the hooks of each analysis)."
        )
    return list(names)
