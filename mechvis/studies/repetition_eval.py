"""`mechvis repetition-eval`: does the repetition monitor predict loops, and does a loop-aware
sampler break them? Generates a labelled corpus with the model, fits the combined monitor on the
training prompts and scores every signal on the held-out ones."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from mechvis.analysis.repetition import (
    auroc,
    average_precision,
    distinct_n,
    fit_cusum,
    loop_onset,
    repetition_features,
    seed_score,
    seq_rep_n,
)
from mechvis.generation import (
    EntropyTemperature,
    MonitorTemperature,
    RepetitionTemperature,
    SamplingSettings,
    generate,
    teacher_force,
)
from mechvis.generation.monitor import FEATURES, InductionHeads, RepetitionMonitor, find_induction_heads, rep_labels

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

CHAT_PROMPTS = [
    "List the days of the week, over and over.",
    "Count from one to fifty in words.",
    "Write a short poem about the sea.",
    "Name as many fruits as you can.",
    "Explain how photosynthesis works.",
    "Give me a recipe for pancakes.",
    "What are the planets of the solar system?",
    "Repeat the word 'hello' many times.",
    "Write a story about a robot who learns to paint.",
    "List the months of the year.",
    "Describe your ideal weekend.",
    "What is the capital of every country in Europe?",
    "Write a Python function that reverses a string.",
    "Give ten tips for better sleep.",
    "Summarise the plot of Romeo and Juliet.",
    "List prime numbers.",
    "Write a limerick about a cat.",
    "What are the colours of the rainbow?",
    "Tell me a joke about computers.",
    "How do I make a paper airplane?",
    "List the letters of the alphabet.",
    "Write a thank-you note to a teacher.",
    "Explain what a black hole is to a child.",
    "Name the continents and their largest cities.",
    "Write the lyrics of a song about summer.",
    "What should I pack for a camping trip?",
]
COMPLETION_PROMPTS = [
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "Monday, Tuesday, Wednesday,",
    "1, 2, 3, 4, 5,",
    "The history of the Roman Empire begins",
    "def fibonacci(n):",
    "Dear Sir or Madam, I am writing to",
    "In the beginning there was",
    "The ingredients you will need are:",
    "She opened the door and saw",
    "Breaking news: scientists have discovered",
    "The rules of chess are simple:",
    "I love you, I love you, I love you,",
    "To be or not to be,",
    "The weather today is sunny and",
    "Step 1: Preheat the oven.",
    "My favourite animals are dogs, cats,",
    "The meeting will cover the following topics:",
    "Water boils at 100 degrees Celsius because",
    "The quick brown fox",
    "Chapter 1. The Storm",
    "Roses are red, violets are blue,",
    "Here is a list of things to do today:",
    "The stock market fell sharply on",
    "A B C D E F G",
    "Thank you for your order. Your items",
]
PROMPTS = [(text, True) for text in CHAT_PROMPTS] + [(text, False) for text in COMPLETION_PROMPTS]

SYNTHETIC_SENTENCE = "The old lighthouse keeper climbed the stairs every night."


def analysis_hooks(model: "TransformerBridge", layer: int) -> list[str]:
    """Hooks the repetition signals read: every attention pattern, two residual streams."""
    return [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)] + [
        f"blocks.{layer}.hook_resid_post", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    ]


@dataclass
class LabelledSequence:
    """One generated sequence of the corpus with its signals and labels."""

    prompt: str
    chat: bool
    sampled: bool
    held_out: bool
    generated_ids: list[int]
    features: torch.Tensor
    seed_scores: torch.Tensor
    labels: torch.Tensor


def build_corpus(
    model: "TransformerBridge", induction: InductionHeads, *, n_prompts: int, max_new_tokens: int, held_out_every: int = 5
) -> list[LabelledSequence]:
    """Each prompt generated greedily and sampled (T = 1.0, top-p 0.95): labelled sequences.
    Every `held_out_every`-th prompt is held out from fitting."""
    layer = (2 * model.cfg.n_layers) // 3
    corpus = []
    jobs = [(index, prompt, chat, sampled) for index, (prompt, chat) in enumerate(PROMPTS[:n_prompts]) for sampled in (False, True)]
    for index, prompt, chat, sampled in tqdm(jobs, desc="generating the corpus", unit="sequence"):
        sampling = SamplingSettings(temperature=1.0, top_p=0.95, seed=index) if sampled else None
        trace = generate(model, prompt, chat=chat, max_new_tokens=max_new_tokens, names_filter=analysis_hooks(model, layer),
                         sampling=sampling)
        if len(trace.generated_ids) < 8:
            continue
        corpus.append(LabelledSequence(
            prompt, chat, sampled, index % held_out_every == 0, trace.generated_ids,
            repetition_features(trace, induction=induction, layer=layer).values,
            seed_score(trace).score,
            rep_labels(trace.generated_ids),
        ))
    return corpus


def _stack(corpus: list[LabelledSequence], held_out: bool):
    chosen = [s for s in corpus if s.held_out == held_out]
    return (torch.cat([s.features for s in chosen]), torch.cat([s.seed_scores for s in chosen]),
            torch.cat([s.labels for s in chosen]), chosen)


def _lead_times(sequences: list[LabelledSequence], probabilities: list[torch.Tensor], monitor: RepetitionMonitor) -> dict:
    """The monitor's CUSUM alarm versus the onset of the visible loop, per held-out sequence."""
    leads, missed, false_alarms, clean = [], 0, 0, 0
    for sequence, probability in zip(sequences, probabilities):
        onset = loop_onset(sequence.labels)
        alarm = monitor.first_alarm(probability)
        if onset is None:
            clean += 1
            false_alarms += alarm is not None
        elif alarm is None:
            missed += 1
        else:
            leads.append(onset - alarm)
    return {
        "drift": monitor.alarm_drift,
        "threshold": monitor.alarm_threshold,
        "looping_sequences": len(leads) + missed,
        "detected": len(leads),
        "median_lead_tokens": statistics.median(leads) if leads else None,
        "detected_before_onset": sum(lead > 0 for lead in leads),
        "false_alarm_rate": false_alarms / clean if clean else None,
    }


def _fit_alarm(monitor: RepetitionMonitor, sequences: list[LabelledSequence], probability_of) -> None:
    """Set the monitor's CUSUM settings from the training sequences (≤ 5% false alarms on clean ones)."""
    monitor.alarm_drift, monitor.alarm_threshold = fit_cusum(
        [probability_of(s).tolist() for s in sequences], [loop_onset(s.labels) for s in sequences]
    )


def evaluate(corpus: list[LabelledSequence]) -> tuple[RepetitionMonitor, dict]:
    """Fit the monitor, its alarm (and a one-feature logistic calibration of the seed score with its
    own alarm) on the training prompts; AUROC, AUPRC and lead times on the held-out prompts."""
    train_x, train_seed, train_y, train_sequences = _stack(corpus, held_out=False)
    test_x, test_seed, test_y, test_sequences = _stack(corpus, held_out=True)
    monitor = RepetitionMonitor.fit(train_x, train_y, metadata={
        "fitted_on_tokens": int(train_y.numel()), "loop_share": float(train_y.float().mean()),
    })
    combined = monitor.probability(test_x)
    signals = {name: test_x[:, i] for i, name in enumerate(FEATURES)}
    signals["seed_score"] = test_seed
    signals["combined_monitor"] = combined
    table = {name: {"auroc": auroc(values.tolist(), test_y.tolist()), "auprc": average_precision(values.tolist(), test_y.tolist())}
             for name, values in signals.items()}
    # A monotone calibration of the seed score to a probability, so both alarms are CUSUMs fitted alike.
    seed_calibration = RepetitionMonitor.fit(train_seed[:, None], train_y, feature_names=("seed_score",))

    def monitor_probability(sequence: LabelledSequence) -> torch.Tensor:
        return monitor.probability(sequence.features)

    def seed_probability(sequence: LabelledSequence) -> torch.Tensor:
        return seed_calibration.probability(sequence.seed_scores[:, None])

    _fit_alarm(monitor, train_sequences, monitor_probability)
    _fit_alarm(seed_calibration, train_sequences, seed_probability)
    results = {
        "tokens": {"train": int(train_y.numel()), "held_out": int(test_y.numel()),
                   "held_out_loop_share": float(test_y.float().mean())},
        "signals": table,
        "lead_time": {
            "combined_monitor": _lead_times(test_sequences, [monitor_probability(s) for s in test_sequences], monitor),
            "seed_score": _lead_times(test_sequences, [seed_probability(s) for s in test_sequences], seed_calibration),
        },
    }
    monitor.metadata["held_out_auroc"] = table["combined_monitor"]["auroc"]
    monitor.metadata["held_out_auroc_seed_score"] = table["seed_score"]["auroc"]
    return monitor, results


def synthetic_check(model: "TransformerBridge", monitor: RepetitionMonitor, induction: InductionHeads, *, max_repeats: int = 10) -> dict:
    """DITTO's check: after a sentence repeated n times, the model's probability of repeating it
    again, and the monitor's mean probability over that repetition, for n = 1..max_repeats."""
    layer = (2 * model.cfg.n_layers) // 3
    rows = []
    for n in tqdm(range(1, max_repeats + 1), desc="synthetic check", unit="n"):
        trace = teacher_force(model, " ".join([SYNTHETIC_SENTENCE] * n), " " + SYNTHETIC_SENTENCE, names_filter=analysis_hooks(model, layer))
        features = repetition_features(trace, induction=induction, layer=layer)
        token_probability = trace.step_distributions.gather(-1, torch.tensor(trace.generated_ids)[:, None]).mean().item()
        rows.append({"n": n, "repeat_probability": token_probability, "monitor": monitor.score(features).mean().item(),
                     "seed_score": seed_score(trace).score.mean().item()})
    monitor_values = [row["monitor"] for row in rows]
    return {"rows": rows, "monitor_rises_monotonically": all(b >= a for a, b in zip(monitor_values, monitor_values[1:]))}


def compare_samplers(
    model: "TransformerBridge", monitor: RepetitionMonitor, induction: InductionHeads, *, n_prompts: int, max_new_tokens: int
) -> dict:
    """Greedy, fixed temperatures and dynamic temperatures (from entropy, from the text's repeats,
    from `monitor`) on the same prompts: seq-rep-4, distinct-2, the mean log-probability of the
    generated text under the model (nats/token) and the mean temperature used."""
    samplers = {
        "greedy": None,
        "T=0.7": SamplingSettings(temperature=0.7),
        "T=0.8": SamplingSettings(temperature=0.8),  # about the dynamic samplers' mean temperature
        "T=1.0": SamplingSettings(temperature=1.0),
        "EDT (T0=1, N=0.8, θ=1)": SamplingSettings(schedule=EntropyTemperature()),
        "repetition-aware (0.7→1.6)": SamplingSettings(schedule=RepetitionTemperature()),
        "monitor-aware (0.7→1.6)": SamplingSettings(schedule=MonitorTemperature(monitor=monitor, induction=induction)),
    }
    results = {}
    jobs = [(name, sampling, index, prompt, chat) for name, sampling in samplers.items()
            for index, (prompt, chat) in enumerate(PROMPTS[:n_prompts])]
    per_sampler: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in samplers}
    for name, sampling, index, prompt, chat in tqdm(jobs, desc="comparing samplers", unit="sequence"):
        seeded = dataclasses.replace(sampling, seed=index) if sampling is not None else None
        trace = generate(model, prompt, chat=chat, max_new_tokens=max_new_tokens, names_filter=[], sampling=seeded)
        ids = torch.tensor(trace.generated_ids)
        log_probability = trace.step_logits.log_softmax(-1).gather(-1, ids[:, None]).mean().item()
        per_sampler[name].append((seq_rep_n(trace.generated_ids, 4), distinct_n(trace.generated_ids, 2), log_probability,
                                  trace.step_temperatures.mean().item()))
    for name, rows in per_sampler.items():
        keys = ("seq_rep_4", "distinct_2", "mean_log_prob", "mean_temperature")
        results[name] = {key: sum(row[i] for row in rows) / len(rows) for i, key in enumerate(keys)}
    return results


def write_figure(results: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4))  # not pyplot: the process's backend stays as it is
    left, right = figure.subplots(1, 2)
    names = list(results["signals"])
    left.barh(names, [results["signals"][n]["auroc"] for n in names], color="#4c72b0")
    left.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("held-out AUROC (token continues a loop)")
    left.set_xlim(0, 1)
    rows = results["synthetic"]["rows"]
    right.plot([r["n"] for r in rows], [r["monitor"] for r in rows], marker="o", label="monitor P(loop)")
    right.plot([r["n"] for r in rows], [r["repeat_probability"] for r in rows], marker="s", label="P(next token of the repeat)")
    right.set_xlabel("times the sentence was already repeated (n)")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(path)


def run_evaluation(model: "TransformerBridge", *, n_prompts: int, max_new_tokens: int, out_dir: Path,
                   sampler_prompts: int, weights_path: Path | None = None) -> dict:
    """The whole evaluation; writes results.json and a figure into `out_dir` and returns the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    induction = find_induction_heads(model)
    corpus = build_corpus(model, induction, n_prompts=n_prompts, max_new_tokens=max_new_tokens)
    monitor, results = evaluate(corpus)
    results["induction_heads"] = [list(head) for head in induction.heads]
    results["corpus"] = {"prompts": n_prompts, "sequences": len(corpus), "max_new_tokens": max_new_tokens,
                         "seq_rep_4_mean": sum(seq_rep_n(s.generated_ids) for s in corpus) / len(corpus)}
    results["synthetic"] = synthetic_check(model, monitor, induction)
    results["samplers"] = compare_samplers(model, monitor, induction, n_prompts=sampler_prompts, max_new_tokens=max_new_tokens)
    results["monitor"] = {"features": list(FEATURES), "weights": monitor.weights, "bias": monitor.bias}
    (out_dir / "repetition-eval.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_figure(results, out_dir / "repetition-eval.png")
    monitor.save(weights_path or out_dir / "repetition_monitor.json")
    return results


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


def format_results(results: dict) -> str:
    lines = [f"{'signal':<18}{'AUROC':>7}{'AUPRC':>7}"]
    for name, row in results["signals"].items():
        lines.append(f"{name:<18}{row['auroc']:>7.3f}{row['auprc']:>7.3f}")
    lines.append("")
    for name, row in results["lead_time"].items():
        lines.append(f"lead time, {name}: {row}")
    lines.append(f"synthetic check: monitor rises monotonically with n: {results['synthetic']['monitor_rises_monotonically']}")
    lines.append("")
    lines.append(f"{'sampler':<28}{'seq-rep-4':>10}{'distinct-2':>11}{'log-prob':>9}{'mean T':>8}")
    for name, row in results["samplers"].items():
        lines.append(f"{name:<28}{row['seq_rep_4']:>10.3f}{row['distinct_2']:>11.3f}{row['mean_log_prob']:>9.3f}"
                     f"{row['mean_temperature']:>8.2f}")
    return "\n".join(lines)
