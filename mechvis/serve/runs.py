"""Turning a finished Trace into a `StoredRun`: the library's analyses that need the full-vocabulary
logits run once here (token signals, the repetition monitor, the seed score), then those logits
are dropped and attention patterns kept in float16, so a run costs a bounded amount of memory."""

from __future__ import annotations

import torch

from mechvis.analysis import activation_hook_names, hooks_for, lens_hook_names, token_signals
from mechvis.analysis.repetition import loop_onset, repetition_features, seed_score
from mechvis.analysis.vision import vision_rollout_hooks
from mechvis.generation.monitor import RepetitionMonitor, find_induction_heads, rep_labels
from mechvis.interventions import ablate_heads, intervene, reference_runs
from mechvis.results import jsonable
from mechvis.serve.state import ServerState
from mechvis.serve.store import StoredRun, tensor_bytes
from mechvis.viz.views import topk_tokens_view

TOP_N = 10
STEP_TOP = 50  # entries of each step's raw and sampled distribution kept for the distribution tab


def mean_reference(state: ServerState):
    """The reference runs of mean ablation, computed once per loaded model."""

    if "mean-reference" not in state.model_extras:
        state.model_extras["mean-reference"] = reference_runs(state.model)
    return state.model_extras["mean-reference"]


def ablated(state: ServerState, heads, method: str):
    """A context in which the model runs with `heads` ((layer, head) pairs) ablated by `method`
    ("zero" or "mean"): how a run B is generated, analysed and exported."""

    reference = mean_reference(state) if method == "mean" else None
    return intervene(state.model, ablate_heads(state.model, [tuple(h) for h in heads], method=method, reference=reference))


def tab_hooks(model) -> list[str]:
    """The hooks the tabs read (passed to the analysis pass as `names_filter`)."""

    return sorted(set(hooks_for(model, "residual", "similarity", "attention", "norms", "statistics"))
                  | set(lens_hook_names(model)) | set(activation_hook_names(model, "resid_post"))
                  | set(vision_rollout_hooks(model)))  # tab 15's vision-rollout overlay


def _repetition(state: ServerState, model, trace) -> dict:
    result: dict = {}
    if not trace.generated_ids:
        return result
    try:
        if "induction" not in state.model_extras:
            state.model_extras["induction"] = find_induction_heads(model)
        features = repetition_features(trace, induction=state.model_extras["induction"])
        monitor = RepetitionMonitor.load()
        probability = monitor.score(features)
        result.update(
            feature_names=list(features.names),
            features=jsonable(features.values.T),
            monitor=jsonable(probability),
            alarm=monitor.first_alarm(probability),
        )
    except Exception as error:  # a model the monitor does not fit: the tab says why
        result["monitor_error"] = str(error)
    labels = rep_labels(trace.run.tokens.tolist())[trace.prompt_length :]
    onset = loop_onset(labels)
    result.update(labels=labels.tolist(), onset=onset)
    try:
        seed = seed_score(trace)
        result["seed"] = seed.to_dict(("entropy_term", "activation_rise", "uniformity", "attention_focus", "score"))
    except Exception as error:
        result["seed_error"] = str(error)
    return result


def store_trace(state: ServerState, run_id: str, trace, request: dict, events: list[dict], timing: dict, image=None) -> StoredRun:
    model = state.model
    run = trace.run
    signals = token_signals(run.logits, run.tokens, k=TOP_N)
    step_top: dict = {}
    if trace.generated_ids:
        raw_probs, raw_ids = trace.step_logits.float().softmax(-1).topk(STEP_TOP, dim=-1)
        sampled_probs, sampled_ids = trace.step_distributions.float().topk(STEP_TOP, dim=-1)
        step_top = {"raw_ids": raw_ids, "raw_probs": raw_probs, "sampled_ids": sampled_ids,
                    "sampled_probs": sampled_probs, "support": (trace.step_distributions > 0).sum(-1)}
    repetition = _repetition(state, model, trace)

    topk_view = topk_tokens_view(model, run, k=TOP_N)  # tab 11's circuitsvis view reads the full logits: built now
    for name in list(run.cache.cache_dict):
        if name.endswith("hook_pattern"):
            run.cache.cache_dict[name] = run.cache.cache_dict[name].to(torch.float16)
    run.logits = run.logits[:0]  # dropped: the signals and step top-N keep what the tabs show
    trace.step_logits = trace.step_logits[:, :0]
    trace.step_distributions = trace.step_distributions[:, :0]
    stored = StoredRun(run_id, trace, request, events, signals, step_top, timing, extras={"repetition": repetition, "image": image,
                                                                                            "topk-view": topk_view})
    stored.nbytes = tensor_bytes(dict(run.cache.cache_dict)) + tensor_bytes(step_top) + (1 << 20)
    state.store.add(stored)
    return stored
