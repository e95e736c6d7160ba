"""One name per metric (issue 24, item 2): `image_attention`, `image_dynamics`, `keyword_dynamics`
and `vision_rollout` read their rows through `mechvis.analysis.rows`, so the same call gives the
same result (≤ 1e-5) whichever executor produced the rows — the full cache, one forward whose hooks
keep only the declared rows, hooks while decoding, the blocked long-context forward — and the old
names (`stream_*`, `long_*`, the `(cache, model, ...)` forms) still work, warn, and name the new call."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.analysis.dynamics import image_dynamics, keyword_dynamics
from mechvis.analysis.rows import CacheRows, Reads, RecordedRows, row_source
from mechvis.analysis.vision import image_attention, vision_rollout
from mechvis.errors import InvalidArgumentError, MechvisDeprecationWarning
from mechvis.studies.executors import record_attention_rows, record_while_decoding
from tests.test_longcontext import _long_image_analysis
from tests.test_vlm import _picture, tiny_llava  # noqa: F401  (module fixture)

PROMPT = "Describe the picture in detail, please."
DYNAMICS = ("image_mass", "normalised_entropy", "peak_to_mean", "centre", "maps")


def _close(a, b, what):
    torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")


def _same_attention(a, b):
    assert a.layers == b.layers and a.query_positions == b.query_positions and a.grid == b.grid
    _close(a.image_mass, b.image_mass, "image mass")
    _close(a.maps, b.maps, "maps")
    for name in ("entropy", "normalised_entropy", "gini", "k90", "peak_to_mean", "centre", "spatial_variance"):
        _close(getattr(a.metrics, name), getattr(b.metrics, name), name)


def _same_dynamics(a, b):
    assert a.layers == b.layers and a.query_positions == b.query_positions and a.tokens == b.tokens
    for name in DYNAMICS:
        _close(getattr(a, name), getattr(b, name), name)
    assert a.region_mass.keys() == b.region_mass.keys()
    for region in a.region_mass:
        _close(a.region_mass[region], b.region_mass[region], region)


@pytest.fixture(scope="module")
def generation(tiny_llava):  # noqa: F811
    """A tiny LLaVA generation with an image, its full cache, and analyse_long over it."""
    bridge = tiny_llava[0]
    picture = _picture(2)
    trace = mechvis.generate(bridge, PROMPT, image=picture, max_new_tokens=5)
    return bridge, picture, trace, _long_image_analysis(bridge, trace, picture, PROMPT, block_size=7)


def test_image_attention_is_one_function_for_every_executor(generation):
    """Full cache (a Run, a Trace, the cache itself), one forward keeping only the declared rows,
    and the blocked long-context forward: the same ImageAttention."""
    bridge, picture, trace, long = generation
    run = trace.run
    generated = list(trace.generated_positions)
    cached = image_attention(run, query_positions=generated, sink_cells=[0])
    assert float(cached.image_mass.max()) > 0.01
    for source in (trace, run.cache):
        _same_attention(image_attention(source, grid=run.segments.image_grid, query_positions=generated, sink_cells=[0]), cached)
    _same_attention(image_attention(long, grid=run.segments.image_grid, query_positions=generated, sink_cells=[0]), cached)
    forward = mechvis.run(bridge, PROMPT, image=picture)
    recorded = record_attention_rows(bridge, PROMPT, image=picture, query_positions=[-2, -1], layers=[1])
    assert isinstance(recorded, RecordedRows) and recorded.rows.shape == (1, bridge.cfg.n_heads, 2, len(recorded.keys))
    _same_attention(image_attention(recorded, query_positions=[-2, -1], layers=[1]),
                    image_attention(forward, query_positions=[-2, -1], layers=[1]))


def test_image_dynamics_is_one_function_for_every_executor(generation):
    """Teacher-forced cache, hooks while decoding, and the blocked long-context forward."""
    bridge, picture, trace, long = generation
    cached = image_dynamics(trace, sink_cells=[0])
    _same_dynamics(image_dynamics(long, trace=trace, sink_cells=[0]), cached)
    recorded = record_while_decoding(bridge, PROMPT, image=picture, max_new_tokens=5, names_filter=None)
    assert len(recorded.trace.run.cache.keys()) > 0 and recorded.queries == [p - 1 for p in recorded.trace.generated_positions]
    _same_dynamics(image_dynamics(recorded, sink_cells=[0]), image_dynamics(recorded.trace, sink_cells=[0]))
    layer_one = image_dynamics(recorded, layers=[1], regions={"corner": (0, 0, 0.5, 0.5)})
    _same_dynamics(layer_one, image_dynamics(recorded.trace, layers=[1], regions={"corner": (0, 0, 0.5, 0.5)}))


def test_vision_rollout_is_one_function_for_every_executor(generation):
    bridge, _, trace, long = generation
    generated = list(trace.generated_positions)
    cached = vision_rollout(trace.run, query_positions=generated)
    rolled = vision_rollout(long, grid=trace.run.segments.image_grid, query_positions=generated)
    assert rolled.patch_shape == cached.patch_shape and rolled.vision_layers == cached.vision_layers
    _close(rolled.maps, cached.maps, "rollout maps")
    _close(rolled.image_mass, cached.image_mass, "rollout image mass")
    with pytest.raises(InvalidArgumentError, match="head_fusion|fuse heads"):
        vision_rollout(long, grid=trace.run.segments.image_grid, query_positions=generated, head_fusion="max")


def test_keyword_dynamics_from_the_cache_and_while_decoding(tiny_llama):
    from mechvis.analysis.spans import find_token_spans

    recorded = record_while_decoding(tiny_llama, "Answer briefly and list three colours: red", max_new_tokens=4,
                                     names_filter=None, temperature=0)
    spans = {word: find_token_spans(recorded.trace.run, word) for word in ("briefly", "colours")}
    streamed, cached = keyword_dynamics(recorded, keyword_spans=spans), keyword_dynamics(recorded.trace, keyword_spans=spans)
    assert streamed.keywords == cached.keywords and streamed.key_positions == cached.key_positions
    for word in spans:
        _close(streamed.mass[word], cached.mass[word], word)


def test_rows_an_executor_did_not_record_are_refused(generation):
    bridge, picture, trace, long = generation
    recorded = record_attention_rows(bridge, PROMPT, image=picture, query_positions=[-1], layers=[0])
    with pytest.raises(InvalidArgumentError, match=r"layer 1 was not recorded .*record_attention_rows"):
        image_attention(recorded, query_positions=[-1], layers=[1])
    with pytest.raises(InvalidArgumentError, match=r"query position \d+ was not recorded"):
        image_attention(recorded, query_positions=[0], layers=[0])
    with pytest.raises(InvalidArgumentError, match="no rollout rows"):
        vision_rollout(recorded, query_positions=[-1])
    with pytest.raises(InvalidArgumentError, match="image_queries"):
        image_attention(long, grid=trace.run.segments.image_grid, query_positions=[3])
    with pytest.raises(InvalidArgumentError, match="needs the generation"):
        image_dynamics(recorded)
    with pytest.raises(InvalidArgumentError, match="No image grid"):
        image_attention(trace.run.cache, query_positions=[-1])
    with pytest.raises(InvalidArgumentError, match="grid must be"):
        image_attention(trace.run, grid=(4, 4), query_positions=[-1])
    with pytest.raises(InvalidArgumentError, match=r"must be an ActivationCache \(run\.cache\)"):
        image_attention("cache", grid=trace.run.segments.image_grid, query_positions=[-1])


def test_row_sources_slice_what_was_read(generation):
    bridge, _, trace, _ = generation
    source = row_source(trace)
    assert isinstance(source, CacheRows) and source.n_positions == len(trace.run.tokens)
    rows = source.attention_rows(Reads((1,), (5, 7), (2, 3)))
    pattern = trace.run.cache["blocks.1.attn.hook_pattern"][0]
    torch.testing.assert_close(rows[0], pattern[:, [5, 7]][..., [2, 3]])
    assert source.attention_rows(Reads((0,), (5,))).shape == (1, bridge.cfg.n_heads, 1, len(trace.run.tokens))


# --- deprecated forms: they warn, name the new call, and return what it returns ------------------------


def test_deprecated_stream_and_long_names(generation):
    from mechvis.studies.longcontext import long_image_attention, long_image_dynamics, long_vision_rollout
    from mechvis.studies.streamed import stream_image_attention, stream_image_dynamics

    bridge, picture, trace, long = generation
    grid, generated = trace.run.segments.image_grid, list(trace.generated_positions)
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_attention\(record_attention_rows"):
        streamed = stream_image_attention(bridge, PROMPT, picture, query_positions=[-2, -1], sink_cells=[0])
    _same_attention(streamed, image_attention(mechvis.run(bridge, PROMPT, image=picture), query_positions=[-2, -1], sink_cells=[0]))
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_dynamics\(record_while_decoding"):
        streamed_trace, dynamics = stream_image_dynamics(bridge, PROMPT, picture, max_new_tokens=4, names_filter=None)
    _same_dynamics(dynamics, image_dynamics(streamed_trace))
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_attention\(result, grid=grid"):
        _same_attention(long_image_attention(long, grid, query_positions=generated), image_attention(trace, query_positions=generated))
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_dynamics\(result, trace=trace"):
        _same_dynamics(long_image_dynamics(long, trace), image_dynamics(trace))
    with pytest.warns(MechvisDeprecationWarning, match=r"call vision_rollout\(result, grid=grid"):
        rolled = long_vision_rollout(long, bridge, grid, query_positions=generated)
    _close(rolled.maps, vision_rollout(trace, query_positions=generated).maps, "rollout maps")


def test_deprecated_model_forms(generation, tiny_llama):
    from mechvis.analysis.spans import find_token_spans

    bridge, _, trace, _ = generation
    run, grid, generated = trace.run, trace.run.segments.image_grid, list(trace.generated_positions)
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_attention\(run_or_cache, grid=grid"):
        _same_attention(image_attention(run.cache, bridge, grid, query_positions=generated), image_attention(run, query_positions=generated))
    with pytest.warns(MechvisDeprecationWarning, match=r"call vision_rollout\(run_or_cache, grid=grid"):
        rolled = vision_rollout(run.cache, bridge, grid, query_positions=generated)
    _close(rolled.maps, vision_rollout(run, query_positions=generated).maps, "rollout maps")
    with pytest.warns(MechvisDeprecationWarning, match=r"call image_dynamics\(trace, \.\.\.\)"):
        _same_dynamics(image_dynamics(bridge, trace, sink_cells=[0]), image_dynamics(trace, sink_cells=[0]))
    text = mechvis.teacher_force(tiny_llama, "Answer briefly and list three colours: red", " blue green")
    spans = {"briefly": find_token_spans(text.run, "briefly")}
    with pytest.warns(MechvisDeprecationWarning, match=r"call keyword_dynamics\(trace, keyword_spans="):
        old = keyword_dynamics(tiny_llama, text, spans)
    _close(old.mass["briefly"], keyword_dynamics(text, keyword_spans=spans).mass["briefly"], "keyword mass")
    with pytest.raises(TypeError):
        image_attention(run.cache, bridge, grid, grid, query_positions=generated)


def test_analyse_long_takes_grouped_reads_and_options(tiny_llama):
    """`analyse_long(model, tokens, reads=LongReads(...), options=LongOptions(...))` equals the old
    flat keywords, which still work and warn naming the grouped call; mixing both is refused."""
    from mechvis.studies.longcontext import LongOptions, LongReads, analyse_long

    tokens = torch.arange(3, 43) % tiny_llama.cfg.d_vocab
    grouped = analyse_long(tiny_llama, tokens, reads=LongReads(queries=[-1, 5], sink_positions=[0, 1]),
                           options=LongOptions(k=3, head_fusion="max"), block_size=9, progress=False)
    with pytest.warns(MechvisDeprecationWarning, match=r"reads=LongReads\(queries=\.\.\., sink_positions=\.\.\.\), options=LongOptions\(k=\.\.\., head_fusion=\.\.\.\)"):
        flat = analyse_long(tiny_llama, tokens, queries=[-1, 5], sink_positions=[0, 1], k=3, head_fusion="max", block_size=9,
                            progress=False)
    torch.testing.assert_close(grouped.rollout.rows, flat.rollout.rows, atol=0, rtol=0)
    torch.testing.assert_close(grouped.entropy.sink_mass, flat.entropy.sink_mass, atol=0, rtol=0)
    assert grouped.rollout.head_fusion == "max" and grouped.signals.top_ids.shape[-1] == 3
    with pytest.raises(TypeError, match="both flat and in reads="):
        analyse_long(tiny_llama, tokens, reads=LongReads(), queries=[-1], progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'query'"):
        analyse_long(tiny_llama, tokens, query=[-1], progress=False)
    with pytest.raises(InvalidArgumentError, match="options must be a LongOptions"):
        analyse_long(tiny_llama, tokens, options={"k": 3}, progress=False)
