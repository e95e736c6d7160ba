"""Gradient-based attribution of a target token's log-probability: integrated gradients (Captum)
with respect to the input embeddings (for a VLM these include the image tokens, so the image-token
part is a map on the grid) and to the pixels, and attention × gradient relevancy (Chefer et al.
2021).

Target: f = log p(target | tokens[: position + 1]) = log_softmax(logits[position])[target], in
nats. Integrated gradients (Sundararajan et al. 2017): IG_i = (x_i − x'_i) ∫₀¹ ∂f(x' + α(x − x'))/∂x_i
dα, summed over the embedding dimension per token (over the channels per pixel); completeness:
Σ IG = f(x) − f(x') (Captum's convergence delta is the gap). Default baseline x' ("mean"): every
text position holds the mean of the text positions' embeddings and every image position the mean
of the image tokens' features (a uniform image): no information on which token is where, at the
input's scale. "pad" puts the pad (else end-of-sequence) token's embedding at every text
position. A zero baseline ("zero") is degenerate for RMSNorm / LayerNorm models: the normalised
input is constant along the path except near 0, where the gradient explodes (completeness failed
by ~40 % at 24 steps on a tiny Llama), and so may be a pad embedding initialised at 0.
The "input embeddings" are the residual stream entering the first block (blocks.0.hook_resid_pre):
the token embeddings (times the model's embedding scale, if any), with a VLM's image features
already merged in.

Relevancy (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers", eq. 5–6): R⁰ = I; for each layer ℓ in order,
Āℓ = mean_heads((∇Aℓ ⊙ Aℓ)⁺), Rℓ = Rℓ⁻¹ + Āℓ · Rℓ⁻¹, with ∇Aℓ = ∂f/∂Aℓ. The relevancy of token j
for the prediction at `position` is R[position, j] (R[position, position] keeps the identity's 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechvis._validation import check_positions, check_token_ids, integer
from mechvis.errors import InvalidArgumentError
from mechvis.images import encode_with_image
from mechvis.models.architecture import pattern_hook
from mechvis.results import Result
from mechvis.text import single_token_id
from mechvis.types import ImageGrid

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

EMBEDDING_HOOK = "blocks.0.hook_resid_pre"


@dataclass
class IntegratedGradients(Result):
    """IG of f = log p(target) at `position` (nats) per input token (summed over the embedding
    dimension), with the completeness check: Σ scores vs f(x) − f(baseline)."""

    units = {'scores': 'nats', 'value': 'nats', 'baseline_value': 'nats', 'delta': 'nats'}

    scores: Float[Tensor, " pos"]
    target_id: int
    position: int
    value: float  # f(x), nats
    baseline_value: float  # f(x'), nats
    delta: float  # Captum's convergence delta: Σ scores − (f(x) − f(x'))
    n_steps: int

    @property
    def relative_error(self) -> float:
        """|delta| / |f(x) − f(x')| (completeness holds to this fraction)."""
        return abs(self.delta) / max(abs(self.value - self.baseline_value), 1e-12)

    def on_grid(self, grid: ImageGrid) -> Float[Tensor, "row col"]:
        """The image tokens' scores as a rows × cols map."""
        return self.scores[list(grid.positions)].reshape(grid.rows, grid.cols)


def _checked(model: "TransformerBridge", tokens: Tensor, target: int | str, position: int, n_steps: int) -> tuple[Tensor, int, int]:
    if integer(n_steps) is None or integer(n_steps) < 1:
        raise InvalidArgumentError(f"n_steps (integration steps) must be a positive integer; got {n_steps!r}.")
    tokens = check_token_ids(model, tokens)
    (position,) = check_positions(tokens.shape[0], [position])
    return tokens.to(model.cfg.device), single_token_id(model, target), position


def _embeddings(model: "TransformerBridge", tokens: Tensor, extra: dict) -> Tensor:
    kept: dict[str, Tensor] = {}

    def keep(residual: Tensor, hook) -> None:
        kept["x"] = residual.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=[(EMBEDDING_HOOK, keep)], **extra)
    return kept["x"][0]


def _baseline(model: "TransformerBridge", tokens: Tensor, extra: dict, inputs: Tensor, kind: str) -> Tensor:
    config = model.original_model.config
    image_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    image = tokens == image_id if image_id is not None and extra else torch.zeros_like(tokens, dtype=torch.bool)
    if kind == "mean":
        reference = inputs.clone()
        reference[~image] = inputs[~image].mean(0)
    else:
        tokenizer = model.hf_tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        reference = _embeddings(model, torch.where(image, tokens, torch.full_like(tokens, pad)), extra)
    if image.any():
        reference[image] = inputs[image].mean(0)
    return reference


def integrated_gradients(
    model: "TransformerBridge",
    tokens: Int[Tensor, " pos"],
    target: int | str,
    *,
    position: int = -1,
    n_steps: int = 32,
    baseline: Float[Tensor, "pos d_model"] | str = "mean",
    extra: dict | None = None,
) -> IntegratedGradients:
    """Captum IntegratedGradients (Gauss–Legendre, `n_steps` points) of log p(target) at
    `position` with respect to the input embeddings (module docstring); `extra` are a VLM's image
    inputs (from mechvis.images.encode_with_image). One forward + backward per step (tqdm).

    Raises InvalidArgumentError for n_steps < 1, a bad position or a target that is not one token."""
    from captum.attr import IntegratedGradients as CaptumIG  # Captum takes ~3 s to import: loaded when used

    tokens, target_id, position = _checked(model, tokens, target, position, n_steps)
    extra = extra or {}
    inputs = _embeddings(model, tokens, extra)
    if isinstance(baseline, str):
        if baseline not in ("mean", "pad", "zero"):
            raise InvalidArgumentError(f"baseline must be 'mean', 'pad', 'zero' or a tensor of the embeddings' shape; got {baseline!r}.")
        reference = torch.zeros_like(inputs) if baseline == "zero" else _baseline(model, tokens, extra, inputs, baseline)
    else:
        reference = baseline.to(inputs)
    if reference.shape != inputs.shape:
        raise InvalidArgumentError(f"The baseline must have the embeddings' shape {tuple(inputs.shape)}; got {tuple(reference.shape)}.")
    bar = tqdm(total=n_steps + 2, desc="integrated gradients", disable=n_steps < 8, leave=False)

    def log_prob(embeddings: Tensor) -> Tensor:  # (batch, pos, d) → (batch,), one sequence at a time
        values = []
        for row in embeddings:
            logits = model.run_with_hooks(tokens[None], fwd_hooks=[(EMBEDDING_HOOK, lambda residual, hook, row=row: row[None])], **extra)
            values.append(logits[0, position].double().log_softmax(-1)[target_id])
            bar.update()
        return torch.stack(values)

    with torch.enable_grad():
        attributions, delta = CaptumIG(log_prob).attribute(
            inputs[None], baselines=reference[None], n_steps=n_steps, method="gausslegendre", return_convergence_delta=True
        )
        with torch.no_grad():
            ends = log_prob(torch.stack([inputs, reference]))
    bar.close()
    return IntegratedGradients(
        attributions[0].sum(-1).detach().float().cpu(), target_id, position, float(ends[0]), float(ends[1]), float(delta), n_steps
    )


@dataclass
class PixelAttribution(Result):
    """IG with respect to the pixels the vision tower sees (after the processor's resize and
    normalisation): `saliency` is the signed IG summed over channels, one value per pixel (nats)."""

    units = {'saliency': 'nats', 'value': 'nats', 'baseline_value': 'nats', 'delta': 'nats'}

    saliency: Float[Tensor, "height width"]
    value: float
    baseline_value: float
    delta: float

    @property
    def relative_error(self) -> float:
        return abs(self.delta) / max(abs(self.value - self.baseline_value), 1e-12)


def pixel_integrated_gradients(
    model: "TransformerBridge",
    prompt: str,
    image: object,
    target: int | str,
    *,
    position: int = -1,
    n_steps: int = 32,
    chat: bool = False,
) -> PixelAttribution:
    """Captum IG of log p(target) at `position` with respect to the processed pixel values (zero
    baseline: the processor's mean image), summed over channels: a saliency map on the processed
    image (height × width). LLaVA-style (batch, channel, height, width) pixel inputs only; Qwen-VL's
    flattened patches raise InvalidArgumentError."""
    from captum.attr import IntegratedGradients as CaptumIG  # Captum takes ~3 s to import: loaded when used


    encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    tokens, target_id, position = _checked(model, torch.tensor(encoded.token_ids), target, position, n_steps)
    pixels = extra.get("pixel_values")
    if pixels is None or pixels.ndim != 4:
        raise InvalidArgumentError("Pixel attribution maps (batch, channel, height, width) pixel inputs (LLaVA-style); this model's are not.")
    others = {key: value for key, value in extra.items() if key != "pixel_values"}

    def log_prob(values: Tensor) -> Tensor:
        out = [model(tokens[None], pixel_values=row[None], **others)[0, position].double().log_softmax(-1)[target_id] for row in values]
        return torch.stack(out)

    with torch.enable_grad():
        attributions, delta = CaptumIG(log_prob).attribute(
            pixels.float(), baselines=torch.zeros_like(pixels, dtype=torch.float), n_steps=n_steps, method="gausslegendre",
            return_convergence_delta=True,
        )
    with torch.no_grad():
        ends = log_prob(torch.cat([pixels.float(), torch.zeros_like(pixels, dtype=torch.float)]))
    return PixelAttribution(attributions[0].sum(0).detach().float().cpu(), float(ends[0]), float(ends[1]), float(delta))


@dataclass
class Relevancy(Result):
    """Chefer et al. 2021 relevancy of each token for log p(target) at `position` (module
    docstring); `matrix` is the final R (pos × pos)."""

    units = {'scores': 'relevancy (unitless)', 'matrix': 'relevancy (unitless)'}

    scores: Float[Tensor, " pos"]
    matrix: Float[Tensor, "pos pos"]
    target_id: int
    position: int

    def on_grid(self, grid: ImageGrid) -> Float[Tensor, "row col"]:
        return self.scores[list(grid.positions)].reshape(grid.rows, grid.cols)


def relevancy_update(patterns: Float[Tensor, "layer head pos pos"], gradients: Float[Tensor, "layer head pos pos"]) -> Float[Tensor, "pos pos"]:
    """R = Π-style accumulation of Chefer et al.'s rule R ← R + Ā R over layers, Ā = mean_h((∇A ⊙ A)⁺)."""
    contributions = (gradients.double() * patterns.double()).clamp_min(0).mean(1)  # (layer, pos, pos)
    relevance = torch.eye(patterns.shape[-1], dtype=torch.float64)
    for layer_contribution in contributions:  # a product over layers: sequential by definition
        relevance = relevance + layer_contribution @ relevance
    return relevance


def attention_gradient_relevancy(
    model: "TransformerBridge",
    tokens: Int[Tensor, " pos"],
    target: int | str,
    *,
    position: int = -1,
    extra: dict | None = None,
) -> Relevancy:
    """Relevancy from every layer's attention and its gradient of log p(target) at `position`
    (one forward + backward through the bridge; `extra`: a VLM's image inputs)."""
    tokens, target_id, position = _checked(model, tokens, target, position, 1)
    patterns: dict[int, Tensor] = {}

    def keep(pattern: Tensor, hook, layer: int) -> Tensor:
        pattern = pattern if pattern.requires_grad else pattern.detach().requires_grad_(True)
        patterns[layer] = pattern
        return pattern

    hooks = [(pattern_hook(layer), lambda pattern, hook, layer=layer: keep(pattern, hook, layer)) for layer in range(model.cfg.n_layers)]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks, **(extra or {}))
        value = logits[0, position].double().log_softmax(-1)[target_id]
        ordered = [patterns[layer] for layer in range(model.cfg.n_layers)]
        gradients = torch.autograd.grad(value, ordered, allow_unused=True)
    if all(gradient is None for gradient in gradients):
        raise InvalidArgumentError(
            "No gradient reaches this model's attention patterns: its attention is computed by the wrapped HF module "
            "(e.g. Qwen-VL's), so the pattern hooks are off the gradient path; relevancy is not available for it."
        )
    stacked = torch.stack([pattern[0].detach() for pattern in ordered]).cpu()
    grads = torch.stack([torch.zeros_like(p[0]) if g is None else g[0] for p, g in zip(ordered, gradients)]).cpu()
    matrix = relevancy_update(stacked, grads)
    return Relevancy(matrix[position].float(), matrix.float(), target_id, position)
