"""`Result`: the one base of every result mechvis returns (after tuned-lens' `TrajectoryStatistic`).

A result is a dataclass whose tensor fields carry their dimension names in jaxtyping annotations
(`Float[Tensor, "layer head query"]`) and whose units are declared once per class (`units`). From
those the base derives everything a consumer needs, so that the JSON export, the report, the web
app and sweeps serialise every result through the same code:

- `labels()`: the coordinate labels of each named dimension (the `layers` field for "layer", the
  `positions` field for "pos", ...), so that a view never reconstructs which row is which layer;
- `to_dict()`: plain Python values for JSON (tensors as nested lists of floats; NaN kept as NaN
  unless `strict=True`, which writes None);
- `to_frame()`: a long-format pandas DataFrame, one row per tensor element (pandas is optional).

    >>> import torch
    >>> from dataclasses import dataclass
    >>> from jaxtyping import Float
    >>> from torch import Tensor
    >>> @dataclass
    ... class Example(Result):
    ...     units = {"entropy": "nats"}
    ...     layers: list[int]
    ...     entropy: Float[Tensor, "layer head"]
    >>> result = Example(layers=[2, 5], entropy=torch.tensor([[0.5, 1.0], [1.5, 2.0]]))
    >>> result.labels()["layer"]
    [2, 5]
    >>> result.to_dict()["entropy"]
    [[0.5, 1.0], [1.5, 2.0]]
    >>> result.to_frame().iloc[2].to_dict()
    {'field': 'entropy', 'layer': 5, 'head': 0, 'value': 1.5, 'unit': 'nats'}
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from mechvis.errors import InvalidArgumentError

_DIMS = re.compile(r"""(?:Float|Int|Bool|Shaped|Num|Integer|Real)\[\s*(?:torch\.)?Tensor\s*,\s*["']([^"']*)["']\s*\]""")

# Where a dimension's labels come from when a result has the field: the first present wins.
LABEL_FIELDS: dict[str, tuple[str, ...]] = {
    "layer": ("layers", "layer_labels", "layer_names"),
    "head": ("heads",),
    "pos": ("positions", "query_positions"),
    "position": ("positions", "query_positions"),
    "query": ("query_positions", "queries", "positions"),
    "key": ("key_positions",),
    "gen": ("positions",),
    "feature": ("names", "features"),
    "cell": ("cells",),
    "k": (),
    "component": ("component_labels",),
    "point": ("point_labels",),
    "prompt": ("prompts",),
    "percentile": ("percentile_levels",),
}


def dimension_names(annotation: object) -> tuple[str, ...] | None:
    """The dimension names of a jaxtyping tensor annotation (or its string form), e.g.
    `Float[Tensor, "layer head"]` → ("layer", "head"); None for anything else. Variadic or
    broadcast markers ("*batch", "...") and fixed sizes are kept as written.

        >>> dimension_names('Float[Tensor, "layer head query"]')
        ('layer', 'head', 'query')
        >>> dimension_names("list[int]") is None
        True
    """
    text = annotation if isinstance(annotation, str) else getattr(annotation, "dim_str", None)
    if text is None:
        return None
    if not isinstance(annotation, str):
        return tuple(text.split())
    match = _DIMS.search(text)
    return tuple(match.group(1).split()) if match else None


def jsonable(value: object, *, decimals: int | None = None, strict: bool = False) -> object:
    """`value` as JSON-ready Python: tensors and arrays as nested lists (floats, or ints for integer
    dtypes; bfloat16/float16 as float32 values), tuples as lists, results and dataclasses as dicts,
    paths and other objects as their `str`. NaN and infinities stay floats (JSON writers decide)
    unless `strict`, which writes them as None (strict JSON has neither). `decimals` rounds the
    floats of tensors and arrays (in float64, so that 0.123 stays 0.123 in JSON).

        >>> jsonable({"x": torch.tensor([1.0, float("nan")]), "k": (1, 2)})
        {'x': [1.0, nan], 'k': [1, 2]}
        >>> jsonable(torch.tensor([0.123456, float("inf")]), decimals=3, strict=True)
        [0.123, None]
    """
    options = {"decimals": decimals, "strict": strict}
    if isinstance(value, Result):
        return value.to_dict(**options)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return jsonable(value.tolist(), decimals=decimals, strict=strict)
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            if decimals is not None:
                value = torch.round(value.double(), decimals=decimals)
            elif value.dtype in (torch.bfloat16, torch.float16):
                value = value.float()
        out = value.tolist()
        return _finite(out) if strict and value.is_floating_point() else out
    if isinstance(value, np.generic):
        return jsonable(value.item(), **options)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: jsonable(getattr(value, field.name), **options) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key) if not isinstance(key, (int, float, bool)) else key: jsonable(item, **options) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item, **options) for item in value]
    if isinstance(value, float):
        return None if strict and not math.isfinite(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _finite(values: object) -> object:
    """Nested lists with NaN and infinities as None."""
    if isinstance(values, list):
        return [_finite(item) for item in values]
    return None if isinstance(values, float) and not math.isfinite(values) else values


class _LabelsMethod:
    """`result.labels()` is `result.axis_labels()`. Results whose dataclass field is itself named
    `labels` (the component names of a residual decomposition or a logit attribution, the point
    names of a projection) keep that field, and give their dimension labels by `axis_labels()`.
    The class attribute reads as absent, so that such a field stays a required dataclass field."""

    def __get__(self, obj: object, owner: type | None = None) -> object:
        if obj is None:
            raise AttributeError("labels")
        return obj.axis_labels


class Result:
    """Base of mechvis's results. Subclasses are dataclasses; they declare `units` (field → unit,
    e.g. "nats", "probability", "logit (the model's own)", "fraction") and may override
    `label_fields` or `labels()` where a dimension's labels live in a field the defaults do not name.

    The dimension names come from each field's jaxtyping annotation, so a result documents its
    shapes once, in its class body.
    """

    units: ClassVar[Mapping[str, str]] = {}
    label_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    # -- structure ---------------------------------------------------------------------------
    @classmethod
    def dimensions(cls) -> dict[str, tuple[str, ...]]:
        """{field: dimension names} of the tensor fields (from their jaxtyping annotations)."""
        out = {}
        for klass in reversed(cls.__mro__):
            for name, annotation in getattr(klass, "__annotations__", {}).items():
                dims = dimension_names(annotation)
                if dims is not None:
                    out[name] = dims
        fields = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(out)
        return {name: dims for name, dims in out.items() if name in fields}

    labels = _LabelsMethod()

    def axis_labels(self) -> dict[str, list]:
        """{dimension: labels} for every dimension whose labels a field of this result holds
        (`labels()` is the same, where the class has no field of its own named `labels`)."""
        out: dict[str, list] = {}
        sources = {**LABEL_FIELDS, **self.label_fields}
        for dims in self.dimensions().values():
            for dim in dims:
                if dim in out:
                    continue
                for name in sources.get(dim, ()):
                    value = getattr(self, name, None)
                    if value is not None and not callable(value):
                        out[dim] = list(jsonable(value)) if not isinstance(value, str) else [value]
                        break
        return out

    def unit(self, field: str) -> str | None:
        """The unit of `field`, or None where the class declares none."""
        return self.units.get(field)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(
        self, fields: Sequence[str] | Mapping[str, str] | None = None, *, decimals: int | None = None, strict: bool = False,
    ) -> dict[str, Any]:
        """JSON-ready values (`jsonable`): what the JSON export, the report and the web app send.

        Args:
            fields: None for every dataclass field; else the attributes to send (fields or
                properties, e.g. `HeadEntropy.mean_normalised`), as names or as {key: attribute}
                where the payload names a value otherwise.
            decimals: round float tensors to this many decimals (None: as they are).
            strict: NaN and infinities as None (strict JSON), else kept as floats.

        Raises:
            InvalidArgumentError: a name that is not an attribute of this result.
        """
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is not a dataclass")
        if fields is None:
            chosen = {field.name: field.name for field in dataclasses.fields(self) if field.repr or field.compare}
        else:
            chosen = dict(fields) if isinstance(fields, Mapping) else {name: name for name in fields}
        unknown = [name for name in chosen.values() if not hasattr(self, name)]
        if unknown:
            raise InvalidArgumentError(f"{unknown} are not attributes of {type(self).__name__}.")
        return {key: jsonable(getattr(self, name), decimals=decimals, strict=strict) for key, name in chosen.items()}

    def _element_frame(self, name: str, value: object, dims: tuple[str, ...], labels: Mapping[str, list]):
        """One row per element of one tensor, with labelled coordinates (see `to_frame`)."""
        import pandas as pd  # optional: only to_frame needs it

        array = np.asarray(value.detach().cpu().float() if isinstance(value, torch.Tensor) and value.is_floating_point()
                           else (value.detach().cpu() if isinstance(value, torch.Tensor) else value))
        names = dims if len(dims) == array.ndim else tuple(f"dim_{i}" for i in range(array.ndim))
        names = tuple(f"dim_{i}" if dim.isdigit() else dim for i, dim in enumerate(names))  # a fixed size names no axis
        index = np.indices(array.shape).reshape(array.ndim, -1) if array.ndim else np.zeros((0, 1), dtype=int)
        columns: dict[str, object] = {"field": name}
        for axis, dim in enumerate(names):
            coords = labels.get(dim)
            positions = index[axis]
            columns[dim] = np.asarray(coords, dtype=object)[positions] if coords is not None and len(coords) == array.shape[axis] \
                else positions
        columns["value"] = array.reshape(-1)
        columns["unit"] = self.units.get(name)
        return pd.DataFrame(columns)

    def to_frame(self, fields: list[str] | None = None):
        """A long-format pandas DataFrame: one row per element of each tensor field (or of
        `fields`), with columns "field", one per dimension (labelled where `labels()` knows the
        labels, else the index), "value" and "unit".

        Raises:
            InvalidArgumentError: a name in `fields` that is not a tensor field of this result.
            ImportError: pandas is not installed (it is optional).
        """
        import pandas as pd  # optional: only to_frame needs it

        dims = self.dimensions()
        chosen = list(dims) if fields is None else [fields] if isinstance(fields, str) else list(fields)
        unknown = [name for name in chosen if name not in dims]
        if unknown:
            raise InvalidArgumentError(f"{unknown} are not tensor fields of {type(self).__name__}; choose from {sorted(dims)}.")
        labels = self.axis_labels()
        frames = []
        for name in chosen:
            value = getattr(self, name)
            if value is None:
                continue
            # a mapping of tensors (one per keyword, region, ...): its keys become a "key" column
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for key, item in items:
                frame = self._element_frame(name, item, dims[name], labels)
                if key is not None:
                    frame.insert(1, "key", key)
                frames.append(frame)
        if not frames:
            return pd.DataFrame(columns=["field", "value", "unit"])
        frame = pd.concat(frames, ignore_index=True)
        for column in frame.columns:
            if frame[column].dtype == object and column not in ("field", "unit"):
                frame[column] = frame[column].infer_objects()
        return frame

