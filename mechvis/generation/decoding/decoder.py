"""The model HF's generate decodes with: the HF modules the bridge wraps, with the CPU fast paths
(`halves`, `grouped`, `lean`) where each was checked equal, and none of them while
`mechvis.config(fast_decoding=False)`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformer_lens.hook_points import HookPoint

from mechvis.config import get as setting
from mechvis.generation.decoding.grouped import grouped_config, groups_queries
from mechvis.generation.decoding.halves import SingleRowLinear, halves_win
from mechvis.generation.decoding.lean import acting_hooks, lean_decoding_equal, with_lean_steps
from mechvis.generation.decoding.memo import VERIFIED

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def decoding_model(model: "TransformerBridge", with_image: bool = False) -> torch.nn.Module:
    """The model HF's KV-cached generate runs. With no hook on any of the bridge's hook points
    (no intervention active) and no image, the HF modules the bridge wraps, rebuilt around its
    components and sharing every parameter (hooks on HF modules stay) — with the fast paths
    where checked (`_unwrapped`, `_leaner`; the same logits up to rounding, ≤ 1e-4) unless
    `mechvis.config(fast_decoding=False)`. With a hook-point hook, the bridge itself, so it
    applies. With an image, the bridge too: a vision tower reads selected hidden states through
    transformers' output capturing, whose hooks and "installed" flag would not carry over to the
    rebuilt copy (LLaVA's image features came back empty when the copy decoded first)."""
    if with_image or any(
        isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks) for module in model.modules()
    ):
        return model.original_model
    if not setting("fast_decoding"):
        return _unwrapped(model.original_model, halves=False, grouped=False)
    return _leaner(model.original_model, _unwrapped(model.original_model))


def _leaner(root: torch.nn.Module, decoder: torch.nn.Module) -> torch.nn.Module:
    """`decoder` with lean single-token decoding steps (`lean`) where its architecture has them
    and they were checked equal to HF's forward for `root`, else `decoder`."""
    lean = with_lean_steps(decoder) if setting("fast_decoding") else None
    if lean is None or not lean_decoding_equal(root, decoder, lean):
        return decoder
    return lean


def prepare_decoding(model: "TransformerBridge") -> None:
    """Make the one-time checks of fast decoding now (`halves_win` ~0.3 s for the embedded model
    on a 2-core machine; the grouped-attention and lean checks) rather than in the first
    `generate` call: `mechvis serve` calls it after loading, so the first request's time to first
    token does not pay them. Nothing while `mechvis.config(fast_decoding=False)`."""
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module) and setting("fast_decoding"):
        halves_win(original)
        _grouped_attention_equal(original)
        _leaner(original, _unwrapped(original))


def _unwrapped(module: torch.nn.Module, halves: bool | None = None, grouped: bool | None = None) -> torch.nn.Module:
    """`module` with every bridge component replaced by the HF module it wraps; where `halves`
    (default: the halves product was measured faster for this model, `halves_win`), every
    suitable `nn.Linear` by a `SingleRowLinear`; where `grouped` (default: checked equal for this
    model, `_grouped_attention_equal`), eager attention modules run `_grouped_eager_attention`.
    Both default to False while `mechvis.config(fast_decoding=False)`. Shallow copies where
    something changes; parameters and buffers are shared, nothing is modified."""
    if halves is None:
        halves = setting("fast_decoding") and halves_win(module)
    if grouped is None:
        grouped = setting("fast_decoding") and _grouped_attention_equal(module)
    original = module._modules.get("_original_component")
    if original is not None:
        return _unwrapped(original, halves, grouped)
    if halves and type(module) is torch.nn.Linear and SingleRowLinear.suits(module):
        clone = copy.copy(module)  # shares the parameters and any hooks
        clone.__class__ = SingleRowLinear
        return clone
    children = {name: None if child is None else _unwrapped(child, halves, grouped) for name, child in module._modules.items()}
    regroup = grouped and groups_queries(module)
    if not regroup and all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    object.__setattr__(clone, "_modules", children)
    if regroup:
        object.__setattr__(clone, "config", grouped_config(module.config))
    return clone


def _grouped_attention_equal(root: torch.nn.Module) -> bool:
    """Whether `root` (an HF model, possibly holding bridge components) has grouped-query eager
    attention and gives the same logits (≤ 1e-4 of their scale) with `_grouped_eager_attention`
    as with transformers' own eager attention on a 12-token input: checked once per model
    (`VERIFIED`, "grouped"), so an architecture whose eager attention does more than the standard
    one (attention sinks, other masks) keeps transformers' path. Not while a hook that could act
    is on the model's HF modules (False, not remembered)."""
    return VERIFIED.verified("grouped", None, lambda: _grouped_logits_equal(root), model=root)


def _grouped_logits_equal(root: torch.nn.Module) -> bool | None:
    if acting_hooks(list(_unwrapped(root, halves=False, grouped=False).modules())):
        return None  # the check would feed a user's hooks random tokens: not now, and not remembered
    if not any(groups_queries(module) for module in root.modules()):
        return False
    config = getattr(root, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    try:
        ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
        device = next(root.parameters()).device
        with torch.inference_mode():
            plain = _unwrapped(root, halves=False, grouped=False)(input_ids=ids.to(device), use_cache=False).logits
            regrouped = _unwrapped(root, halves=False, grouped=True)(input_ids=ids.to(device), use_cache=False).logits
        return bool((regrouped - plain).abs().max() <= 1e-4 * plain.abs().max().clamp_min(1))
    except Exception:  # noqa: BLE001 - an architecture this check cannot run keeps transformers' path
        return False
