"""The Result base (labels, units, to_dict, to_frame) on every result type, and the one signature
convention `analysis(run_or_cache, *, options)` with its deprecated old forms (issue 24, items 4 and 6)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechvis
from mechvis._validation import with_model
from mechvis.analysis import (
    activation_norms,
    activation_statistics,
    attention_patterns,
    attention_to_spans,
    cross_modal,
    decompose_residual,
    direct_logit_attribution,
    head_entropy,
    head_results,
    hidden_state_projection,
    high_entropy_positions,
    layer_similarity,
    logit_lens,
    rollout,
    rollout_rows,
    token_signals,
)
from mechvis.analysis.repetition import repetition_features, seed_score
from mechvis.analysis.spans import find_token_spans, semantic_token_spans
from mechvis.errors import InvalidArgumentError, MechvisDeprecationWarning
from mechvis.generation import generate
from mechvis.generation.monitor import InductionHeads
from mechvis.results import Result, jsonable
from mechvis.types import ImageGrid, Span

PROMPT = "When John and Mary went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def model_run(tokenizer):
    from tests.tiny import tiny_hf_model

    model = mechvis.load_model(tiny_hf_model("llama"), tokenizer=tokenizer, device="cpu")
    return model, mechvis.run(model, PROMPT)


def _new_forms(model, run):
    """Every analysis called in the new form, keyed by name."""
    n = len(run.tokens)
    grid = ImageGrid(positions=tuple(range(2, 6)), rows=2, cols=2)
    return {
        "logit_lens": logit_lens(run, positions=[n - 2, n - 1], k=3),
        "head_entropy": head_entropy(run),
        "rollout": rollout(run),
        "rollout_rows": rollout_rows(run, queries=[n - 1]),
        "attention_to_spans": attention_to_spans(run, key_spans=[Span("keyword", 1, 3)]),
        "activation_norms": activation_norms(run, kind="resid_post"),
        "activation_statistics": activation_statistics(run, kind="mlp_post"),
        "cross_modal": cross_modal(run, grid=grid),
        "hidden_state_projection": hidden_state_projection(run, labels=run.str_tokens, layer=1),
        "decompose_residual": decompose_residual(run, heads=True),
        "direct_logit_attribution": direct_logit_attribution(run, answer=5, counterfactual=7),
        "layer_similarity": layer_similarity(run),
        "high_entropy_positions": high_entropy_positions(run, n=3, k=2),
        "token_signals": token_signals(run.logits, run.tokens),
    }


# -- the base on every result type ---------------------------------------------------------------

def _check_result(result: Result) -> None:
    payload = result.to_dict()
    json.dumps(payload, allow_nan=True)
    json.dumps(result.to_dict(strict=True), allow_nan=False)  # strict: NaN as null
    frame = result.to_frame()
    dims = result.dimensions()
    expected_rows = sum(getattr(result, name).numel() for name in dims if getattr(result, name) is not None)
    assert len(frame) == expected_rows
    for name, names in dims.items():
        value = getattr(result, name)
        if value is None:
            continue
        part = frame[frame["field"] == name]
        assert part["unit"].iloc[0] == result.unit(name)
        assert len(part) == value.numel()
        flat = value.detach().float().flatten().numpy()
        np.testing.assert_allclose(part["value"].to_numpy(dtype=float), flat, equal_nan=True)
        for dim in names:
            assert dim in part.columns


def test_every_result_is_a_result_with_units(model_run):
    model, run = model_run
    for name, result in _new_forms(model, run).items():
        assert isinstance(result, Result), name
        assert result.units, f"{name} declares no units"
        assert set(result.units) <= {f.name for f in dataclasses.fields(result)}, name
        _check_result(result)


def test_result_classes_declare_units_for_their_tensor_fields():
    import mechvis.analysis.activations as activations
    import mechvis.analysis.attention as attention
    import mechvis.analysis.crossmodal as crossmodal
    import mechvis.analysis.geometry as geometry
    import mechvis.analysis.information as information
    import mechvis.analysis.lens as lens
    import mechvis.analysis.projection as projection
    import mechvis.analysis.regions as regions
    import mechvis.analysis.repetition as repetition
    import mechvis.analysis.residual as residual
    import mechvis.analysis.spans as spans
    import mechvis.analysis.tokens as tokens
    import mechvis.generation.monitor as monitor
    import mechvis.studies.attribution as attribution
    import mechvis.studies.gradients as gradients
    import mechvis.studies.instructions as instructions

    modules = [activations, attention, crossmodal, geometry, information, lens, projection, regions, repetition, residual,
               spans, tokens, attribution, gradients, instructions]
    classes = [value for module in modules for value in vars(module).values()
               if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__]
    classes += [monitor.InductionHeads, monitor.RepetitionFeatures]
    assert len(classes) >= 30
    for cls in classes:
        assert issubclass(cls, Result), cls
        missing = [name for name in cls.dimensions() if name not in cls.units]
        assert not missing, (cls, missing)


def test_head_entropy_frame_against_a_hand_built_one(model_run):
    model, run = model_run
    result = head_entropy(run, layers=[0, 2])
    frame = result.to_frame(["sink_mass"])
    rows = [{"field": "sink_mass", "layer": layer, "head": head, "query": query,
             "value": float(result.sink_mass[i, head, query]), "unit": "probability"}
            for i, layer in enumerate([0, 2]) for head in range(result.sink_mass.shape[1])
            for query in range(result.sink_mass.shape[2])]
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), pd.DataFrame(rows), check_dtype=False)
    assert result.labels() == {"layer": [0, 2]}


def test_logit_lens_frame_labels_layers_and_positions(model_run):
    model, run = model_run
    n = len(run.tokens)
    lens = logit_lens(run, positions=[n - 2, n - 1], k=2)
    frame = lens.to_frame(["entropy"])
    assert list(frame.columns) == ["field", "layer", "pos", "value", "unit"]
    assert frame["layer"].tolist()[:2] == ["embed", "embed"] and frame["pos"].tolist()[:2] == [n - 2, n - 1]
    row = frame[(frame["layer"] == "1") & (frame["pos"] == n - 1)]
    assert row["value"].item() == pytest.approx(float(lens.entropy[2, 1]))
    assert row["unit"].item() == "nats"
    assert lens.labels()["layer"] == lens.layer_labels


def test_a_field_named_labels_keeps_its_value_and_axis_labels_name_the_components(model_run):
    model, run = model_run
    decomposition = decompose_residual(run)
    assert decomposition.labels[0] == "embed"  # the field, as before
    assert decomposition.axis_labels()["component"] == decomposition.labels
    frame = decomposition.to_frame()
    assert frame["component"].iloc[0] == "embed"
    attribution = direct_logit_attribution(run, answer=5)
    assert attribution.to_frame()["component"].tolist() == attribution.labels


def test_to_dict_fields_decimals_and_strict(model_run):
    model, run = model_run
    entropy = head_entropy(run)
    payload = entropy.to_dict({"layers": "layers", "mean": "mean_normalised"}, decimals=3)
    assert payload["layers"] == entropy.layers
    assert payload["mean"] == torch.round(entropy.mean_normalised.double(), decimals=3).tolist()
    with pytest.raises(InvalidArgumentError, match="not attributes"):
        entropy.to_dict(["no_such_field"])
    signals = token_signals(run.logits, run.tokens)
    assert signals.to_dict(["surprisal"], strict=True)["surprisal"][-1] is None
    assert math.isnan(signals.to_dict(["surprisal"])["surprisal"][-1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12), st.integers(0, 6))
def test_jsonable_strict_is_strict_json(values, decimals):
    text = json.dumps(jsonable(torch.tensor(values), decimals=decimals, strict=True), allow_nan=False)
    back = json.loads(text)
    for got, value in zip(back, values):
        if math.isfinite(value) and math.isfinite(round(value, decimals)):
            assert got == pytest.approx(round(float(np.float32(value)), decimals), abs=10.0 ** -decimals)
        elif not math.isfinite(value):
            assert got is None


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4))
def test_to_frame_has_one_row_per_element(rows, cols):
    from mechvis.analysis.residual import LayerSimilarity

    result = LayerSimilarity([str(i) for i in range(rows)], torch.rand(rows, rows), list(range(cols)))
    frame = result.to_frame()
    assert len(frame) == rows * rows
    assert set(frame["layer"]) == {str(i) for i in range(rows)}


# -- the signature convention and its deprecated forms ------------------------------------------

def _same(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)
        else:
            assert x == y, field.name


def _old(call):
    with pytest.warns(MechvisDeprecationWarning) as record:
        result = call()
    assert any("call " in str(w.message) or "is deprecated" in str(w.message) for w in record)
    return result, [str(w.message) for w in record]


def test_every_old_form_warns_names_the_new_call_and_agrees(model_run):
    model, run = model_run
    cache = run.cache
    n = len(run.tokens)
    grid = ImageGrid(positions=tuple(range(2, 6)), rows=2, cols=2)
    pairs = {
        "logit_lens": (lambda: logit_lens(cache, model, positions=[n - 1], k=3), lambda: logit_lens(run, positions=[n - 1], k=3)),
        "head_entropy": (lambda: head_entropy(cache, model), lambda: head_entropy(cache)),
        "rollout": (lambda: rollout(cache, model, residual_weight=0.3), lambda: rollout(run, residual_weight=0.3)),
        "rollout_rows": (lambda: rollout_rows(cache, model, [n - 1]), lambda: rollout_rows(run, queries=[n - 1])),
        "attention_to_spans": (lambda: attention_to_spans(cache, model, [Span("keyword", 1, 3)]),
                               lambda: attention_to_spans(run, key_spans=[Span("keyword", 1, 3)])),
        "activation_norms": (lambda: activation_norms(cache, model, "attn_out"), lambda: activation_norms(run, kind="attn_out")),
        "activation_statistics": (lambda: activation_statistics(cache, model), lambda: activation_statistics(run)),
        "cross_modal": (lambda: cross_modal(cache, model, grid), lambda: cross_modal(run, grid=grid)),
        "hidden_state_projection": (lambda: hidden_state_projection(cache, model, run.str_tokens, layer=0),
                                    lambda: hidden_state_projection(run, labels=run.str_tokens, layer=0)),
        "decompose_residual": (lambda: decompose_residual(cache, model, upto_layer=1), lambda: decompose_residual(run, upto_layer=1)),
        "direct_logit_attribution": (lambda: direct_logit_attribution(cache, model, 5, 7, position=3),
                                     lambda: direct_logit_attribution(run, answer=5, counterfactual=7, position=3)),
        "direct_logit_attribution model=": (lambda: direct_logit_attribution(cache=cache, model=model, answer=5),
                                            lambda: direct_logit_attribution(cache, answer=5)),
        "layer_similarity": (lambda: layer_similarity(cache, model), lambda: layer_similarity(run)),
        "high_entropy_positions": (lambda: high_entropy_positions(model, run.logits, n=3, k=2, cache=cache),
                                   lambda: high_entropy_positions(run, n=3, k=2)),
        "high_entropy_positions centred": (lambda: high_entropy_positions(model, run.logits[:-1], n=2),
                                           lambda: high_entropy_positions(run, logits=run.logits[:-1], n=2, own_logits=False)),
    }
    for name, (old, new) in pairs.items():
        got, messages = _old(old)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MechvisDeprecationWarning)
            want = new()
        _same(got, want)
        base = name.split(" ")[0]
        assert any(f"{base}(run" in message for message in messages), (name, messages)
    for old, new in [(lambda: attention_patterns(cache, model, [1]), lambda: attention_patterns(run, layers=[1])),
                     (lambda: head_results(cache, model, 1), lambda: head_results(run, layer=1))]:
        got, _ = _old(old)
        torch.testing.assert_close(got, new(), rtol=0, atol=0)


def test_the_new_form_takes_a_run_a_trace_a_cache_or_a_mapping_with_its_model(model_run):
    model, run = model_run
    want = layer_similarity(run)
    _same(layer_similarity(run.cache), want)
    _same(layer_similarity(with_model(dict(run.cache.cache_dict), model)), want)
    with pytest.raises(InvalidArgumentError, match="needs the model"):
        layer_similarity(dict(run.cache.cache_dict))
    with pytest.raises(InvalidArgumentError, match="cache must be an ActivationCache"):
        layer_similarity("not a cache")
    with pytest.raises(TypeError, match="by keyword"):
        layer_similarity(run.cache, model, [1, 2])  # layer_similarity never took positional options


def test_trace_analyses_take_the_trace(model_run):
    model, _ = model_run
    trace = generate(model, PROMPT, max_new_tokens=4)
    induction = InductionHeads(torch.zeros(model.cfg.n_layers, model.cfg.n_heads), [(1, 0)])
    new_seed = seed_score(trace, alpha=0.5)
    old_seed, messages = _old(lambda: seed_score(model, trace, alpha=0.5))
    _same(old_seed, new_seed)
    assert any("seed_score(trace" in message for message in messages)
    new_features = repetition_features(trace, induction=induction, layer=1)
    old_features, _ = _old(lambda: repetition_features(model, trace, induction, layer=1))
    _same(old_features, new_features)
    _check_result(new_seed)
    _check_result(new_features)


def test_semantic_spans_take_the_model_from_the_run(model_run):
    model, run = model_run
    new = semantic_token_spans(run, " John", threshold=0.5)
    old, messages = _old(lambda: semantic_token_spans(run, " John", model, threshold=0.5))
    _same(old, new)
    assert any("semantic_token_spans(run, keyword" in message for message in messages)
    assert find_token_spans(run, " John", match="semantic", threshold=0.5) == new.spans
    with pytest.warns(MechvisDeprecationWarning) as record:
        assert find_token_spans(run, " John", match="semantic", model=model, threshold=0.5) == new.spans
    assert len(record) == 1 and "find_token_spans" in str(record[0].message)
    _check_result(new)


def test_mechvis_raises_no_deprecation_warning_on_the_report_path(model_run):
    """The report's analyses, the app's conversions and the sweep's rows use the new forms."""
    from mechvis.report import report_json
    from mechvis.report.build import build_report_data

    model, _ = model_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechvisDeprecationWarning)
        data = build_report_data(model, PROMPT, max_new_tokens=3, lens_positions=4)
        json.dumps(report_json(data), allow_nan=True)


def test_a_positional_option_is_refused_with_the_new_call(model_run):
    _, run = model_run
    with pytest.raises(InvalidArgumentError, match=r"keyword-only: call activation_norms\(run_or_cache, \*, kind="):
        activation_norms(run, "attn_out")
    with pytest.raises(InvalidArgumentError, match="mechvis.load_model"):
        head_entropy(run.cache, "model")
