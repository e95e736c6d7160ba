"""Instruction keywords found by meaning, and an automated check of how much attention a
generated answer pays them.

Semantic match (`semantic_token_spans`): the keyword is represented by the model itself — the
mean of its tokens' input embeddings (layer None) or of their residual stream after block `layer`
when the keyword is run alone — and every position of the run by its token embedding or its
residual stream at that layer (from the run's cache); the score of a position is the cosine
similarity, in [−1, 1]. Positions scoring ≥ threshold, merged into runs of consecutive positions,
are the keyword's spans. No extra embedding model is downloaded.

`instruction_attention_check`: for each prompt, generate greedily and measure, per layer, the mean
over generated tokens (their producing states, as mechvis.analysis.dynamics) and heads of the
attention mass on the union of the keywords' positions in the prompt, in [0, 1]. A prompt's score
is the mean of that over layers; prompts scoring below `threshold` are flagged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechvis._validation import check_bool, check_real, shown
from mechvis.analysis.dynamics import keyword_dynamics
from mechvis.analysis.spans import find_token_spans, semantic_token_spans
from mechvis.errors import InvalidArgumentError
from mechvis.generation import generate
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



@dataclass
class InstructionCheck(Result):
    """Attention of each prompt's answer to its instruction keywords: `mass[p, ℓ]` (mean over
    generated tokens and heads, in [0, 1]), `score[p]` its mean over layers, `below` the prompts
    with score < threshold."""

    units = {'mass': 'probability', 'threshold': 'probability'}

    prompts: list[str]
    keywords: list[str]
    threshold: float
    layers: list[int]
    mass: Float[Tensor, "prompt layer"]
    answers: list[str]
    key_positions: list[list[int]] = field(default_factory=list)
    answer_ids: list[list[int]] = field(default_factory=list)

    @property
    def score(self) -> Float[Tensor, " prompt"]:
        return self.mass.mean(-1)

    @property
    def below(self) -> list[int]:
        return [index for index, value in enumerate(self.score.tolist()) if value < self.threshold]

    def table(self) -> list[dict]:
        """One row per prompt: prompt, keyword positions, answer, score, flagged, per-layer mass."""
        return [
            {"prompt": prompt, "keyword_positions": positions, "answer": answer, "score": float(self.score[i]),
             "below_threshold": i in self.below, "mass_per_layer": [float(v) for v in self.mass[i]]}
            for i, (prompt, positions, answer) in enumerate(zip(self.prompts, self.key_positions, self.answers))
        ]


def instruction_attention_check(
    model: "TransformerBridge",
    prompts: Sequence[str],
    keywords: Sequence[str],
    threshold: float,
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    match: str = "spelling",
    semantic_threshold: float = 0.5,
) -> InstructionCheck:
    """Generate an answer to each prompt and measure its attention to the keywords (module
    docstring). `match`: "spelling" (find_token_spans) or "semantic" (semantic_token_spans on the
    input embeddings). A prompt containing none of the keywords raises InvalidArgumentError."""

    for name, values in (("prompts", prompts), ("keywords", keywords)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise InvalidArgumentError(f"{name} must be a list (of strings); got {shown(values)}. For one, pass [{name[:-1]}].")
    if not prompts or not keywords:
        raise InvalidArgumentError("Give at least one prompt and one keyword.")
    threshold = check_real(threshold, "threshold", low=0.0, high=1.0, hint=" (an attention mass)")
    semantic_threshold = check_real(semantic_threshold, "semantic_threshold", low=-1.0, high=1.0, hint=" (a cosine similarity)")
    chat = check_bool(chat, "chat")
    if match not in ("spelling", "semantic"):
        raise InvalidArgumentError(f"match must be 'spelling' or 'semantic'; got {match!r}.")
    rows, answers, positions, answer_ids = [], [], [], []
    for prompt in tqdm(prompts, desc="instruction check", disable=len(prompts) < 3):
        trace = generate(model, prompt, chat=chat, max_new_tokens=max_new_tokens,
                         names_filter=lambda name: name.endswith("attn.hook_pattern"))
        spans = []
        for keyword in keywords:
            found = (find_token_spans(trace.run, keyword) if match == "spelling"
                     else semantic_token_spans(trace.run, keyword, threshold=semantic_threshold).spans)
            spans += [span for span in found if span.stop <= trace.prompt_length]
        if not spans:
            raise InvalidArgumentError(f"None of the keywords {list(keywords)} occurs in the prompt {prompt!r}.")
        dynamics = keyword_dynamics(trace, keyword_spans={"keywords": spans})
        rows.append(dynamics.mass["keywords"].mean(dim=(1, 2)))
        answers.append(trace.generated_text)
        answer_ids.append(list(trace.generated_ids))
        positions.append(dynamics.key_positions["keywords"])
    return InstructionCheck(list(prompts), list(keywords), threshold, list(range(model.cfg.n_layers)), torch.stack(rows), answers, positions, answer_ids)
