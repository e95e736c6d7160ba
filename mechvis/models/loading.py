"""`load_model`: any supported causal LM as a transformer-lens 4.x `TransformerBridge`.

The bridge is returned in compatibility mode (`enable_compatibility_mode()`): HookedTransformer
hook names, `run_with_cache`, `ActivationCache`, and weights re-expressed the way
HookedTransformer did (LayerNorm folded, writing weights and unembedding centred). These leave
every log-probability unchanged; raw logits shift by a constant per position.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechvis.models import compat
from mechvis.errors import InvalidArgumentError, ModelNotFoundError, UnsupportedArchitectureError
from mechvis.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from mechvis.unembedding import recording_unembedding_mean

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def release_freed_memory() -> bool:
    """Hand the memory freed while loading back to the operating system (glibc's `malloc_trim`).

    Compatibility mode's weight processing (transformer-lens' `ProcessWeights`) copies every
    weight several times; glibc keeps the freed copies in its heap, which for the embedded model
    is ~0.4 GB of resident memory no tensor uses. Trimming changes no tensor. Returns whether
    anything was called (False off glibc: macOS, Windows, musl).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def supported_architectures() -> list[str]:
    """HF architecture class names mechvis can hook: transformer-lens' adapters and mechvis's
    Qwen2-VL shim, sorted."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    from mechvis.models.qwen2_vl import register

    register()
    return sorted(name for name, adapter in SUPPORTED_ARCHITECTURES.items() if _has_compatibility_mode(adapter))


def _has_compatibility_mode(adapter: type) -> bool:
    """Whether transformer-lens' adapter can run in compatibility mode, which mechvis needs (its
    VaultGemma adapter declares that it cannot: processed weights diverge from the reference)."""
    return bool(getattr(adapter, "supports_compatibility_mode", True))


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidArgumentError(
            f"dtype must be a floating-point torch dtype such as torch.float32, torch.bfloat16 "
            f"or 'float16'; got {dtype!r}."
        )
    return resolved


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidArgumentError(
            f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' or 'mps'."
        ) from error
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(resolved.type, False)
    if not available:
        raise InvalidArgumentError(
            f"device {device!r} is not available on this machine; use device='cpu' "
            f"(or leave device=None to pick the best available)."
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return resolved


def architecture_of(config: object) -> str:
    """The HF architecture class name of `config`, checked against what transformer-lens supports.

    Raises UnsupportedArchitectureError naming the supported architectures.
    """
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    supported = supported_architectures()
    try:
        architecture = determine_architecture_from_hf_config(config)
    except ValueError:
        architecture = None
    if architecture in SUPPORTED_ARCHITECTURES and not _has_compatibility_mode(SUPPORTED_ARCHITECTURES[architecture]):
        raise UnsupportedArchitectureError(
            f"mechvis cannot hook architecture {architecture!r}: transformer-lens' adapter for it does not support "
            f"compatibility mode (its processed weights are known to diverge from the reference model), and mechvis's "
            f"analyses need HookedTransformer-compatible hooks and weights. Use a model of a supported architecture: "
            f"{', '.join(supported)}."
        )
    if architecture not in supported:
        declared = getattr(config, "architectures", None) or getattr(config, "model_type", "unknown")
        raise UnsupportedArchitectureError(
            f"mechvis cannot hook architecture {declared!r}: transformer-lens has no adapter for it. "
            f"Use a model of a supported architecture: {', '.join(supported)}."
        )
    return architecture


def _load_config(name: str) -> object:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = "directory" if Path(name).is_dir() else "name"
        raise ModelNotFoundError(
            f"Could not find model {name!r}: it is not a local model directory and it could not be "
            f"fetched from the Hugging Face hub (offline, or no such repository). Pass a local "
            f"directory with config.json and weights, check the {where}, or call "
            f"load_model() with no name for the embedded {EMBEDDED_MODEL_NAME}. {_offline_advice()} ({error})"
        ) from error


def _offline_advice() -> str:
    """What to do about the hub, matching the environment: HF_HUB_OFFLINE already on (in the
    environment or as huggingface_hub read it at import) means the hub was never asked."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if value in ("1", "true", "yes", "on") or constants.is_offline_mode():
        return ("HF_HUB_OFFLINE is set, so only local files and the hub cache were searched: fetch the model "
                "on a connected machine (or unset HF_HUB_OFFLINE) to use a hub name.")
    return "Offline, set HF_HUB_OFFLINE=1 to skip the hub's retries."


def load_model(
    name: "str | os.PathLike[str] | PreTrainedModel | None" = None,
    *,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    processor: object | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> "TransformerBridge":
    """Load a causal LM as a hooked transformer (a `TransformerBridge` in compatibility mode).

    Args:
        name: `None` for the embedded SmolLM2-135M-Instruct (offline); a hub name or a local
            model directory; or an HF model object (then `tokenizer` is required). A model object
            is wrapped in place: the bridge re-expresses its weights (see module docstring).
        tokenizer: the tokenizer for a model object; optional otherwise.
        processor: a vision-language model's processor (images → pixel values and image tokens),
            needed for a model object; loaded with the model for hub names and directories.
        device: 'cpu', 'cuda', ...; None picks CUDA when available, else the CPU.
        dtype: floating-point dtype of the weights (a model object is cast to it).

    Returns:
        The bridge, in eval mode, with HookedTransformer hook names; `bridge.hf_tokenizer` is the
        model's own tokenizer (transformer-lens' `bridge.tokenizer` always prepends BOS).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    resolved_dtype = _resolve_dtype(dtype)
    resolved_device = _resolve_device(device)

    if isinstance(name, PreTrainedModel):
        if tokenizer is None:
            raise InvalidArgumentError(
                "A model object needs its tokenizer: load_model(model, tokenizer=tokenizer)."
            )
        if not getattr(name.config, "architectures", None):
            name.config.architectures = [type(name).__name__]  # as save_pretrained records it
        architecture_of(name.config)
        hf_model = name.to(device=resolved_device, dtype=resolved_dtype)
        # A model built from a config has no name; "<...>" is no hub repository id, so lookups of
        # files by this name (transformer-lens looks for a processor) fail at once, offline or not.
        model_name = getattr(name.config, "_name_or_path", "") or f"<{type(name).__name__} object>"
    elif name is None:
        directory = embedded_model_dir()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=resolved_dtype, attn_implementation="eager"
        ).to(resolved_device)
        model_name = EMBEDDED_MODEL_NAME
    elif isinstance(name, (str, os.PathLike)):
        model_name = os.fspath(name)
        if not model_name.strip():
            raise InvalidArgumentError("Model name is empty; pass a hub name, a directory, or None.")
        architecture_of(_load_config(model_name))
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_name)
        hf_model = None
    else:
        raise InvalidArgumentError(
            f"load_model takes a model name, a directory, an HF model object or None; "
            f"got {type(name).__name__}."
        )

    compat.apply()
    bridge = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, device=resolved_device, dtype=resolved_dtype
    )
    with recording_unembedding_mean(bridge):  # what centring the unembedding removes: the model's own logits
        bridge.enable_compatibility_mode(disable_warnings=True)
    release_freed_memory()
    bridge.eval()
    compat.check(bridge)
    # transformer-lens keeps a BOS-prepending copy as `bridge.tokenizer`; mechvis tokenises
    # with the model's own tokenizer so that inputs match the model's HF pipeline.
    bridge.hf_tokenizer = tokenizer
    if processor is not None:
        bridge.processor = processor
    return bridge
