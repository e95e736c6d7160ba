"""Repetition labels, the seed score, the causal features, the monitor and the samplers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mechvis
from mechvis.generation.monitor import FEATURES, RepetitionMonitor, find_induction_heads, rep_labels
from mechvis.analysis.repetition import auroc, average_precision, cusum_alarm, fit_cusum, distinct_n, loop_onset, repetition_features, seed_score, seq_rep_n
from mechvis.cli import main
from mechvis.errors import InvalidArgumentError
from mechvis.generation import EntropyTemperature, MonitorTemperature, ProcessLogits, RepetitionTemperature, SamplingSettings
from mechvis.interventions import ablate_heads, intervene
from tests.reference import hf_attentions

LOOPY = "The cat sat. The cat sat. The cat sat. The cat sat. The cat"


def test_text_labels_by_hand():
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 4, 1, 2, 3, 4]
    assert rep_labels(tokens, n=4).tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert rep_labels(tokens, n=4, window=3).tolist() == [0] * 13  # every earlier copy ends > 3 tokens back
    assert loop_onset(torch.tensor([0, 1, 0, 1, 1, 1, 1, 0])) == 3
    assert loop_onset(torch.tensor([0, 1, 1, 0])) is None
    assert seq_rep_n([1, 2, 3, 1, 2, 3], n=2) == pytest.approx(1 - 3 / 5)
    assert distinct_n([1, 2, 3, 1, 2, 3], n=2) == pytest.approx(3 / 5)
    assert seq_rep_n([1, 2], n=4) == 0.0 and distinct_n([], n=2) == 0.0
    with pytest.raises(InvalidArgumentError):
        rep_labels(tokens, n=0)


def test_auroc_average_precision_and_cusum_by_hand():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert cusum_alarm([0.2, 0.9, 0.9, 0.9], drift=0.5, threshold=0.7) == 2
    assert cusum_alarm([0.2] * 10) is None


def test_fit_cusum_picks_the_earliest_alarm_within_the_false_alarm_budget():
    """Worked by hand: clean streams at p = 0.33 for 30 tokens alarm whenever drift ≤ 0.3 and the
    sum can pass the threshold (d = 0.3 reaches S = 0.9); the loop jumps to p = 0.6 at token 5.
    Without false alarms the earliest alarm is one token late (d = 0.35: S = 0.25, 0.5 > 0.25);
    with any number of false alarms allowed, d = 0.1, h = 0.25 fires at the onset itself."""
    clean = [[0.33] * 30, [0.33] * 30]
    loop = [0.0] * 5 + [0.6] * 15
    onsets = [None, None, 5]
    assert fit_cusum(clean + [loop], onsets) == (0.35, 0.25)
    assert cusum_alarm(loop, drift=0.35, threshold=0.25) == 6
    assert all(cusum_alarm(stream, drift=0.35, threshold=0.25) is None for stream in clean)
    assert fit_cusum(clean + [loop], onsets, max_false_alarm_rate=1.0) == (0.1, 0.25)
    # A loop that never alarms counts as its remaining length (15 tokens): d = 0.35 catches the weak
    # loop (p = 0.4) ~5 tokens late, median ~2.5; any higher drift misses it, median (0 + 15) / 2.
    strong, weak = [0.0] * 5 + [0.9] * 15, [0.0] * 5 + [0.4] * 15
    assert fit_cusum(clean + [strong, weak], [None, None, 5, 5]) == (0.35, 0.25)
    with pytest.raises(InvalidArgumentError, match="clean and looping"):
        fit_cusum([loop], [5])
    with pytest.raises(InvalidArgumentError, match="onsets"):
        fit_cusum([loop], [5, None])
    with pytest.raises(InvalidArgumentError, match="max_false_alarm_rate"):
        fit_cusum(clean + [loop], onsets, max_false_alarm_rate=1.5)


def _trace(model, text=LOOPY):
    prompt, _, rest = text.partition(".")
    return mechvis.teacher_force(model, prompt + ".", rest)


def test_seed_score_matches_a_direct_transcription(tiny):
    model, reference = tiny("llama")
    trace = _trace(model)
    attentions = hf_attentions(reference, trace.run.tokens.tolist())
    last = model.cfg.n_layers - 1
    hidden = trace.run.cache[f"blocks.{last}.hook_resid_post"][0].double().numpy()
    logits = trace.run.logits.double().numpy()
    vocab = logits.shape[-1]
    entropy, rise, uniformity, focus = [], [], [], []
    for position in trace.generated_positions:  # the seed, one token at a time
        q = position - 1
        p = np.exp(logits[q] - logits[q].max())
        p /= p.sum()
        h = -(p * np.log(p)).sum()
        entropy.append(h / math.log(vocab))
        rise.append(np.linalg.norm(hidden[q]) - np.linalg.norm(hidden[q - 1]))
        uniformity.append(min(max(1 - (math.log(vocab) - h), 0.0), 1.0))
        row = attentions[last, :, q, : q + 1].mean(0)
        focus.append(1 - (-(row[row > 0] * np.log(row[row > 0])).sum()) / math.log(q + 1))
    rise = (np.array(rise) - min(rise)) / (max(rise) - min(rise))
    expected = np.array(entropy) + 0.5 * rise + 2.0 * np.array(uniformity) + 0.25 * np.array(focus)
    got = seed_score(model, trace, alpha=0.5, beta=2.0, delta=0.25)
    np.testing.assert_allclose(got.score.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(got.attention_focus.numpy(), focus, atol=1e-5)
    assert got.activation_rise.min() == 0 and got.activation_rise.max() == 1  # min-max: always 0 and 1


def test_features_match_loop_references(tiny):
    model, reference = tiny("llama")
    trace = _trace(model)
    induction = find_induction_heads(model, threshold=0.0, top=3)
    features = repetition_features(model, trace, induction, layer=1, recurrence_window=5)
    tokens = trace.run.tokens.tolist()
    attentions = hf_attentions(reference, tokens)
    hidden = trace.run.cache["blocks.1.hook_resid_post"][0].double().numpy()
    centre = hidden[1 : trace.prompt_length].mean(0)
    for row, position in enumerate(trace.generated_positions):
        q = position - 1
        probs = torch.softmax(trace.run.logits[q].double(), -1).numpy()
        top = np.sort(probs)[::-1]
        assert features["confidence"][row].item() == pytest.approx(top[0], abs=1e-5)
        assert features["margin"][row].item() == pytest.approx(top[0] - top[1], abs=1e-5)
        centred = hidden - centre
        cosines = [centred[q] @ centred[q - k] / np.linalg.norm(centred[q]) / np.linalg.norm(centred[q - k])
                   for k in range(1, 6) if q - k >= 1]
        assert features["recurrence"][row].item() == pytest.approx(max(cosines), abs=1e-5)
        copy = max(sum(attentions[l, h, q, j] for j in range(1, q + 1) if tokens[j - 1] == tokens[q]) for l, h in induction.heads)
        assert features["copy_attention"][row].item() == pytest.approx(copy, abs=1e-5)
        assert features["sink_mass"][row].item() == pytest.approx(attentions[:, :, q, 0].mean(), abs=1e-5)
        norms = np.linalg.norm(hidden, axis=-1)
        past = norms[1:q]
        if len(past) >= 4:
            mad = np.median(np.abs(past - np.median(past))) * 1.4826
            assert features["activation_z"][row].item() == pytest.approx((norms[q] - np.median(past)) / mad, rel=1e-4)


def test_induction_probe_scores_match_hf_attentions(tiny):
    model, reference = tiny("gpt2")
    found = find_induction_heads(model, length=10, threshold=0.0, top=2)
    assert found.scores.shape == (3, 4) and len(found.heads) == 2
    flat = found.scores.flatten()
    assert flat[found.heads[0][0] * 4 + found.heads[0][1]] == flat.max()


@pytest.mark.integration
def test_embedded_model_has_induction_heads(embedded):
    found = find_induction_heads(embedded)
    assert found.heads and found.scores.max() > 0.5


def test_monitor_fit_learns_the_direction_and_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, len(FEATURES), generator=generator)
    labels = (features[:, 5] + 0.3 * torch.randn(400, generator=generator) > 0.5).long()  # recurrence decides
    monitor = RepetitionMonitor.fit(features, labels)
    assert max(range(len(FEATURES)), key=lambda i: abs(monitor.weights[i])) == 5 and monitor.weights[5] > 0
    assert auroc(monitor.probability(features).tolist(), labels.tolist()) > 0.95
    monitor.alarm_drift, monitor.alarm_threshold = 0.5, 0.7
    monitor.save(tmp_path / "monitor.json")
    loaded = RepetitionMonitor.load(tmp_path / "monitor.json")
    torch.testing.assert_close(loaded.probability(features), monitor.probability(features))
    assert loaded.first_alarm(torch.tensor([0.2, 0.9, 0.9, 0.9])) == 2  # the alarm settings travel too
    with pytest.raises(InvalidArgumentError, match="feature values"):
        monitor.probability(features[:, :3])


def test_shipped_monitor_loads():
    monitor = RepetitionMonitor.load()
    assert monitor.feature_names == FEATURES and len(monitor.weights) == len(FEATURES)
    assert monitor.metadata["held_out_auroc"] > monitor.metadata["held_out_auroc_seed_score"]


def test_entropy_temperature_is_applied_each_step(tiny):
    model, _ = tiny("llama")
    trace = mechvis.generate(model, "Hello there", max_new_tokens=6,
                             sampling=SamplingSettings(schedule=EntropyTemperature(base=1.2, n=0.5, theta=2.0), seed=0))
    for step in range(len(trace.generated_ids)):
        log_probs = trace.step_logits[step].log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum()
        temperature = 1.2 * 0.5 ** (2.0 / entropy)
        torch.testing.assert_close(trace.step_distributions[step], (trace.step_logits[step] / temperature).softmax(-1), atol=1e-6, rtol=1e-4)


def test_repetition_temperature_rises_with_loops():
    schedule = RepetitionTemperature(low=0.5, high=1.5, n=2, window=4)
    fresh = schedule.temperature(torch.ones(1), torch.tensor([[1, 2, 3, 4, 5, 6]]))
    looping = schedule.temperature(torch.ones(1), torch.tensor([[1, 2, 1, 2, 1, 2]]))
    # bigram labels of the loop: [0, 0, 0, 1, 1, 1]; the last 4 hold 3 repeats: T = 0.5 + 0.75 · 1.0
    assert fresh.item() == pytest.approx(0.5) and looping.item() == pytest.approx(1.25)


def _boost_token_5(input_ids, scores):
    return scores + 8.0 * torch.nn.functional.one_hot(torch.tensor([5]), scores.shape[-1])


@pytest.mark.parametrize(
    ("architecture", "extra"),
    # Gemma-2's sliding-window cache keeps only the last keys; a logits processor must not reach the
    # features (they read the model's own logits); an intervention applies to both passes.
    [("llama", None), ("qwen2", None), ("gpt2", None), ("gemma2", None), ("llama", "ablation"), ("llama", "processor")],
)
def test_monitor_temperature_streams_the_features_of_the_finished_trace(tiny, streamed_features, architecture, extra):
    model, _ = tiny(architecture)
    induction = find_induction_heads(model, threshold=0.0, top=3)
    # Weights off the saturated entropy terms of a random model, so P(loop) moves with the features.
    monitor = RepetitionMonitor([0.0] * 8, [1.0] * 8, [0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0], -1.0)
    schedule = MonitorTemperature(low=0.4, high=2.0, monitor=monitor, induction=induction)
    with intervene(model, *([ablate_heads(model, [(0, 1)])] if extra == "ablation" else [])):
        trace = mechvis.generate(model, LOOPY, max_new_tokens=24, sampling=SamplingSettings(schedule=schedule, seed=0),
                                 recorders=[ProcessLogits(_boost_token_5)] if extra == "processor" else [])
        offline = repetition_features(model, trace, induction)  # the teacher-forced pass, after the fact
    assert len(streamed_features) == len(trace.generated_ids) == 24 and len(trace.run.tokens) > 8 + 24
    # Without an intervention the decode keeps the HF modules' fast path, recorded by module hooks.
    assert streamed_features.paths == (["bridge"] if extra == "ablation" else ["modules"])
    torch.testing.assert_close(torch.stack(streamed_features), offline.values, atol=1e-4, rtol=1e-4)
    expected = 0.4 + 1.6 * monitor.score(offline)
    assert expected.max() - expected.min() > 0.1  # the temperature really varies
    torch.testing.assert_close(trace.step_temperatures, expected, atol=1e-4, rtol=0)
    processed = trace.step_logits + (8.0 * torch.nn.functional.one_hot(torch.tensor(5), trace.step_logits.shape[-1]) if extra == "processor" else 0.0)
    scaled = (processed / trace.step_temperatures[:, None]).softmax(-1)
    torch.testing.assert_close(trace.step_distributions, scaled, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "build",
    [lambda: MonitorTemperature(low=1.5, high=1.0), lambda: RepetitionTemperature(low=-0.1),
     lambda: RepetitionTemperature(window=0), lambda: EntropyTemperature(base=0.0)],
)
def test_bad_temperature_schedules(build):
    with pytest.raises(InvalidArgumentError, match="needs"):
        build()


def test_repetition_eval_cli_on_a_tiny_model(tmp_path, tokenizer):
    from tests.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval"
    assert main(["repetition-eval", "--model", str(model_dir), "--prompts", "6", "--max-new-tokens", "12",
                 "--sampler-prompts", "2", "--out", str(out)]) == 0
    results = json.loads((out / "repetition-eval.json").read_text())
    assert set(results["signals"]) == set(FEATURES) | {"seed_score", "combined_monitor"}
    assert [row["n"] for row in results["synthetic"]["rows"]] == list(range(1, 11))
    assert set(results["samplers"]) >= {"greedy", "T=0.7", "T=1.0", "monitor-aware (0.7→1.6)"}
    assert (out / "repetition-eval.png").stat().st_size > 1000 and (out / "repetition_monitor.json").exists()
    assert main(["repetition-eval", "--model", str(model_dir), "--prompts", "1000"]) == 2
