"""The model HF's generate decodes with: the HF modules the bridge wraps, with the CPU fast paths
(`kernels`, `lean`) where they were checked equal."""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch
from transformer_lens.hook_points import HookPoint

from mechvis.generation.decoding.kernels import (
    _grouped_config,
    _groups_queries,
    _halves_win,
    _SingleRowLinear,
)
from mechvis.generation.decoding.lean import acting_hooks, lean_decoding_equal, with_lean_steps

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge




def _decoder(model: "TransformerBridge", with_image: bool = False) -> "torch.nn.Module":
    """The model HF's KV-cached generate runs. With no hook on any of the bridge's hook points
    (no intervention active) and no image, the HF modules the bridge wraps, rebuilt around its
    components and sharing every parameter (hooks on HF modules stay), with float32 CPU
    `nn.Linear`s as `_SingleRowLinear` where that was measured faster, and lean single-token
    steps where the architecture has them (`_leaner`): the same logits up to rounding (≤ 1e-4).
    With a hook-point hook, the bridge itself, so it applies. With an image,
    the bridge too: a vision tower reads selected hidden states through transformers' output
    capturing, whose hooks and "installed" flag would not carry over to the rebuilt copy
    (LLaVA's image features came back empty when the copy decoded first)."""

    if with_image or any(
        isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks) for module in model.modules()
    ):
        return model.original_model
    return _leaner(model.original_model, _unwrapped(model.original_model))


def _leaner(root: "torch.nn.Module", decoder: "torch.nn.Module") -> "torch.nn.Module":
    """`decoder` with lean single-token decoding steps (`mechvis.generation.decoding.lean`) where its
    architecture has them and they were checked equal to HF's forward for `root`, else `decoder`."""
    lean = with_lean_steps(decoder)
    if lean is None or not lean_decoding_equal(root, decoder, lean):
        return decoder
    return lean


def prepare_decoding(model: "TransformerBridge") -> None:
    """Make the one-time measurements of fast decoding now (`_halves_win`, ~0.3 s for the
    embedded model on a 2-core machine) rather than in the first `generate` call: `mechvis
    serve` calls it after loading, so the first request's time to first token does not pay it."""
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        _halves_win(original)
        _grouped_attention_equal(original)
        _leaner(original, _unwrapped(original))


def _unwrapped(module: "torch.nn.Module", halves: bool | None = None, grouped: bool | None = None) -> "torch.nn.Module":
    """`module` with every bridge component replaced by the HF module it wraps and, where the
    halves product was measured faster for this model (`_halves_win`), every suitable `nn.Linear`
    by a `_SingleRowLinear`; where grouped-query attention was checked equal for this model
    (`_grouped_attention_equal`), eager attention modules run `_grouped_eager_attention` (shallow
    copies where something changes; parameters and buffers are shared, nothing is modified)."""
    if halves is None:
        halves = _halves_win(module)
    if grouped is None:
        grouped = _grouped_attention_equal(module)
    original = module._modules.get("_original_component")
    if original is not None:
        return _unwrapped(original, halves, grouped)
    if halves and type(module) is torch.nn.Linear and _SingleRowLinear.suits(module):
        clone = copy.copy(module)  # shares the parameters and any hooks
        clone.__class__ = _SingleRowLinear
        return clone
    children = {name: None if child is None else _unwrapped(child, halves, grouped) for name, child in module._modules.items()}
    regroup = grouped and _groups_queries(module)
    if not regroup and all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    object.__setattr__(clone, "_modules", children)
    if regroup:
        object.__setattr__(clone, "config", _grouped_config(module.config))
    return clone


_GROUPED_EQUAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _grouped_attention_equal(root: "torch.nn.Module") -> bool:
    """Whether `root` (an HF model, possibly holding bridge components) has grouped-query eager
    attention and gives the same logits (≤ 1e-4 of their scale) with `_grouped_eager_attention`
    as with transformers' own eager attention on a 12-token input: checked once per model, so
    an architecture whose eager attention does more than the standard one (attention sinks,
    other masks) keeps transformers' path. Not while a hook that could act is on the model's HF
    modules (False, not remembered)."""
    if root in _GROUPED_EQUAL:
        return _GROUPED_EQUAL[root]
    if acting_hooks(list(_unwrapped(root, halves=False, grouped=False).modules())):
        return False  # the check would feed a user's hooks random tokens: not now, and not remembered
    equal = False
    if any(_groups_queries(module) for module in root.modules()):
        vocab = getattr(getattr(root, "config", None), "vocab_size", None) or getattr(
            getattr(getattr(root, "config", None), "text_config", None), "vocab_size", None)
        try:
            ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
            device = next(root.parameters()).device
            with torch.inference_mode():
                plain = _unwrapped(root, halves=False, grouped=False)(input_ids=ids.to(device), use_cache=False).logits
                regrouped = _unwrapped(root, halves=False, grouped=True)(input_ids=ids.to(device), use_cache=False).logits
            equal = bool((regrouped - plain).abs().max() <= 1e-4 * plain.abs().max().clamp_min(1))
        except Exception:  # noqa: BLE001 - an architecture this check cannot run keeps transformers' path
            equal = False
    _GROUPED_EQUAL[root] = equal
    return equal
