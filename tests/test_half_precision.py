"""Half precision: every analysis, figure, view, the report and the CLI on float16 and bfloat16
models. Each analysis of a half-precision model is compared with the same analysis of the same
weights in float32 (the reference), within a tolerance set by the format's precision; results come
back as float32 (or float64) tensors that numpy and matplotlib take."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch

import mechvis
from mechvis.analysis import activation_norms, activation_statistics, attention_to_spans, decompose_residual, direct_logit_attribution, embedding_projection, head_entropy, head_results, hidden_state_projection, high_entropy_positions, layer_similarity, logit_lens, rollout, token_signals
from mechvis.analysis.spans import find_token_spans
from mechvis.studies.attribution import gradient_x_input, occlusion
from mechvis.generation.monitor import find_induction_heads
from mechvis.analysis.repetition import repetition_features, seed_score
from mechvis.report import write_report
from mechvis.viz import figures, views
from tests.tiny import tiny_hf_model

matplotlib.use("Agg")

PROMPT = "The capital of France is Paris. The capital of Italy is"
HALF = (torch.bfloat16, torch.float16)
# Absolute tolerances for quantities of order one (probabilities, cosines, normalised entropies):
# a few units of the format's precision (bfloat16 keeps 8 significant bits, float16 11) after
# three layers of rounding. Values of order ten (logits, nats over the vocabulary) scale with them.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def models(request, tokenizer):
    """{dtype: bridge} of the same tiny weights in float32, bfloat16 and float16."""
    return {
        dtype: mechvis.load_model(tiny_hf_model(request.param), tokenizer=tokenizer, device="cpu", dtype=dtype)
        for dtype in (torch.float32, *HALF)
    }


@pytest.fixture(scope="module")
def runs(models):
    return {dtype: mechvis.run(model, PROMPT) for dtype, model in models.items()}


def _close(half, full, tolerance, *, scale: float = 1.0):
    """Half-precision result equals the float32 one within `tolerance` × `scale`, and is a
    float32/float64 tensor (numpy-convertible)."""
    if isinstance(half, torch.Tensor):
        assert half.dtype in (torch.float32, torch.float64, torch.int64, torch.bool), half.dtype
        half, full = half.numpy(), full.numpy()
    np.testing.assert_allclose(half, full, atol=tolerance * scale, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cache_analyses_match_float32(models, runs, dtype):
    model, reference = models[dtype], models[torch.float32]
    run, full = runs[dtype], runs[torch.float32]
    tol = TOLERANCE[dtype]

    signals, expected = token_signals(run.logits, run.tokens), token_signals(full.logits, full.tokens)
    for field in ("entropy", "varentropy", "surprisal"):
        _close(getattr(signals, field), getattr(expected, field), tol, scale=10)
    for field in ("top1_prob", "margin", "top_probs"):
        _close(getattr(signals, field), getattr(expected, field), tol)

    lens, lens_full = logit_lens(run.cache, model, target=" Paris"), logit_lens(full.cache, reference, target=" Paris")
    for field in ("top_probs", "target_probs", "max_probs"):
        _close(getattr(lens, field), getattr(lens_full, field), tol)
    _close(lens.entropy, lens_full.entropy, tol, scale=10)
    _close(lens.kl_from_final, lens_full.kl_from_final, tol, scale=10)

    decomposition = decompose_residual(run.cache, model, heads=True)
    full_decomposition = decompose_residual(full.cache, reference, heads=True)
    _close(decomposition.components.float(), full_decomposition.components, tol, scale=10)
    _close(head_results(run.cache, model, 1).float(), head_results(full.cache, reference, 1), tol, scale=10)

    attribution = direct_logit_attribution(run.cache, model, " Paris", " Rome")
    full_attribution = direct_logit_attribution(full.cache, reference, " Paris", " Rome")
    _close(attribution.contributions, full_attribution.contributions, tol, scale=10)
    assert attribution.contributions.sum().item() + attribution.unembed_bias == pytest.approx(attribution.model_value, abs=10 * tol)
    assert attribution.model_value == pytest.approx(full_attribution.model_value, abs=10 * tol)

    _close(layer_similarity(run.cache, model).cosine, layer_similarity(full.cache, reference).cosine, tol)
    norms, full_norms = activation_norms(run.cache, model), activation_norms(full.cache, reference)
    _close(norms.norms / full_norms.norms, torch.ones_like(full_norms.norms), tol)
    statistics, full_statistics = activation_statistics(run.cache, model), activation_statistics(full.cache, reference)
    _close(statistics.std, full_statistics.std, tol, scale=full_statistics.std.abs().max().item())
    _close(statistics.percentiles, full_statistics.percentiles, tol, scale=full_statistics.percentiles.abs().max().item())

    entropy, full_entropy = head_entropy(run.cache, model), head_entropy(full.cache, reference)
    _close(entropy.entropy, full_entropy.entropy, tol, scale=2)
    _close(entropy.sink_mass, full_entropy.sink_mass, tol)
    assert entropy.classify() and entropy.ranked()
    _close(rollout(run.cache, model).matrix, rollout(full.cache, reference).matrix, tol)
    spans = find_token_spans(run, "capital")
    _close(attention_to_spans(run.cache, model, spans).mass, attention_to_spans(full.cache, reference, spans).mass, tol)

    projection = hidden_state_projection(run.cache, model, run.str_tokens, layer=1)
    full_projection = hidden_state_projection(full.cache, reference, full.str_tokens, layer=1)
    _close(projection.explained_variance_ratio, full_projection.explained_variance_ratio, tol)
    embedding = embedding_projection(model, [" Paris", " Rome", " France", " Italy"])
    assert embedding.coordinates.dtype == torch.float32

    high = high_entropy_positions(model, run.logits, n=3)
    full_high = high_entropy_positions(reference, full.logits, n=3)
    assert high.top_logits.dtype == torch.float32
    _close(high.entropy, full_high.entropy, tol, scale=10)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_input_attribution_matches_float32(models, runs, dtype):
    model, reference = models[dtype], models[torch.float32]
    tokens = runs[dtype].tokens
    tol = TOLERANCE[dtype]
    for method in (gradient_x_input, occlusion):
        half, full = method(model, tokens, " Paris"), method(reference, tokens, " Paris")
        assert half.scores.dtype == torch.float32
        _close(half.scores, full.scores, tol, scale=10)
        assert half.target_value == pytest.approx(full.target_value, abs=10 * tol)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_repetition_signals_match_float32(models, dtype):
    model, reference = models[dtype], models[torch.float32]
    text = " one two three one two three one two three"
    trace, full_trace = mechvis.teacher_force(model, "Count:", text), mechvis.teacher_force(reference, "Count:", text)
    tol = TOLERANCE[dtype]
    _close(seed_score(model, trace).score, seed_score(reference, full_trace).score, tol, scale=2)
    induction = find_induction_heads(reference, threshold=0.0, top=2)
    features = repetition_features(model, trace, induction, layer=1)
    full_features = repetition_features(reference, full_trace, induction, layer=1)
    for name in ("confidence", "margin", "copy_attention", "sink_mass", "recurrence"):
        _close(features[name], full_features[name], tol, scale=2)
    assert find_induction_heads(model, threshold=0.0, top=2).scores.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_figures_and_views_draw(models, runs, dtype):
    model, run = models[dtype], runs[dtype]
    trace = mechvis.teacher_force(model, "The capital of France is", " Paris. Paris.")
    signals = token_signals(trace.run.logits, trace.run.tokens)
    tokens = trace.run.str_tokens
    cache = trace.run.cache
    drawn = [
        figures.token_entropy_curve(signals, tokens),
        figures.activation_norms_figure(activation_norms(cache, model), tokens),
        figures.high_entropy_logits_figure(high_entropy_positions(model, trace.run.logits, n=3), tokens),
        figures.logit_lens_figure(logit_lens(cache, model, positions=[-1, -2]), tokens),
        figures.head_entropy_figure(head_entropy(cache, model)),
        figures.rollout_figure(rollout(cache, model), tokens),
        figures.layer_heads_grid_figure(cache["blocks.0.attn.hook_pattern"][0], tokens, 0),
        figures.dla_figure(direct_logit_attribution(cache, model, " Paris"), model.cfg.n_layers, model.cfg.n_heads),
        figures.layer_similarity_figure(layer_similarity(cache, model)),
        figures.projection_figure(hidden_state_projection(cache, model, tokens, layer=0)),
        figures.ablation_figure(torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=dtype), "ΔP"),
        figures.image_mass_figure(torch.linspace(0, 1, model.cfg.n_layers, dtype=dtype)),
        figures.repetition_figure({"confidence": signals.top1_prob.to(dtype)}, torch.zeros(len(tokens), dtype=torch.long), tokens),
    ]
    assert all(figure.axes for figure in drawn)
    for view in (views.attention_heads_view(run, 0), views.topk_tokens_view(model, run),
                 *(views.colored_tokens_view(trace, signals, mode) for mode in ("entropy", "probability", "logit_gap", "not_argmax"))):
        json.dumps(view.props)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_full_report_on_a_half_precision_model(tokenizer, tmp_path, dtype):
    """The report's write path (as tests/test_report.py runs it), with the ablation sweep."""
    model = mechvis.load_model(tiny_hf_model("llama"), tokenizer=tokenizer, device="cpu", dtype=dtype)
    data = write_report(model, "Count to ten: one, two,", tmp_path / "report.html", json_path=tmp_path / "report.json",
                        max_new_tokens=6, ablation=True)
    exported = json.loads((tmp_path / "report.json").read_text())
    assert exported["direct_logit_attribution"] is not None and exported["ablation"] is not None
    assert np.isfinite(np.array(exported["token_signals"]["entropy"], dtype=float)).all()
    assert '<section id="attention">' in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert data.trace.run.cache["blocks.0.hook_resid_post"].dtype == dtype  # the model really ran in half


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_report_and_inspect_take_a_dtype(tokenizer, tmp_path, capsys, dtype):
    from mechvis.cli import main

    directory = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert main(["inspect", "--model", str(directory), "--dtype", dtype]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("dtype ")] == [dtype]
    output = tmp_path / "report.html"
    assert main(["report", "--model", str(directory), "--dtype", dtype, "--prompt", "One, two,", "--max-new-tokens", "4",
                 "-o", str(output), "--json", str(tmp_path / "report.json")]) == 0
    assert output.exists() and "Wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["model"]["dtype"] == dtype  # the report records its dtype


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_vision_report_on_a_half_precision_llava(tokenizer_dir, tmp_path, dtype):
    """Image metrics, vision rollout and visual information of a bfloat16/float16 LLaVA equal the
    float32 ones within tolerance, and the report with an image is written."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from mechvis.analysis.vision import image_attention, vision_rollout
    from mechvis.studies.vision import visual_information
    from tests.test_vlm import _picture
    from tests.tiny import tiny_llava_config

    def build(as_dtype):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        config = tiny_llava_config(vocab_size=len(tokenizer), image_token=tokenizer.convert_tokens_to_ids("<image>"))
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
        model.config._attn_implementation = "eager"
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
            num_additional_image_tokens=1,
        )
        return mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu", dtype=as_dtype)

    model, reference = build(dtype), build(torch.float32)
    picture, prompt = _picture(), "What is in the picture? Describe it."
    run, full = mechvis.run(model, prompt, image=picture), mechvis.run(reference, prompt, image=picture)
    tol = TOLERANCE[dtype]
    grid, queries = run.segments.image_grid, [len(run.tokens) - 1]
    half_attention = image_attention(run.cache, grid=grid, query_positions=queries)
    full_attention = image_attention(full.cache, grid=full.segments.image_grid, query_positions=queries)
    _close(half_attention.image_mass, full_attention.image_mass, tol)
    _close(half_attention.metrics.normalised_entropy, full_attention.metrics.normalised_entropy, tol)
    _close(vision_rollout(run.cache, grid=grid, query_positions=queries).maps,
           vision_rollout(full.cache, grid=full.segments.image_grid, query_positions=queries).maps, tol)
    half_info = visual_information(model, prompt, picture, " A picture")
    full_info = visual_information(reference, prompt, picture, " A picture")
    _close(half_info.pointwise, full_info.pointwise, tol, scale=10)
    write_report(model, prompt, tmp_path / "report.html", json_path=tmp_path / "report.json", max_new_tokens=4, image=picture)
    assert json.loads((tmp_path / "report.json").read_text())["vision"] is not None
