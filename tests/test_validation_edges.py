"""Bad arguments at mechvis's public edges raise a specific `MechvisError` subclass whose message
says what was given and what is expected; good integer-likes (numpy integers, 0-d tensors) and
the conversions the edges document (numpy logits, token lists) still work and give the same
numbers as the plain types."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mechvis
from mechvis import Span
from mechvis.studies.longcontext import analyse_long
from mechvis.analysis import attention_to_spans, decompose_residual, direct_logit_attribution, embedding_projection, grid_regions, head_entropy, hidden_state_projection, high_entropy_positions, hooks_for, hull_area, keyword_dynamics, layer_similarity, logit_lens, map_geometry, mass_contour, pca, rollout, rollout_rows, token_signals, unembed_logits
from mechvis.analysis.spans import find_token_spans, semantic_token_spans
from mechvis.studies.attribution import gradient_x_input, occlusion
from mechvis.studies.instructions import instruction_attention_check
from mechvis._numerics import row_entropy
from mechvis.models.architecture import visible_keys
from mechvis.errors import DatasetError, InvalidArgumentError, MechvisError
from mechvis.generation import EntropyTemperature
from mechvis.interventions import ablation_sweep, target_probability
from mechvis.types import ImageGrid

PROMPT = "The cat sat on the mat and the cat"
GRID = ImageGrid(2, 2, (1, 2, 3, 4))


@pytest.fixture(scope="module")
def sample(tiny_llama):
    return mechvis.run(tiny_llama, PROMPT)


def _generate(**options):
    return lambda model, run: mechvis.generate(model, "Hello there", max_new_tokens=2, **options)


def _returns_none(input_ids, scores):
    return None


# name: (call(model, run), error class, phrase the message must hold)
CASES = {
    # generate / stream_generate
    "seed 2**70": (_generate(seed=2**70), InvalidArgumentError, r"seed must be an integer from −2\*\*63.*got 1180591620717411303424"),
    "seed 'a'": (_generate(seed="a"), InvalidArgumentError, r"seed must be an integer.*got 'a'"),
    "seed 1.5": (_generate(seed=1.5), InvalidArgumentError, r"seed must be an integer.*got 1\.5"),
    "logits_processors=5": (_generate(logits_processors=5), InvalidArgumentError, r"logits_processors must be a list.*got 5"),
    "one processor not in a list": (_generate(logits_processors=_returns_none), InvalidArgumentError, r"pass \[processor\]"),
    "processor not callable": (_generate(logits_processors=[3]), InvalidArgumentError, r"logits processor 0 is not callable"),
    "processor returns None": (
        _generate(logits_processors=[_returns_none]), InvalidArgumentError, r"logits processor 0 \(_returns_none\) returned None"
    ),
    "names_filter=5": (_generate(names_filter=5), InvalidArgumentError, r"names_filter must be None, a hook name.*got 5"),
    "unknown hook name": (
        _generate(names_filter=["blocks.0.hook_resid_postt"]), InvalidArgumentError,
        r"names no hook this model has: \['blocks\.0\.hook_resid_postt'\]; did you mean \['blocks\.0\.hook_resid_post'",
    ),
    "unknown hook name (run)": (
        lambda model, run: mechvis.run(model, PROMPT, names_filter="nope"), InvalidArgumentError, r"names no hook this model has: \['nope'\]"
    ),
    "temperature_schedule='x'": (_generate(temperature_schedule="x"), InvalidArgumentError, r"temperature_schedule must be.*got 'x'"),
    "top_p='0.5'": (_generate(temperature=1.0, top_p="0.5"), InvalidArgumentError, r"top_p must be a finite number in \(0\.0, 1\.0\]"),
    "min_p=2": (_generate(temperature=1.0, min_p=2), InvalidArgumentError, r"min_p must be a finite number in \[0\.0, 1\.0\]"),
    "chat='yes'": (_generate(chat="yes"), InvalidArgumentError, r"chat must be True or False; got 'yes'"),
    "analysis_pass='no'": (_generate(analysis_pass="no"), InvalidArgumentError, r"analysis_pass must be True or False; got 'no'"),
    "run chat=1": (lambda model, run: mechvis.run(model, PROMPT, chat=1), InvalidArgumentError, r"chat must be True or False"),
    "prompt None": (lambda model, run: mechvis.generate(model, None), InvalidArgumentError, r"A prompt is a string.*got None"),
    "prompt 123": (lambda model, run: mechvis.generate(model, 123), InvalidArgumentError, r"A prompt is a string.*got 123"),
    "chat prompt 123": (lambda model, run: mechvis.run(model, 123, chat=True), InvalidArgumentError, r"A prompt is a string"),
    # k and n
    "logit_lens k=0": (lambda model, run: logit_lens(run.cache, model, k=0), InvalidArgumentError, r"k must be an integer in \[1, 49152\].*got 0"),
    "logit_lens k=-1": (lambda model, run: logit_lens(run.cache, model, k=-1), InvalidArgumentError, r"k must be an integer.*got -1"),
    "logit_lens k>vocab": (lambda model, run: logit_lens(run.cache, model, k=49153), InvalidArgumentError, r"k must be an integer in \[1, 49152\]"),
    "logit_lens k=1.5": (lambda model, run: logit_lens(run.cache, model, k=1.5), InvalidArgumentError, r"k must be an integer.*got 1\.5"),
    "analyse_long k=0": (lambda model, run: analyse_long(model, PROMPT, k=0, progress=False), InvalidArgumentError, r"k must be an integer"),
    "token_signals k=1.5": (lambda model, run: token_signals(run.logits, k=1.5), InvalidArgumentError, r"k must be an integer"),
    "token_signals empty": (lambda model, run: token_signals(torch.empty(0, 10)), InvalidArgumentError, r"logits is empty"),
    "token_signals string tokens": (
        lambda model, run: token_signals(run.logits, ["a"] * len(run.tokens)), InvalidArgumentError, r"tokens must be a \(pos,\) tensor"
    ),
    "token_signals float tokens": (
        lambda model, run: token_signals(run.logits, run.tokens.float()), InvalidArgumentError, r"tokens must hold integer values"
    ),
    "token_signals list logits": (lambda model, run: token_signals([[0.0, 1.0]]), InvalidArgumentError, r"logits must be a \(pos, vocab\) tensor"),
    "high_entropy_positions n=0": (
        lambda model, run: high_entropy_positions(model, run.logits, n=0), InvalidArgumentError, r"n must be an integer ≥ 1.*got 0"
    ),
    "high_entropy_positions n=-1": (
        lambda model, run: high_entropy_positions(model, run.logits, n=-1), InvalidArgumentError, r"n must be an integer ≥ 1.*got -1"
    ),
    "highest_entropy n=0": (lambda model, run: token_signals(run.logits).highest_entropy(0), InvalidArgumentError, r"n must be"),
    # layers
    "head_entropy layers=[]": (lambda model, run: head_entropy(run.cache, model, layers=[]), InvalidArgumentError, r"No layers given"),
    "rollout layers=[]": (lambda model, run: rollout(run.cache, model, layers=[]), InvalidArgumentError, r"No layers given"),
    "attention_to_spans layers=[]": (
        lambda model, run: attention_to_spans(run.cache, model, [Span("k", 1, 3)], layers=[]), InvalidArgumentError, r"No layers given"
    ),
    "layers 2-D": (
        lambda model, run: head_entropy(run.cache, model, layers=torch.tensor([[0, 1]])), InvalidArgumentError,
        r"layers must be a list of integers.*shape \(1, 2\)",
    ),
    # spans
    "key_span tuple": (lambda model, run: rollout(run.cache, model, key_span=(0, 5)), InvalidArgumentError, r"key_span must be a mechvis\.Span"),
    "rollout_rows key_span tuple": (
        lambda model, run: rollout_rows(run.cache, model, [-1], key_span=(0, 5)), InvalidArgumentError, r"key_span must be a mechvis\.Span"
    ),
    "span tuples": (lambda model, run: attention_to_spans(run.cache, model, [(1, 3)]), InvalidArgumentError, r"key_spans must be a mechvis\.Span"),
    "one Span alone": (lambda model, run: attention_to_spans(run.cache, model, Span("k", 1, 3)), InvalidArgumentError, r"pass \[span\]"),
    "find_token_spans(run, 5)": (lambda model, run: find_token_spans(run, 5), InvalidArgumentError, r"keyword must be a string.*got 5"),
    # numbers and tensors
    "residual_weight='0.5'": (
        lambda model, run: rollout(run.cache, model, residual_weight="0.5"), InvalidArgumentError, r"residual_weight must be a finite number in \[0\.0, 1\.0\]"
    ),
    "analyse_long residual_weight='0.5'": (
        lambda model, run: analyse_long(model, PROMPT, residual_weight="0.5", progress=False), InvalidArgumentError, r"residual_weight must be"
    ),
    "gradient_x_input id outside vocab": (
        lambda model, run: gradient_x_input(model, torch.tensor([1, 49152]), 3), InvalidArgumentError, r"holds id 49152 at position 1, outside the vocabulary"
    ),
    "gradient_x_input float list": (
        lambda model, run: gradient_x_input(model, [1.5, 2.0], 3), InvalidArgumentError, r"tokens must hold integer values"
    ),
    "occlusion batch_size=1.5": (
        lambda model, run: occlusion(model, run.tokens, 3, batch_size=1.5), InvalidArgumentError, r"batch_size must be an integer ≥ 1; got 1\.5"
    ),
    "ablation_sweep batch_size=1.5": (
        lambda model, run: ablation_sweep(model, run.tokens, target_probability(model, 3), batch_size=1.5), InvalidArgumentError,
        r"batch_size must be an integer",
    ),
    "hidden_state_projection n_components=1.5": (
        lambda model, run: hidden_state_projection(run.cache, model, run.str_tokens, n_components=1.5), InvalidArgumentError,
        r"n_components must be an integer in \[1, 9\]; got 1\.5",
    ),
    "embedding_projection []": (lambda model, run: embedding_projection(model, []), InvalidArgumentError, r"tokens must be a non-empty list"),
    "embedding_projection str": (lambda model, run: embedding_projection(model, "abc"), InvalidArgumentError, r"tokens must be a non-empty list"),
    "pca NaN": (
        lambda model, run: pca(torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 1.0]]), ["a", "b", "c"]), InvalidArgumentError,
        r"NaN or infinite values \(first at point 1, 'b'\)",
    ),
    "pca labels count": (lambda model, run: pca(torch.zeros(3, 2), ["a"]), InvalidArgumentError, r"one label per point"),
    # positions
    "2-D position tensor": (
        lambda model, run: logit_lens(run.cache, model, positions=torch.tensor([[1, 2]])), InvalidArgumentError,
        r"positions must be a list of integers.*shape \(1, 2\)",
    ),
    "2-D one-element position tensor": (
        lambda model, run: layer_similarity(run.cache, model, positions=torch.tensor([[1]])), InvalidArgumentError, r"shape \(1, 1\)"
    ),
    "sink_positions=0": (
        lambda model, run: head_entropy(run.cache, model, sink_positions=0), InvalidArgumentError, r"got 0 \(for one position, pass \[position\]\)"
    ),
    "sink_positions 2-D": (
        lambda model, run: head_entropy(run.cache, model, sink_positions=torch.tensor([[0]])), InvalidArgumentError, r"shape \(1, 1\)"
    ),
    "analyse_long sink_positions=0": (
        lambda model, run: analyse_long(model, PROMPT, sink_positions=0, progress=False), InvalidArgumentError, r"pass \[position\]"
    ),
    "analyse_long tokens 1.5": (
        lambda model, run: analyse_long(model, [1, 1.5], progress=False), InvalidArgumentError, r"tokens must hold integer values"
    ),
    # further arguments of the same kinds across the public API
    "teacher_force continuation 5": (
        lambda model, run: mechvis.teacher_force(model, "Hi", 5), InvalidArgumentError, r"continuation must be a string.*got 5"
    ),
    "teacher_force names_filter 5": (
        lambda model, run: mechvis.teacher_force(model, "Hi", " there", names_filter=5), InvalidArgumentError, r"names_filter must be"
    ),
    "encode prepend_bos 'yes'": (
        lambda model, run: mechvis.encode(model, "Hi", prepend_bos="yes"), InvalidArgumentError, r"prepend_bos must be True or False"
    ),
    "decompose_residual heads 'yes'": (
        lambda model, run: decompose_residual(run.cache, model, heads="yes"), InvalidArgumentError, r"heads must be True or False"
    ),
    "direct_logit_attribution heads 1": (
        lambda model, run: direct_logit_attribution(run.cache, model, 3, heads=1), InvalidArgumentError, r"heads must be True or False"
    ),
    "find_token_spans case_sensitive 'yes'": (
        lambda model, run: find_token_spans(run, "cat", case_sensitive="yes"), InvalidArgumentError, r"case_sensitive must be True or False"
    ),
    "semantic threshold 'x'": (
        lambda model, run: semantic_token_spans(run, "cat", model, threshold="x"), InvalidArgumentError,
        r"threshold must be a finite number in \[-1\.0, 1\.0\] \(a cosine similarity\)",
    ),
    "instruction check threshold 'x'": (
        lambda model, run: instruction_attention_check(model, ["Hi"], ["cat"], "x"), InvalidArgumentError, r"threshold must be a finite number"
    ),
    "instruction check prompts str": (
        lambda model, run: instruction_attention_check(model, "Hi cat", ["cat"], 0.5), InvalidArgumentError, r"prompts must be a list.*pass \[prompt\]"
    ),
    "unembed_logits wrong width": (
        lambda model, run: unembed_logits(model, torch.zeros(3, 5)), InvalidArgumentError, r"residual must be a float tensor \(\.\.\., d_model=64\)"
    ),
    "visible_keys n_positions 1.5": (lambda model, run: visible_keys(model, [0], 1.5), InvalidArgumentError, r"n_positions must be an integer ≥ 1"),
    "visible_keys layers []": (lambda model, run: visible_keys(model, [], 4), InvalidArgumentError, r"No layers given"),
    "row_entropy list": (lambda model, run: row_entropy([0.5, 0.5]), InvalidArgumentError, r"pattern must be a float tensor"),
    "classify threshold 'x'": (
        lambda model, run: head_entropy(run.cache, model).classify(sink_threshold="x"), InvalidArgumentError, r"sink_threshold must be"
    ),
    "ranked_heads n=0": (
        lambda model, run: attention_to_spans(run.cache, model, [Span("k", 1, 3)]).ranked_heads(0), InvalidArgumentError, r"n must be an integer ≥ 1"
    ),
    "cache 5": (lambda model, run: high_entropy_positions(model, run.logits, cache=5), InvalidArgumentError, r"cache must be an ActivationCache"),
    "keyword_spans tuples": (
        lambda model, run: keyword_dynamics(mechvis.teacher_force(model, PROMPT, " mat"), keyword_spans={"cat": [(1, 2)]}), InvalidArgumentError,
        r"keyword_spans\['cat'\] must be a mechvis\.Span",
    ),
    "hull_area coverage 'x'": (lambda model, run: hull_area(torch.ones(4), GRID, coverage="x"), InvalidArgumentError, r"coverage must be a finite number in \(0\.0, 1\.0\]"),
    "mass_contour coverage 0": (lambda model, run: mass_contour(torch.ones(4), GRID, coverage=0), InvalidArgumentError, r"coverage must be"),
    "map_geometry list": (lambda model, run: map_geometry([0.25] * 4, GRID), InvalidArgumentError, r"map must be a float tensor of the grid's 4 cells"),
    "map_geometry NaN": (lambda model, run: map_geometry(torch.tensor([float("nan"), 1, 1, 1]), GRID), InvalidArgumentError, r"NaN or infinite"),
    "grid_regions rows 1.5": (lambda model, run: grid_regions(1.5, 2), InvalidArgumentError, r"rows must be an integer ≥ 1; got 1\.5"),
    "grid_regions blocks 3": (lambda model, run: grid_regions(4, 4, blocks=3), InvalidArgumentError, r"blocks must be a pair"),
    "inspect_model 5": (lambda model, run: mechvis.inspect_model(5), InvalidArgumentError, r"inspect_model takes a model from mechvis\.load_model"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_argument_raises_a_clear_error(name, tiny_llama, sample):
    call, error, phrase = CASES[name]
    with pytest.raises(error, match=phrase) as raised:
        call(tiny_llama, sample)
    assert isinstance(raised.value, MechvisError)


def test_integer_likes_and_documented_conversions_give_the_same_results(tiny_llama, sample):
    model, run = tiny_llama, sample
    plain = logit_lens(run.cache, model, k=3, positions=[1, 2])
    for k, positions in ((np.int64(3), np.array([1, 2])), (torch.tensor(3), torch.tensor([1, 2]))):
        other = logit_lens(run.cache, model, k=k, positions=positions)
        assert torch.equal(other.top_ids, plain.top_ids) and other.positions == [1, 2]
    signals = token_signals(run.logits, run.tokens, k=4)
    for logits, tokens, k in ((run.logits.numpy(), run.tokens.tolist(), np.int32(4)), (run.logits, run.tokens.numpy(), torch.tensor(4))):
        other = token_signals(logits, tokens, k=k)
        torch.testing.assert_close(other.surprisal, signals.surprisal, equal_nan=True)
        assert torch.equal(other.top_ids, signals.top_ids)
    assert high_entropy_positions(model, run.logits, n=np.int64(2)).positions == high_entropy_positions(model, run.logits, n=2).positions
    entropy = head_entropy(run.cache, model, layers=np.array([0, 2]), sink_positions=torch.tensor([0]))
    assert entropy.layers == [0, 2]
    torch.testing.assert_close(entropy.normalised, head_entropy(run.cache, model, layers=[0, 2]).normalised, equal_nan=True, rtol=0, atol=0)
    assert head_entropy(run.cache, model, sink_positions=()).sink_positions == ()
    weighted = rollout(run.cache, model, residual_weight=np.float32(0.25), key_span=Span("text", 0, 4))
    torch.testing.assert_close(weighted.matrix, rollout(run.cache, model, residual_weight=0.25, key_span=Span("text", 0, 4)).matrix)
    attribution = gradient_x_input(model, run.tokens.tolist(), 3)
    torch.testing.assert_close(attribution.scores, gradient_x_input(model, run.tokens, 3).scores)
    occluded = occlusion(model, run.tokens, 3, batch_size=np.int64(4))
    torch.testing.assert_close(occluded.scores, occlusion(model, run.tokens, 3, batch_size=4).scores)
    projection = hidden_state_projection(run.cache, model, run.str_tokens, n_components=np.int64(2))
    assert projection.coordinates.shape == (len(run.tokens), 2)
    assert pca(np.eye(3, dtype=np.float32), ["a", "b", "c"]).coordinates.shape == (3, 2)
    names = ("blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern")
    assert set(mechvis.run(model, PROMPT, names_filter=names).cache.keys()) == set(names)
    assert set(mechvis.run(model, PROMPT, names_filter=names[0]).cache.keys()) == {names[0]}
    # a list may name hooks this architecture lacks (hooks_for lists ln1_post for every model), as long as one matches
    residual = hooks_for(model, "residual")
    assert any(name not in model.hook_dict for name in residual)
    assert {"hook_embed", "blocks.2.hook_mlp_out"} <= set(mechvis.run(model, PROMPT, names_filter=residual).cache.keys())


def test_generate_accepts_integer_and_real_likes(tiny_llama):
    options = dict(max_new_tokens=3, temperature=1.0, top_p=0.9, seed=5, analysis_pass=False)
    plain = mechvis.generate(tiny_llama, "Hello there", **options)
    likes = dict(options, temperature=np.float64(1.0), top_p=np.float32(0.9), seed=np.int64(5), max_new_tokens=torch.tensor(3),
                 analysis_pass=np.bool_(False))
    other = mechvis.generate(tiny_llama, "Hello there", **likes)
    assert other.generated_ids == plain.generated_ids and other.settings.seed == 5 and type(other.settings.seed) is int
    scheduled = mechvis.generate(tiny_llama, "Hello there", max_new_tokens=2, temperature_schedule=EntropyTemperature(),
                                 seed=1, logits_processors=[lambda ids, scores: scores], analysis_pass=False)
    assert len(scheduled.generated_ids) == 2


# --- sweep --------------------------------------------------------------------------------------

def _jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_binary_dataset_names_the_file_and_line(tmp_path, no_model_work):
    from mechvis.sweep import run_sweep

    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"data\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 27\)"):
        run_sweep(path, tmp_path / "out", ["lens"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, value, phrase", [
    ("temperature", -1, r"temperature must be a number ≥ 0"),
    ("top_p", 2, r"top_p must be a finite number in \(0\.0, 1\.0\]"),
    ("top_p", 0, r"top_p must be a finite number in \(0\.0, 1\.0\]"),
    ("top_k", 0, r"top_k must be a positive integer"),
    ("seed", 2**70, r"seed must be an integer from"),
    ("max_new_tokens", 0, r"max_new_tokens must be a positive integer; got 0"),
])
def test_bad_generate_settings_fail_at_plan_time_naming_the_line(setting, value, phrase, tmp_path, no_model_work):
    from mechvis.sweep import run_sweep

    items = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "generate": {setting: value}}]
    with pytest.raises(DatasetError, match=rf"data\.jsonl, line 2 \(id 'b'\): generate {phrase}"):
        run_sweep(_jsonl(tmp_path / "data.jsonl", items), tmp_path / "out", ["lens"])


def test_multi_token_target_fails_at_plan_time_naming_the_line(tmp_path, no_model_work):
    from mechvis.sweep import run_sweep

    items = [{"id": "a", "prompt": "x", "target": " Paris"}, {"id": "b", "prompt": "y", "target": " internationalisation"}]
    with pytest.raises(DatasetError, match=r"line/row 2 \(id 'b'\): 'target' ' internationalisation' is 2 tokens"):
        run_sweep(_jsonl(tmp_path / "data.jsonl", items), tmp_path / "out", ["lens"])
    # an analysis that does not read targets does not check them
    with pytest.raises(AssertionError, match="model work"):
        run_sweep(_jsonl(tmp_path / "data.jsonl", items), tmp_path / "out2", ["tokens"])


def test_an_item_that_fails_in_its_analysis_names_its_line(tiny_llama, tmp_path):
    from mechvis.sweep import run_sweep

    items = [{"id": "a", "prompt": "x"}, {"id": "long", "prompt": "word " * 400}]
    with pytest.raises(InvalidArgumentError, match=r"line/row 2 \(id 'long'\): The prompt is \d+ tokens long"):
        run_sweep(_jsonl(tmp_path / "data.jsonl", items), tmp_path / "out", ["tokens"], loaded_model=tiny_llama,
                  progress=False, summary=False)


def test_a_truncated_part_is_redone_on_resume(tiny_llama, tmp_path):
    from mechvis.sweep import read_sweep, run_sweep
    from mechvis.sweep.runner import plan_sweep

    dataset = _jsonl(tmp_path / "data.jsonl", [{"id": f"q{i}", "prompt": f"The river {i} was"} for i in range(4)])
    out = tmp_path / "out"
    options = dict(loaded_model=tiny_llama, progress=False, shard_size=2, summary=False)
    run_sweep(dataset, out, ["lens", "tokens"], **options)
    before = read_sweep(out, "lens")
    part = out / "lens" / "part-00001.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgumentError, match=r"part-00001\.parquet is not a readable Parquet part of 'lens'"):
        read_sweep(out, "lens")
    spec = plan_sweep(dataset, out, ["lens", "tokens"], shard_size=2, tokenizer=tiny_llama.hf_tokenizer)
    assert spec.complete(0) and not spec.complete(1)
    resumed = run_sweep(dataset, out, ["lens", "tokens"], **options)
    assert resumed.shards_run == [1] and resumed.shards_skipped == 1
    assert read_sweep(out, "lens").equals(before)
    pq.write_table(pa.table({"x": [1]}), part)  # readable, but not a part of this analysis
    assert not spec.complete(1)


def test_text_that_is_not_unicode_is_refused_everywhere_it_enters(tiny_llama, tmp_path, no_model_work):
    """Lone surrogates (bytes decoded with surrogateescape, as in command-line arguments, or a
    JSON \\ud800 escape) reached the tokenizer and failed there with an unrelated TypeError."""
    from mechvis.sweep import read_dataset

    bad = "a\ud800b"
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        mechvis.run(tiny_llama, bad)
    with pytest.raises(InvalidArgumentError, match="Message 0 .*lone surrogate"):
        mechvis.encode(tiny_llama, [{"role": "user", "content": bad}], chat=True)
    with pytest.raises(InvalidArgumentError, match="continuation .*lone surrogate"):
        mechvis.teacher_force(tiny_llama, "Hello", bad)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"id": 1, "prompt": "fine"}\n{"id": 2, "prompt": "a\\ud800b"}\n')
    with pytest.raises(DatasetError, match="line 2.*lone surrogate"):
        read_dataset(dataset)
    assert mechvis.encode(tiny_llama, "Tokyo 東京 🎉").token_ids  # real text outside the BMP is fine


def test_more_public_edges_found_by_a_new_user(tiny_llama, tmp_path, monkeypatch):
    """intervene with a non-Intervention, a metric that is not a function, a NaN steering vector,
    a model that is not a model, a dataset given as a list, MECHVIS_CACHE naming a file."""
    from mechvis.interventions import ablation_sweep, add_vector, intervene
    from mechvis.models.embedded import cache_dir
    from mechvis.sweep import run_sweep

    model = tiny_llama
    with pytest.raises(InvalidArgumentError, match="intervene takes Interventions"):
        with intervene(model, "blocks.0.hook_resid_post"):
            pass
    tokens = mechvis.encode(model, "Hello there").token_ids
    with pytest.raises(InvalidArgumentError, match="metric must be a function"):
        ablation_sweep(model, tokens, "accuracy")
    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        add_vector(model, 1, torch.full((model.cfg.d_model,), float("nan")))
    with pytest.raises(InvalidArgumentError, match="scale must be a finite number"):
        add_vector(model, 1, torch.zeros(model.cfg.d_model), scale=float("inf"))
    run = mechvis.run(model, "Hello there")
    with pytest.raises(InvalidArgumentError, match="mechvis.load_model"):
        logit_lens(run.cache, None, positions=[-1])
    with pytest.raises(InvalidArgumentError, match="mechvis.load_model"):
        head_entropy(run.cache, "model")
    with pytest.raises(DatasetError, match="path of a .jsonl or .parquet file"):
        run_sweep([{"id": 1, "prompt": "x"}], tmp_path / "out", ["lens"])
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("MECHVIS_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(InvalidArgumentError, match="MECHVIS_CACHE=.* is a file"):
        cache_dir()


def test_analysis_names_given_as_one_string_or_none(tiny_llama, tmp_path):
    from mechvis.analysis import hooks_for
    from mechvis.sweep import run_sweep

    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"id": 1, "prompt": "hello"}\n')
    with pytest.raises(InvalidArgumentError, match=r"a list of names, e.g. \['lens'\]"):
        run_sweep(dataset, tmp_path / "out", "lens")
    with pytest.raises(InvalidArgumentError, match="Name at least one analysis"):
        hooks_for(tiny_llama)
