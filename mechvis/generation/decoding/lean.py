"""Lean decoding steps: one token of KV-cached decoding of a Llama-family model computed with a
few tensor operations per layer instead of HF's modules, on the preallocated KV cache (`cache`).
Reference: the HF model's own forward (its decoder layers' `forward`, modeling_llama.py), to
≤ 1e-4 of the logits' scale, checked per model at first use (`lean_decoding_equal`).

HF's decoder runs ~60 module and helper calls per layer per token (masks, keyword plumbing,
deprecation wrappers, attention-interface look-ups, `nn.Module.__call__`). For the embedded model
(30 layers, 135M parameters, float32 on 2 CPU cores) a decoding step took 35–39 ms of which
reading the weights is ~20 ms; the same step computed here takes ~28 ms, with logits equal to
HF's (max difference 0.0 in the measurement that motivated it).

Where it applies, and only there (anything else runs HF's forward unchanged):
- the model is one of `LEAN_MODELS` (Llama, Qwen2, Mistral decoders: pre-norm RMSNorm, rotary
  positions, grouped-query attention, gated MLP), with exactly those submodules (no q/k norms,
  no extra norms), each of its modeling file's own class (or `nn.Linear`, `nn.Embedding`, an
  activation) with no forward replaced on an instance, eager (or SDPA) attention, float32
  weights, eval mode, no sliding window and no attention soft-capping;
- the step is one token of batch 1 after a prefill, into a cache of `_PreallocatedLayer`s, with
  an all-ones attention mask and the next position;
- no forward hook or pre-hook on any module it would run (the repetition monitor's hooks, a
  user's hooks: HF's modules run, so the hooks fire);
- and, once per model and set of module classes, its logits equal HF's forward (≤ 1e-4 of their
  scale) on 4 decoding steps after an 8-token prefill (`lean_decoding_equal`; not while a hook
  could act).

The lean step reproduces HF's Llama decoder computation (modeling_llama.py): x = RMSNorm(h);
q, k, v = projections; rotary positions with the model's own `rotary_emb` and
`apply_rotary_pos_emb`; softmax(q·kᵀ · head_dim^-½) · v over the cache (float32 softmax); h += o_proj;
h += down(act(gate(RMSNorm(h))) · up(RMSNorm(h))); final RMSNorm. The lm_head stays HF's outer forward.
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.modules import module as module_module
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import _active_collector

from mechvis.generation.decoding.cache import all_preallocated, new_preallocated_cache
from mechvis.generation.decoding.halves import as_column
from mechvis.generation.decoding.memo import VERIFIED

LEAN_MODELS = frozenset({"LlamaModel", "Qwen2Model", "MistralModel"})
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MODEL_CHILDREN = {"embed_tokens", "layers", "norm", "rotary_emb"}
_ALLOWED_KEYWORDS = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                     "cache_position", "inputs_embeds", "return_dict", "output_attentions", "output_hidden_states"}


@dataclass(frozen=True)
class _Layer:
    index: int
    norm1: Tensor
    eps1: float
    q: Callable[[Tensor | None, Tensor], Tensor]  # (column, x) -> x · Wᵀ + b, see `_product`
    k: Callable[[Tensor | None, Tensor], Tensor]
    v: Callable[[Tensor | None, Tensor], Tensor]
    o: Callable[[Tensor | None, Tensor], Tensor]
    norm2: Tensor
    eps2: float
    gate: Callable[[Tensor | None, Tensor], Tensor]
    up: Callable[[Tensor | None, Tensor], Tensor]
    down: Callable[[Tensor | None, Tensor], Tensor]
    act: Callable[[Tensor], Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def _product(linear: torch.nn.Linear) -> Callable[[Tensor | None, Tensor], Tensor]:
    """`linear`'s one-row product as a function of (column, x): where mechvis chose the halves
    product for this model (`SingleRowLinear`, marked `one_row_halves`), the same batched product
    over the weight's two halves as `_halves_product`, with `column` the input laid out as it lays
    it out (`as_column`, made once for the projections that share an input); else `F.linear(x)`."""
    weight, bias = linear.weight, linear.bias
    if getattr(linear, "one_row_halves", False):
        out_features = linear.out_features
        halves = weight.view(2, out_features // 2, linear.in_features)

        def halves_product(column: Tensor | None, x: Tensor) -> Tensor:
            y = torch.bmm(halves, column).view(1, 1, out_features)
            return y if bias is None else y + bias

        return halves_product
    return lambda column, x: torch.nn.functional.linear(x, weight, bias)


class _Plan:
    """What a lean step of one inner model (`LlamaModel` and kin) reads: its layers' weights and
    functions, and every module whose hooks must send a step back to HF's forward."""

    def __init__(self, inner: torch.nn.Module, layers: list[_Layer], rope: Callable, modules: list[torch.nn.Module],
                 halves: bool):
        self.inner, self.layers, self.rope, self.modules = inner, layers, rope, modules
        self.halves = halves
        self.steps = 0  # lean steps this plan computed (the check counts its own, whatever other threads do)
        self.hidden = inner.norm.weight.shape[0]
        self.final_eps = float(inner.norm.variance_epsilon)

        self.output_type = BaseModelOutputWithPast
        fields = getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})
        self.cache_field = "cache" if "cache" in fields else "past_key_values"

    def hooked(self) -> bool:
        """Whether a hook that could act is on any module the step runs (`acting_hooks`)."""
        return acting_hooks(self.modules)

    def cache_of(self, args: tuple, kwargs: dict):
        """The cache of a call the lean step computes exactly, else None."""
        if args or not set(kwargs) <= _ALLOWED_KEYWORDS or kwargs.get("inputs_embeds") is not None:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False:
            return None
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(ids, Tensor) or ids.shape != (1, 1) or not all_preallocated(cache):
            return None
        length = cache.get_seq_length()
        if length < 1 or any(layer.get_seq_length() != length for layer in cache.layers):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != (1, length + 1) or not bool(mask.all())):
            return None
        for name in ("position_ids", "cache_position"):
            position = kwargs.get(name)
            if position is not None and (not isinstance(position, Tensor) or position.numel() != 1 or int(position) != length):
                return None
        if self.hooked():
            return None
        return cache

    def step(self, ids: Tensor, cache) -> Tensor:
        """The final-normed hidden state (1, 1, d_model) of token `ids` at the next position: what
        the inner model's `forward` (`LlamaModel.forward` and kin) returns as `last_hidden_state`."""
        rms_norm, softmax, matmul = torch.nn.functional.rms_norm, torch.nn.functional.softmax, torch.matmul
        inner, width = self.inner, (self.hidden,)
        length = cache.get_seq_length()
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, torch.tensor([[length]], device=ids.device))
        column = as_column if self.halves else lambda x: None
        for layer in self.layers:
            heads, kv_heads, head_dim = layer.heads, layer.kv_heads, layer.head_dim
            x = rms_norm(h, width, layer.norm1, layer.eps1)
            x_column = column(x)
            q = layer.q(x_column, x).view(1, 1, heads, head_dim).transpose(1, 2)
            k = layer.k(x_column, x).view(1, 1, kv_heads, head_dim).transpose(1, 2)
            v = layer.v(x_column, x).view(1, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            keys, values = cache.update(k, v, layer.index)
            # Query head h reads key/value head h // group: each key/value head's queries are rows of one product.
            scores = matmul(q.reshape(1, kv_heads, heads // kv_heads, head_dim), keys.transpose(2, 3)) * layer.scaling
            weights = softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attended = matmul(weights, values).reshape(1, 1, heads * head_dim)
            h = h + layer.o(column(attended), attended)
            x = rms_norm(h, width, layer.norm2, layer.eps2)
            x_column = column(x)
            gated = layer.act(layer.gate(x_column, x)) * layer.up(x_column, x)
            h = h + layer.down(column(gated), gated)
        self.steps += 1
        VERIFIED.count("lean_steps")
        return rms_norm(h, width, inner.norm.weight, self.final_eps)


def _plan(inner: torch.nn.Module) -> _Plan | None:
    """The plan for `inner` (an HF inner decoder model), or None where the lean step does not
    compute what its forward does (see the module docstring). Projections compute what their
    module's `forward` does (`_product`), without `__call__`: a step with a hook anywhere runs
    HF's forward instead."""
    config = getattr(inner, "config", None)
    if type(inner).__name__ not in LEAN_MODELS or set(inner._modules) != _MODEL_CHILDREN or config is None:
        return None
    if inner.training:  # dropout would act in HF's forward
        return None
    family = type(inner).__module__  # the modeling file: every other module must be its class, unchanged
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return None
    if any(parameter.dtype != torch.float32 for parameter in inner.parameters()):
        return None
    if not all(_is_rms_norm(norm) for norm in [inner.norm]):
        return None
    layers, modules, rope = [], [inner, inner.embed_tokens, inner.rotary_emb, inner.norm, inner.layers], None
    for index, layer in enumerate(inner.layers):
        attention, mlp = layer._modules.get("self_attn"), layer._modules.get("mlp")
        if set(layer._modules) != _LAYER_CHILDREN or set(attention._modules) != _ATTENTION_CHILDREN:
            return None
        if not {"gate_proj", "up_proj", "down_proj"} <= set(mlp._modules) <= {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            return None
        projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(isinstance(linear, torch.nn.Linear) for linear in projections):
            return None
        if not (_is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm)):
            return None
        if getattr(attention, "layer_idx", None) != index or getattr(attention, "sliding_window", None):
            return None
        head_dim, scaling = getattr(attention, "head_dim", None), getattr(attention, "scaling", None)
        groups, act = getattr(attention, "num_key_value_groups", None), getattr(mlp, "act_fn", None)
        if not (isinstance(head_dim, int) and isinstance(scaling, float) and isinstance(groups, int) and callable(act)):
            return None
        heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
        if heads != kv_heads * groups or attention.v_proj.out_features != kv_heads * head_dim:
            return None
        layer_rope = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        if not callable(layer_rope) or (rope is not None and layer_rope is not rope):
            return None
        rope = layer_rope
        layers.append(_Layer(
            index, layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
            *(_product(linear) for linear in projections[:4]),
            layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
            *(_product(linear) for linear in projections[4:]), act, heads, kv_heads, head_dim, scaling,
        ))
        modules += [layer, attention, mlp, layer.input_layernorm, layer.post_attention_layernorm, *projections]
        if isinstance(act, torch.nn.Module):
            modules.append(act)
    if not layers or len(layers) != getattr(config, "num_hidden_layers", len(layers)):
        return None
    if not _unchanged(modules, family):
        return None
    halves = any(getattr(module, "one_row_halves", False) for module in modules)  # a column is laid out for them
    return _Plan(inner, layers, rope, modules, halves)


def acting_hooks(modules) -> bool:
    """Whether a forward hook or pre-hook that could act is on any of `modules` (or registered
    globally). transformers' output-capturing hooks are not: `capture_outputs` installs them on
    decoder layers and attention modules on first use and leaves them, and they return at once
    while no output collector is active (checked here)."""

    if any(getattr(module_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return True
    collecting = None
    for module in modules:
        if module._forward_pre_hooks:
            return True
        for hook in module._forward_hooks.values():
            if not _is_output_capturing(hook):
                return True
            if collecting is None:
                collecting = _collector_active()
            if collecting:
                return True
    return False


_ATTENTION_IMPLEMENTATIONS = {"eager", "sdpa", "mechvis_grouped_eager"}  # what the lean step computes (up to rounding)


def _unchanged(modules: list, family: str) -> bool:
    """Whether every module is of a class the lean step reproduces, with no forward replaced on
    the instance: the family's own classes (layers, attention, MLP, norms, rotary embedding),
    `nn.Linear` (or mechvis's `SingleRowLinear`), `nn.Embedding` and transformers' or torch's
    activations; and whether attention runs an implementation computing eager attention. A
    subclass, a patched instance or another attention function runs HF's forward."""
    for module in modules:
        kind = type(module)
        if "forward" in module.__dict__:
            return False
        if kind in (torch.nn.Linear, torch.nn.Embedding, torch.nn.ModuleList) or getattr(kind, "one_row_halves", False):
            continue
        if kind.__module__ not in (family, "transformers.activations", "torch.nn.modules.activation"):
            return False
        config = module.__dict__.get("config")
        if hasattr(module, "q_proj") and getattr(config, "_attn_implementation", None) not in _ATTENTION_IMPLEMENTATIONS:
            return False
    return True


def plan_signature(modules: list) -> tuple:
    """What the equality check's result depends on besides the weights: each module's class and
    that class's forward (a class patched after the check gets a new check)."""
    return tuple(sorted({(id(type(module)), id(type(module).forward)) for module in modules}))


def _is_output_capturing(hook: object) -> bool:
    return (getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", None) == "output_capturing_hook")


def _collector_active() -> bool:
    """Whether transformers' output collector is set in this context (True where it cannot be
    read: another transformers layout, so the hooks count as acting)."""
    try:
        return _active_collector.get() is not None
    except Exception:  # noqa: BLE001
        return True


def _is_rms_norm(module: object) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), Tensor)
            and getattr(module, "weight").dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)
            and set(module._modules) == set())


def _lean_forward(self: torch.nn.Module, *args, **kwargs):
    """The inner model's forward: a lean step where `_Plan.cache_of` says it applies, else HF's."""
    plan: _Plan = self.__dict__["_mechvis_lean_plan"]
    cache = plan.cache_of(args, kwargs)
    if cache is None:
        return type(self).forward(self, *args, **kwargs)
    hidden = plan.step(kwargs["input_ids"], cache)
    return plan.output_type(last_hidden_state=hidden, **{plan.cache_field: cache})


def with_lean_steps(decoder: torch.nn.Module) -> torch.nn.Module | None:
    """A shallow copy of `decoder` (an HF causal LM, already a copy made for decoding) whose inner
    model computes single-token decoding steps lean, or None where `_plan` refuses it. Nothing of
    `decoder` is modified; parameters and hooks are shared."""

    prefix = getattr(decoder, "base_model_prefix", None)
    inner = decoder._modules.get(prefix) if isinstance(prefix, str) else None
    if inner is None:
        return None
    plan = _plan(inner)
    if plan is None:
        return None
    lean_inner = copy.copy(inner)
    object.__setattr__(lean_inner, "_modules", dict(inner._modules))  # its own dict: the copy's attributes stay its own
    lean_inner.__dict__["_mechvis_lean_plan"] = plan
    lean_inner.__dict__["forward"] = types.MethodType(_lean_forward, lean_inner)
    plan.inner = lean_inner
    clone = copy.copy(decoder)
    object.__setattr__(clone, "_modules", {**decoder._modules, prefix: lean_inner})
    return clone


def lean_decoding_equal(root: torch.nn.Module, decoder: torch.nn.Module, lean: torch.nn.Module) -> bool:
    """Whether `lean` (`with_lean_steps(decoder)`) takes the lean step and gives `decoder`'s logits
    (≤ 1e-4 of their scale) on 4 decoding steps after an 8-token prefill of random tokens:
    checked once per `root` (the model both were made from) and `plan_signature` (its modules'
    classes and their forwards), remembered in `VERIFIED` ("lean"). While a hook that could act
    is on a module the step runs, no check runs (it would feed the hook random tokens, and the
    steps would not be lean): False, not remembered."""
    plan: _Plan = lean._modules[lean.base_model_prefix].__dict__["_mechvis_lean_plan"]
    if plan.hooked():
        return False
    return VERIFIED.verified("lean", plan_signature(plan.modules), lambda: _steps_equal(plan, decoder, lean), model=root)


def _steps_equal(plan: "_Plan", decoder: torch.nn.Module, lean: torch.nn.Module) -> bool:
    try:
        vocab = decoder.config.get_text_config(decoder=True).vocab_size
        ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(decoder.parameters()).device)
        with torch.inference_mode():
            (name, plain_cache), (_, lean_cache) = new_preallocated_cache(decoder, 12), new_preallocated_cache(decoder, 12)
            ones = torch.ones_like(ids)
            decoder(input_ids=ids[:, :8], attention_mask=ones[:, :8], use_cache=True, **{name: plain_cache})
            lean(input_ids=ids[:, :8], attention_mask=ones[:, :8], use_cache=True, **{name: lean_cache})
            before = plan.steps
            equal = True
            for position in range(8, 12):
                step = {"input_ids": ids[:, position : position + 1], "attention_mask": ones[:, : position + 1], "use_cache": True}
                plain = decoder(**step, **{name: plain_cache}).logits
                fast = lean(**step, **{name: lean_cache}).logits
                equal &= bool((fast - plain).abs().max() <= 1e-4 * plain.abs().max().clamp_min(1))
            return equal and plan.steps - before == 4
    except Exception:  # noqa: BLE001 - a model this check cannot run keeps HF's path
        return False
