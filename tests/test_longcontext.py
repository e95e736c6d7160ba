"""Long-context analysis (`analyse_long`): the same results as the cache-based analyses, blocked
attention against HF's own eager attention, bad input refused before the forward, and (integration)
4,096 tokens of the embedded model in bounded memory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.stats
import torch
import transformers

import mechvis
from mechvis.analysis import activation_norms, activation_statistics, direct_logit_attribution, head_entropy, layer_similarity, logit_lens, rollout, rollout_rows, token_signals
from mechvis.studies.longcontext import analyse_long
from mechvis.generation.monitor import InductionHeads
from mechvis.analysis.repetition import repetition_features
from mechvis.errors import InvalidArgumentError, UnsupportedArchitectureError
from tests.reference import hf_forward
from tests.tiny import N_CTX, VOCAB, tiny_hf_model

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
_DECODER = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX)
# name → HF model: plain Llama (GQA 4/2), Qwen2 (GQA, q/k/v biases), Gemma-2 (soft-capped scores and
# logits, sliding/global alternation), Mistral (a sliding window of 5 on every layer), Qwen3 (q/k norms).
ARCHITECTURES = {
    "llama": lambda: tiny_hf_model("llama"),
    "qwen2": lambda: tiny_hf_model("qwen2"),
    "gemma2": lambda: tiny_hf_model("gemma2", attn_logit_softcapping=5.0),
    "mistral": lambda: _hf("MistralForCausalLM", sliding_window=5),
    "qwen3": lambda: _hf("Qwen3ForCausalLM", head_dim=16),
}
N = 96
QUERIES = [-1, 40, 7]
INDUCTION = InductionHeads(torch.zeros(3, 4), [(1, 2), (2, 0)])


def _hf(name: str, **overrides):
    model_class = getattr(transformers, name)
    config = model_class.config_class(**_DECODER, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_class(config).eval()


def _tokens(n: int = N, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(100, 40_000, (n,), generator=torch.Generator().manual_seed(seed))
    tokens[0] = 1
    if n >= 80:
        tokens[60:80] = tokens[30:50]  # a repeated stretch, so induction-like rows are not all noise
    return tokens


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def analysed(request, tokenizer):
    """(name, bridge, HF eager reference copy, tokens, cache-based logits and cache, long analysis)."""
    hf_model = ARCHITECTURES[request.param]()
    reference = copy.deepcopy(hf_model)
    bridge = mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens[None])
    long = analyse_long(bridge, tokens, queries=QUERIES, lens_positions=list(range(N - 12, N)), attribution=(500, 600),
                        attribution_position=70, prompt_length=80, induction=INDUCTION, block_size=16, progress=False)
    return request.param, bridge, reference, tokens, logits[0], cache, long


def _close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, msg=lambda m: f"{name}: {m}", **TOLERANCE)


def test_equals_the_cache_based_analyses(analysed):
    name, bridge, _, tokens, logits, cache, long = analysed
    signals = token_signals(logits, tokens)
    for field in ("entropy", "varentropy", "top1_prob", "margin", "surprisal", "top_probs"):
        _close(getattr(long.signals, field), getattr(signals, field), f"{name} signals.{field}")
    assert torch.equal(long.signals.top_ids, signals.top_ids)

    entropy = head_entropy(cache, bridge)
    for field in ("entropy", "normalised", "sink_mass"):
        _close(getattr(long.entropy, field), getattr(entropy, field), f"{name} head_entropy.{field}")
    assert long.entropy.layers == entropy.layers and long.entropy.sink_positions == entropy.sink_positions

    lens = logit_lens(cache, bridge, positions=list(range(N - 12, N)))
    for field in ("top_probs", "target_probs", "entropy", "kl_from_final", "max_probs"):
        _close(getattr(long.lens, field), getattr(lens, field), f"{name} lens.{field}")
    assert long.lens.positions == lens.positions and long.lens.top_tokens == lens.top_tokens
    assert torch.equal(long.lens.target_ranks, lens.target_ranks)

    rows = rollout_rows(cache, bridge, QUERIES)
    _close(long.rollout.rows, rows.rows, f"{name} rollout rows")
    assert long.rollout.queries == rows.queries == [N - 1, 40, 7]
    _close(long.rollout.rows, rollout(cache, bridge).matrix[rows.queries], f"{name} rollout matrix rows")

    for kind in ("resid_post", "attn_out", "mlp_out"):
        norms = activation_norms(cache, bridge, kind)
        _close(long.norms[kind].norms, norms.norms, f"{name} norms {kind}")
        _close(long.norms[kind].change_rate, norms.change_rate, f"{name} change rate {kind}")
    for kind in ("mlp_post", "attn_out"):
        statistics = activation_statistics(cache, bridge, kind)
        for field in ("mean", "std", "percentiles", "kurtosis"):
            _close(getattr(long.statistics[kind], field), getattr(statistics, field), f"{name} statistics {kind}.{field}")

    similarity = layer_similarity(cache, bridge)
    _close(long.similarity.cosine, similarity.cosine, f"{name} layer similarity")
    assert long.similarity.positions == similarity.positions

    attribution = direct_logit_attribution(cache, bridge, 500, 600, position=70)
    _close(long.attribution.contributions, attribution.contributions, f"{name} DLA")
    assert long.attribution.labels == attribution.labels and long.attribution.position == 70
    assert abs(long.attribution.model_value - attribution.model_value) < 1e-4

    class _Trace:  # what repetition_features reads of a trace
        run = type("R", (), {"logits": logits, "cache": cache, "tokens": tokens,
                             "segments": type("S", (), {"sink_positions": (0,)})()})()
        generated_positions = range(80, N)
        prompt_length = 80

    features = repetition_features(bridge, _Trace(), INDUCTION)
    _close(long.repetition.values, features.values, f"{name} repetition features")
    assert long.repetition.positions == features.positions


def test_blocked_attention_equals_hf_eager_attention(analysed):
    """Independent of transformer-lens: every row's entropy from HF eager attention (scipy), and
    the surprisal of every next token from HF eager logits, within 1e-4."""
    name, _, reference, tokens, _, _, long = analysed
    output = hf_forward(reference, tokens.tolist())
    attentions = torch.stack(output.attentions)[:, 0].double().numpy()  # (layer, head, query, key)
    expected = scipy.stats.entropy(attentions, axis=-1)
    np.testing.assert_allclose(long.entropy.entropy.numpy(), expected, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(long.entropy.sink_mass.numpy(), attentions[..., 0], atol=1e-4, err_msg=name)
    log_probs = output.logits[0].double().log_softmax(-1)
    surprisal = -log_probs[:-1].gather(-1, tokens[1:, None])[:, 0]
    np.testing.assert_allclose(long.signals.surprisal[:-1].numpy(), surprisal.numpy(), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("block_size", [1, 7, N])
def test_block_size_changes_nothing(tiny, block_size):
    bridge, _ = tiny("gemma2", attn_logit_softcapping=5.0)
    tokens = _tokens(40)
    base = analyse_long(bridge, tokens, queries=[-1, 3], block_size=16, progress=False)
    other = analyse_long(bridge, tokens, queries=[-1, 3], block_size=block_size, progress=False)
    _close(other.entropy.entropy, base.entropy.entropy, "entropy")
    _close(other.rollout.rows, base.rollout.rows, "rollout")
    _close(other.signals.entropy, base.signals.entropy, "signals")


def test_the_bridge_is_left_as_it_was(tiny):
    """After the analysis the bridge's attention is its own again: a cached run still has patterns."""
    bridge, _ = tiny("llama")
    tokens = _tokens(24)
    with torch.no_grad():
        before, _ = bridge.run_with_cache(tokens[None])
    analyse_long(bridge, tokens, progress=False)
    with torch.no_grad():
        after, cache = bridge.run_with_cache(tokens[None])
    torch.testing.assert_close(after, before)
    assert cache["blocks.0.attn.hook_pattern"].shape[-1] == 24
    assert "forward" not in bridge.blocks[0].attn.__dict__
    assert "forward" not in bridge.blocks[0].attn.original_component.__dict__


@pytest.fixture
def forbidden_forward(monkeypatch):
    """Any forward pass fails the test: bad input must be refused before the heavy work."""

    def fail(*args, **kwargs):
        raise AssertionError("the forward ran")

    return lambda bridge: monkeypatch.setattr(bridge, "run_with_hooks", fail)


@pytest.mark.parametrize("arguments, message", [
    (dict(queries=[N]), "position"),
    (dict(queries=[-N - 1]), "position"),
    (dict(lens_positions=[N + 3]), "position"),
    (dict(attribution=(500, None), attribution_position=N), "position"),
    (dict(prompt_length=N), "prompt_length"),
    (dict(block_size=0), "block_size"),
    (dict(attribution=" five"), "attribution must be a pair"),  # a string is not unpacked character by character
    (dict(attribution=(500,)), "attribution must be a pair"),
    (dict(head_fusion="median"), "head_fusion"),
])
def test_bad_arguments_are_refused_before_the_forward(tiny_llama, forbidden_forward, arguments, message):
    forbidden_forward(tiny_llama)
    with pytest.raises(InvalidArgumentError, match=message):
        analyse_long(tiny_llama, _tokens(), progress=False, **arguments)


def test_a_context_longer_than_the_model_s_is_refused(tiny_llama, forbidden_forward):
    forbidden_forward(tiny_llama)
    with pytest.raises(InvalidArgumentError, match=f"context holds {N_CTX}"):
        analyse_long(tiny_llama, _tokens(N_CTX + 1), progress=False)
    with pytest.raises(InvalidArgumentError, match=f"context holds {N_CTX}"):
        analyse_long(tiny_llama, "word " * (N_CTX + 10), progress=False)


def test_unsupported_attention_is_refused(tiny):
    bridge, _ = tiny("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="Long-context analysis does not support"):
        analyse_long(bridge, _tokens(20), progress=False)


# --- the embedded model --------------------------------------------------------------------------

def long_text_tokens(model, n: int) -> torch.Tensor:
    from mechvis.studies.longcontext import real_text_tokens

    return real_text_tokens(model, n)


@pytest.mark.integration
def test_embedded_model_equals_the_cache_based_analyses(embedded):
    tokens = long_text_tokens(embedded, 384)
    with torch.no_grad():
        logits, cache = embedded.run_with_cache(tokens[None])
    long = analyse_long(embedded, tokens, queries=[-1, 100], attribution=(int(tokens[-1]), None), attribution_position=-2,
                        progress=False)
    signals = token_signals(logits[0], tokens)
    _close(long.signals.entropy, signals.entropy, "signals entropy")
    _close(long.signals.surprisal, signals.surprisal, "signals surprisal")
    entropy = head_entropy(cache, embedded)
    _close(long.entropy.entropy, entropy.entropy, "head entropy")
    _close(long.entropy.sink_mass, entropy.sink_mass, "sink mass")
    _close(long.rollout.rows, rollout_rows(cache, embedded, [-1, 100]).rows, "rollout rows")
    lens = logit_lens(cache, embedded, positions=list(range(384 - 16, 384)))
    _close(long.lens.kl_from_final, lens.kl_from_final, "lens KL")
    _close(long.norms["resid_post"].norms, activation_norms(cache, embedded).norms, "norms")
    _close(long.similarity.cosine, layer_similarity(cache, embedded).cosine, "similarity")
    statistics = activation_statistics(cache, embedded)
    _close(long.statistics["mlp_post"].percentiles, statistics.percentiles, "mlp_post percentiles")
    attribution = direct_logit_attribution(cache, embedded, int(tokens[-1]), position=-2)
    _close(long.attribution.contributions, attribution.contributions, "DLA")


@pytest.mark.integration
def test_4096_tokens_of_the_embedded_model_in_bounded_memory():
    """In a fresh process (the benchmark's): the whole report's metrics at 4,096 tokens in ≤ 2.5 GB
    for the whole process, loading included (the issue's target)."""
    from benchmarks.longcontext import measure

    measured = measure(4096)
    added = measured["analysis_peak"] - measured["loaded"]
    print(f"whole-process peak {measured['process_peak'] / 1e9:.3f} GB: loading's peak {measured['load_peak'] / 1e9:.3f} GB, "
          f"resident after loading {measured['loaded'] / 1e9:.3f} GB + the analysis's {added / 1e9:.3f} GB "
          f"= {measured['analysis_peak'] / 1e9:.3f} GB; {measured['seconds']:.0f} s")
    # Measured 2026-11-29 in 3 consecutive fresh runs: loading 2.21 GB (2.86 before copy-free folding
    # and copying weights out of their file), resident after loading 1.66 GB, the analysis 0.59–0.60
    # GB (0.46–1.74 GB between identical runs before large allocations were mapped: glibc's heap
    # fragmented under the per-block scratch), process peak 2.26 GB.
    assert added <= 0.8e9, f"the analysis added {added / 1e9:.2f} GB over the loaded model"
    assert measured["load_peak"] <= 2.5e9 and measured["process_peak"] <= 2.5e9


def test_an_error_mid_forward_leaves_the_bridge_as_it_was(tiny, monkeypatch):
    from mechvis.studies import longcontext

    bridge, _ = tiny("llama")
    tokens = _tokens(24)
    with torch.no_grad():
        before = bridge(tokens[None])

    def fail(self, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(longcontext._Recorder, "_blocked_attention", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        analyse_long(bridge, tokens, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens[None]), before)


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_the_cache_estimate_is_the_cache_s_size(tiny, architecture):
    from mechvis.studies.longcontext import estimated_cache_bytes, needs_long_context

    bridge, _ = tiny(architecture)
    n = 70
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(_tokens(n)[None])
    actual = logits.numel() * logits.element_size() + sum(t.numel() * t.element_size() for t in cache.values())
    assert estimated_cache_bytes(bridge, n) == pytest.approx(actual, rel=0.01)
    assert needs_long_context(bridge, n, available_bytes=actual) and not needs_long_context(bridge, n, available_bytes=3 * actual)


def test_report_takes_the_long_context_path_when_the_cache_would_not_fit(tiny, monkeypatch, capsys):
    """`build_report_data` switches to `analyse_long` by itself, says so, and its results equal the
    cache-based report's."""
    from mechvis.studies import longcontext
    from mechvis.report.build import build_report_data

    model, _ = tiny("llama")
    prompt = "The tide came in over the sand, and the moon rose over the sea while the tide"
    cached = build_report_data(model, prompt, max_new_tokens=6)
    assert cached.notes == []
    monkeypatch.setattr(longcontext, "needs_long_context", lambda model, n, **kwargs: True)
    long = build_report_data(model, prompt, max_new_tokens=6)
    printed = capsys.readouterr()
    assert long.notes and "Long context" in long.notes[0] and "Long context" in printed.out + printed.err
    assert long.trace.generated_ids == cached.trace.generated_ids
    _close(long.signals.entropy, cached.signals.entropy, "signals")
    _close(long.entropy.entropy, cached.entropy.entropy, "head entropy")
    _close(long.lens.kl_from_final, cached.lens.kl_from_final, "lens")
    _close(long.norms.norms, cached.norms.norms, "norms")
    _close(long.similarity.cosine, cached.similarity.cosine, "similarity")
    _close(long.attribution.contributions, cached.attribution.contributions, "DLA")
    assert long.high_entropy.positions == cached.high_entropy.positions
    _close(long.high_entropy.top_logits, cached.high_entropy.top_logits, "high-entropy logits")
    _close(long.projection.coordinates, cached.projection.coordinates, "projection")
    _close(long.repetition.features.values, cached.repetition.features.values, "repetition features")
    _close(long.repetition.monitor_probability, cached.repetition.monitor_probability, "monitor")
    # The seed's loop score too (its attention term from head-mean row entropies reduced per block).
    assert not torch.isnan(long.repetition.seed_score).any()
    _close(long.repetition.seed_score, cached.repetition.seed_score, "seed score")
    assert long.rollout.queries == cached.rollout.queries  # the same rows: last prompt token and generated tokens
    _close(long.rollout.rows, cached.rollout.rows, "rollout rows")
    # No teacher-forced pass and no (pos, vocab) logits on this path; the top-k view comes from the
    # signals and next-token ranks, equal to the view built from the cache path's logits (k = 5).
    assert long.trace.run.logits.shape[-1] == 0 and len(long.trace.run.cache) == 0
    from mechvis.viz.views import topk_tokens_view, topk_tokens_view_from_signals

    from_logits = topk_tokens_view(model, cached.trace.run, k=5).props
    from_signals = topk_tokens_view_from_signals(model, long.trace.run, long.signals, long.next_ranks).props
    # ranks deep in a random model's flat distribution may move by a near-tie or two with rounding
    # (logits compared here, log-probabilities there): equal at the top, within a few elsewhere
    ranks = np.array(from_signals["correctTokenRank"]), np.array(from_logits["correctTokenRank"])
    assert (np.abs(ranks[0] - ranks[1]) <= np.maximum(2, 1e-4 * ranks[1])).all(), ranks
    assert (ranks[0][ranks[1] < 10] == ranks[1][ranks[1] < 10]).all()
    assert from_signals["topKTokens"] == from_logits["topKTokens"]
    for key in ("topKLogProbs", "correctTokenLogProb"):
        np.testing.assert_allclose(np.array(from_signals[key], dtype=float), np.array(from_logits[key], dtype=float), atol=2e-3)
    # It renders (no attention pattern is held, so those views are left out) and says how it was computed.
    from mechvis.report import render_report, report_json

    page = render_report(long, model)
    assert "Long context" in page and 'class="note"' in page
    exported = report_json(long)
    assert exported["rollout"]["queries"] == long.rollout.queries and exported["notes"] == long.notes
    with pytest.raises(InvalidArgumentError, match="full_rollout"):
        build_report_data(model, prompt, max_new_tokens=6, full_rollout=True)


from tests.test_vlm import _picture, tiny_llava  # noqa: E402,F401  (the tiny LLaVA fixture)


def _long_image_analysis(bridge, trace, image, prompt, **kwargs):
    from mechvis.analysis.vision import vision_rollout_hooks
    from mechvis.images import with_text_appended
    from mechvis.images import encode_with_image

    run = trace.run
    _, extra = encode_with_image(bridge, prompt, image)
    extra = with_text_appended(extra, len(trace.generated_ids))
    generated = list(trace.generated_positions)
    image_queries = sorted(set(generated) | {position - 1 for position in generated})
    return analyse_long(bridge, run.tokens, forward_inputs=extra, image_queries=image_queries,
                        image_positions=list(run.segments.image_grid.positions), queries=generated,
                        capture=vision_rollout_hooks(bridge), keep_residuals=range(bridge.cfg.n_layers), progress=False, **kwargs)


@pytest.mark.parametrize("block_size", [None, 7])
def test_image_metrics_from_the_long_path_equal_the_cache_based_ones(tiny_llava, block_size):
    """A tiny LLaVA with an image, 5 generated tokens: the image attention of the generated tokens,
    their image dynamics, the vision rollout and the cross-modal alignment from analyse_long (image
    rows kept per query block; blocks of 7 queries split the image span) equal the cache-based
    functions on the trace's full cache (≤ 1e-5), as do the text metrics."""
    from mechvis.analysis.crossmodal import cross_modal
    from mechvis.analysis.dynamics import image_dynamics
    from mechvis.analysis.vision import image_attention, vision_rollout

    bridge, _, _ = tiny_llava
    prompt = "Describe the picture in detail, please."
    picture = _picture(2)
    trace = mechvis.generate(bridge, prompt, image=picture, max_new_tokens=5)
    run, grid = trace.run, trace.run.segments.image_grid
    result = _long_image_analysis(bridge, trace, picture, prompt, block_size=block_size)
    generated = list(trace.generated_positions)
    long, cached = image_attention(result, grid=grid, query_positions=generated), image_attention(run.cache, grid=grid, query_positions=generated)
    assert long.query_positions == cached.query_positions and long.layers == cached.layers
    _close(long.image_mass, cached.image_mass, "image mass")
    _close(long.maps, cached.maps, "image maps")
    for name in ("entropy", "normalised_entropy", "gini", "k90", "peak_to_mean", "centre", "spatial_variance"):
        _close(getattr(long.metrics, name), getattr(cached.metrics, name), name)
    assert float(cached.image_mass.max()) > 0.01  # the rows do hold image mass
    long_dynamics, cached_dynamics = image_dynamics(result, trace=trace), image_dynamics(trace)
    assert long_dynamics.query_positions == cached_dynamics.query_positions
    for name in ("image_mass", "normalised_entropy", "peak_to_mean", "centre", "maps"):
        _close(getattr(long_dynamics, name), getattr(cached_dynamics, name), name)
    for region, mass in cached_dynamics.region_mass.items():
        _close(long_dynamics.region_mass[region], mass, region)
    long_rollout, cached_rollout = (vision_rollout(result, grid=grid, query_positions=generated),
                                    vision_rollout(run.cache, grid=grid, query_positions=generated))
    assert long_rollout.patch_shape == cached_rollout.patch_shape and long_rollout.vision_layers == cached_rollout.vision_layers
    _close(long_rollout.maps, cached_rollout.maps, "vision rollout maps")
    _close(long_rollout.image_mass, cached_rollout.image_mass, "rollout image mass")
    long_crossing, cached_crossing = cross_modal(result, grid=grid), cross_modal(run.cache, grid=grid)
    _close(long_crossing.alignment, cached_crossing.alignment, "alignment")
    _close(long_crossing.modality_gap, cached_crossing.modality_gap, "modality gap")
    _close(result.entropy.entropy, head_entropy(run.cache, bridge).entropy, "head entropy")
    with pytest.raises(InvalidArgumentError, match="image_queries"):
        image_attention(result, grid=grid, query_positions=[3])


def test_report_with_an_image_takes_the_long_path_with_its_image_metrics(tiny_llava, monkeypatch):
    """`build_report_data` with an image whose full cache would not fit: the long-context path,
    and every image metric of the report equals the cached path's (≤ 1e-5)."""
    from mechvis.studies import longcontext
    from mechvis.report import render_report, report_json
    from mechvis.report.build import build_report_data

    bridge = tiny_llava[0]
    prompt, picture = "Describe <b>this</b> picture.", _picture(1)
    cached = build_report_data(bridge, prompt, max_new_tokens=5, image=picture)
    assert cached.notes == [] and cached.vision is not None
    monkeypatch.setattr(longcontext, "needs_long_context", lambda model, n, **kwargs: True)
    long = build_report_data(bridge, prompt, max_new_tokens=5, image=picture)
    assert long.notes and "Long context" in long.notes[0]
    assert long.trace.generated_ids == cached.trace.generated_ids
    a, b = long.vision, cached.vision
    assert a.attention.query_positions == b.attention.query_positions
    _close(a.attention.image_mass, b.attention.image_mass, "image mass")
    _close(a.attention.maps, b.attention.maps, "image maps")
    _close(a.mean_map, b.mean_map, "mean map")
    assert [h.cells for h in a.hotspots] == [h.cells for h in b.hotspots]
    assert a.clusters.labels == b.clusters.labels
    _close(a.rollout.maps, b.rollout.maps, "vision rollout")
    _close(a.dynamics.image_mass, b.dynamics.image_mass, "dynamics image mass")
    _close(a.dynamics.maps, b.dynamics.maps, "dynamics maps")
    assert a.information.mutual_information == pytest.approx(b.information.mutual_information, abs=1e-5)
    _close(a.information.joint, b.information.joint, "region-token joint")
    _close(a.cross_modal.alignment, b.cross_modal.alignment, "cross-modal alignment")
    _close(a.cross_modal.modality_gap, b.cross_modal.modality_gap, "modality gap")
    _close(a.clusters.distance, b.clusters.distance, "head distances")
    assert long.rollout.queries == cached.rollout.queries
    _close(long.rollout.rows, cached.rollout.rows, "rollout rows")
    _close(long.entropy.entropy, cached.entropy.entropy, "head entropy")
    _close(long.signals.entropy, cached.signals.entropy, "signals")
    page = render_report(long, bridge)
    assert "Long context" in page and "&lt;b&gt;this" in page
    assert report_json(long)["vision"]["grid"] == report_json(cached)["vision"]["grid"]


def test_qwen_vl_is_refused_by_the_long_path_and_its_report_keeps_the_cache(tokenizer_dir, monkeypatch, caplog):
    """Qwen2-VL's language attention runs through mechvis's mRoPE shim (a plain attention bridge,
    no rotary hooks): analyse_long refuses it before any work, and a report whose cache would not
    fit keeps the cache path and logs why."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from mechvis.studies import longcontext
    from mechvis.report.build import build_report_data
    from tests.test_vlm import _qwen_vl

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|unused|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    model, ids, inputs = _qwen_vl("qwen2_vl")
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=56 * 84)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="not a rotary attention bridge"):
        analyse_long(bridge, ids[0], forward_inputs=inputs, progress=False)
    monkeypatch.setattr(longcontext, "needs_long_context", lambda model, n, **kwargs: True)
    picture = _picture(3).resize((84, 56))
    with caplog.at_level("WARNING", logger="mechvis.report"):
        data = build_report_data(bridge, "Describe it.", max_new_tokens=3, image=picture)
    assert data.notes == [] and data.vision is not None and data.vision.rollout is not None
    assert "uses the full cache" in caplog.text and "not a rotary attention bridge" in caplog.text


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_seed_score_on_the_long_path_equals_the_cache_based_one(tokenizer, architecture):
    """Every term of `seed_score` from analyse_long (blocks of 5 queries; Mistral's sliding window
    makes n_t the window) equals the cache-based function on a teacher-forced trace."""
    from mechvis.analysis.repetition import seed_score
    from mechvis.generation import teacher_force

    bridge = mechvis.load_model(ARCHITECTURES[architecture](), tokenizer=tokenizer, device="cpu")
    trace = teacher_force(bridge, "The tide came in over the sand, and the moon rose over the sea",
                          " while the tide went out and the tide came in over the sand again and again.")
    expected = seed_score(bridge, trace)
    result = analyse_long(bridge, trace.run.tokens, prompt_length=trace.prompt_length, block_size=5, queries=None, progress=False)
    assert result.seed.positions == expected.positions
    for name in ("entropy_term", "activation_rise", "uniformity", "attention_focus", "score"):
        _close(getattr(result.seed, name), getattr(expected, name), name)
