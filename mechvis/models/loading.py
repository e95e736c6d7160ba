"""`load_model`: any supported causal LM as a transformer-lens 4.x `TransformerBridge`.

The bridge is returned in compatibility mode (`enable_compatibility_mode()`): HookedTransformer
hook names, `run_with_cache`, `ActivationCache`, and weights re-expressed the way
HookedTransformer did (LayerNorm folded, writing weights and unembedding centred). These leave
every log-probability unchanged; raw logits shift by a constant per position.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import constants
from safetensors import SafetensorError
from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
from transformer_lens.weight_processing import ProcessWeights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mechvis.errors import CorruptModelFileError, InvalidArgumentError, ModelNotFoundError, UnsupportedArchitectureError
from mechvis.models import compat
from mechvis.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from mechvis.models.qwen2_vl import register
from mechvis.models.unembedding import recording_unembedding_mean

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def _libc():
    """glibc's C library through ctypes, or None (macOS, Windows, musl: no malloc_trim/mallopt)."""

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both glibc-only
    except (OSError, AttributeError):
        return None
    return libc


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic threshold ends up with large tensors


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, every allocation of `threshold` bytes or more gets its own memory mapping
    (glibc `mallopt(M_MMAP_THRESHOLD)`), returned to the OS as soon as it is freed; afterwards the
    threshold is 32 MiB and freed memory is trimmed (`release_freed_memory`).

    glibc serves allocations below a threshold from its heap; the threshold starts at 128 KiB and
    rises to the size of any larger mapped block freed (up to 32 MiB), which torch's tensors do at
    once. A computation that allocates and frees many tensors of 1–32 MiB of varying sizes (query
    blocks over a growing number of keys) then fragments the heap, and how much resident memory
    stays stranded varies between identical runs. Mapped allocations cannot fragment. No tensor
    value changes; off glibc this does nothing. (glibc cannot return to its dynamic threshold
    once one is set: after the block the threshold stays fixed at 32 MiB, the dynamic one's ceiling.)"""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        release_freed_memory()


def release_freed_memory() -> bool:
    """Hand the memory freed while loading back to the operating system (glibc's `malloc_trim`).

    Compatibility mode's weight processing (transformer-lens' `ProcessWeights`) copies every
    weight several times; glibc keeps the freed copies in its heap, which for the embedded model
    is ~0.4 GB of resident memory no tensor uses. Trimming changes no tensor. Returns whether
    anything was called (False off glibc: macOS, Windows, musl).
    """

    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return True


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (/proc/self/maps; empty off Linux)."""
    try:
        with open("/proc/self/maps") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0" and not fields[5].startswith("["):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def copy_weights_out_of_files(module: torch.nn.Module) -> int:
    """Give every parameter and buffer of `module` that still lives in a memory-mapped weights
    file (transformers maps safetensors files) its own memory; returns the bytes copied.

    Weight processing replaces most weights with new tensors, but those it leaves as they were
    (the embedding, W_out of the embedded model: 0.22 GB) keep the whole file's mapping alive,
    and every page of it that processing read stays resident: 0.54 GB of file pages next to the
    processed copies. Copying those tensors out (one storage at a time, views and tied weights
    kept sharing it) lets the mapping go. The copies are exact. Off Linux nothing is copied."""
    ranges = _file_mapped_ranges()
    if not ranges:
        return 0
    groups: dict[int, list[torch.Tensor]] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for submodule in module.modules():
        for tensor in (*submodule._parameters.values(), *submodule._buffers.values()):
            if tensor is None or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if any(start <= pointer < end for start, end in ranges):
                storages[pointer] = storage
                groups.setdefault(pointer, []).append(tensor)
    copied = 0
    with torch.no_grad():
        for pointer, tensors in groups.items():
            copy = storages.pop(pointer).clone()
            for tensor in tensors:
                tensor.data = torch.empty((), dtype=tensor.dtype).set_(copy, tensor.storage_offset(), tensor.size(), tensor.stride())
            copied += copy.nbytes()
            del copy
    return copied


# Every name transformer-lens 4.3's `ProcessWeights.fold_layer_norm` body uses: the lighter version
# below runs the same steps and is used only while the original still uses exactly these.
_FOLD_LAYER_NORM_NAMES = frozenset({"items", "getattr", "range", "n_layers", "ProcessWeights", "_fold_layer",
                                    "_fold_final_rms_bias", "_fold_unembed_layer_norm"})


def _fold_layer_norm_without_copy(original):
    """transformer-lens' `fold_layer_norm` without its opening copy of every weight.

    The original clones the whole state dict ("to avoid modifying the original"), then folds each
    layer with `_fold_layer` and the final norm with `_fold_final_rms_bias` and
    `_fold_unembed_layer_norm`, each of which puts NEW tensors into the dict and writes into none.
    So the clone only costs memory: at the peak of loading it doubles the weights the fold never
    changes (embedding, W_O, W_out: 0.26 GB of the embedded model's 0.62 GB). This runs the same
    three steps on a shallow copy of the dict (same arithmetic on the same tensors: bit-identical),
    and checks with torch's version counters that no input tensor was written into (which would
    be the model's own weights); if one was, it raises rather than return a silently different
    model. Falls back to the original when its body calls anything else (another transformer-lens)."""

    if frozenset(original.__code__.co_names) != _FOLD_LAYER_NORM_NAMES:
        return original

    def fold_layer_norm(state_dict, cfg, fold_biases=True, center_weights=True, adapter=None):
        versions = {key: value._version for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
        folded = dict(state_dict)
        gqa = "" if getattr(cfg, "n_key_value_heads", None) is None else "_"
        for layer in range(cfg.n_layers):
            folded = ProcessWeights._fold_layer(folded, cfg, layer, fold_biases, center_weights, adapter, gqa)
        folded = ProcessWeights._fold_final_rms_bias(folded, cfg, fold_biases, adapter)
        folded = ProcessWeights._fold_unembed_layer_norm(folded, cfg, fold_biases, center_weights, adapter)
        written = [key for key, version in versions.items() if state_dict[key]._version != version]
        if written:
            raise RuntimeError(
                f"transformer-lens' layer-norm folding wrote into the model's weights ({', '.join(written[:5])}): "
                f"mechvis's lighter folding assumes it never does. Report this with your transformer-lens version."
            )
        return folded

    return fold_layer_norm


def _fold_value_biases_on_attention_only(original):
    """transformer-lens' `fold_value_biases` given only the attention entries of the state dict.

    The function clones every tensor it gets and reads and writes only attention weights and biases
    (b_V, W_O, b_O of each layer); given the whole dict it copies all weights once more at the peak
    of loading, also for models without value biases (Llama: nothing to fold). Given only the keys
    with ".attn." it computes the same values; its result is merged into the whole dict. If it fails
    on the reduced dict, or adds or drops entries outside attention, the whole dict is used."""

    def fold_value_biases(state_dict, cfg, adapter=None):
        reduced = {key: value for key, value in state_dict.items() if ".attn." in key}
        try:
            folded = original(reduced, cfg, adapter=adapter)
        except Exception:  # noqa: BLE001 - same weights, the original call
            return original(state_dict, cfg, adapter=adapter)
        if not set(reduced) <= set(folded) or any(".attn." not in key for key in set(folded) - set(reduced)):
            return original(state_dict, cfg, adapter=adapter)
        return {**state_dict, **folded}

    return fold_value_biases


@contextlib.contextmanager
def lighter_weight_processing() -> Iterator[None]:
    """Around `bridge.enable_compatibility_mode()`: transformer-lens' weight processing with fewer
    whole-model copies alive at once (`_fold_layer_norm_without_copy`,
    `_fold_value_biases_on_attention_only`). Every processed weight is bit-identical
    (tests/test_bridge_memory.py); the loading peak of the embedded model falls from 2.8 to ~2.2 GB."""

    originals = {name: ProcessWeights.__dict__[name] for name in ("fold_layer_norm", "fold_value_biases")}
    ProcessWeights.fold_layer_norm = staticmethod(_fold_layer_norm_without_copy(originals["fold_layer_norm"].__func__))
    ProcessWeights.fold_value_biases = staticmethod(_fold_value_biases_on_attention_only(originals["fold_value_biases"].__func__))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(ProcessWeights, name, original)


def supported_architectures() -> list[str]:
    """HF architecture class names mechvis can hook: transformer-lens' adapters and mechvis's
    Qwen2-VL shim, sorted."""


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
    directory = Path(name)
    if directory.is_dir():  # a local folder: say what is wrong with it, not that the hub failed too
        config = directory / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(
                f"{name} is a directory but not a model: it has no config.json. A model directory holds "
                f"config.json, the weights and the tokenizer files, as save_pretrained writes them."
            )
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"{config} cannot be read as JSON ({_first_line(error)}); is the model copied whole?") from error
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = "directory" if directory.is_dir() else "name"
        raise ModelNotFoundError(
            f"Could not find model {name!r}: it is not a local model directory and it could not be "
            f"fetched from the Hugging Face hub (offline, or no such repository). Pass a local "
            f"directory with config.json and weights, check the {where}, or call "
            f"load_model() with no name for the embedded {EMBEDDED_MODEL_NAME}. {_offline_advice()} ({error})"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _raise_weights_error(model_name: str, error: BaseException) -> None:
    """A clear error for a named model whose weights are missing (OSError from transformers) or
    unreadable (safetensors' error on a truncated or damaged file); other errors pass through."""

    if isinstance(error, SafetensorError):
        raise CorruptModelFileError(
            f"The weights of {model_name!r} cannot be read ({_first_line(error)}): the file is truncated or "
            f"damaged. Copy or download it again."
        ) from error
    if isinstance(error, OSError):
        raise ModelNotFoundError(
            f"Could not load the weights of {model_name!r}: {_first_line(error)}. A model directory needs its "
            f"weights (model.safetensors, or sharded files with their index) beside config.json."
        ) from error


def _offline_advice() -> str:
    """What to do about the hub, matching the environment: HF_HUB_OFFLINE already on (in the
    environment or as huggingface_hub read it at import) means the hub was never asked."""

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
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_name)
            except (OSError, ValueError, TypeError) as error:
                raise ModelNotFoundError(
                    f"Could not load the tokenizer of {model_name!r}: {_first_line(error)}. A model directory "
                    f"needs its tokenizer files (tokenizer.json or tokenizer_config.json with the vocabulary) "
                    f"beside config.json, as save_pretrained writes them; or pass tokenizer=."
                ) from error
        hf_model = None
    else:
        raise InvalidArgumentError(
            f"load_model takes a model name, a directory, an HF model object or None; "
            f"got {type(name).__name__}."
        )

    compat.apply()
    try:
        bridge = TransformerBridge.boot_transformers(
            model_name, hf_model=hf_model, tokenizer=tokenizer, device=resolved_device, dtype=resolved_dtype
        )
    except Exception as error:  # the weights of a named model: missing or unreadable files get a clear error
        if hf_model is not None:
            raise
        _raise_weights_error(model_name, error)
        raise
    # recording: what centring the unembedding removes (the model's own logits)
    with lighter_weight_processing(), recording_unembedding_mean(bridge):
        bridge.enable_compatibility_mode(disable_warnings=True)
    copy_weights_out_of_files(bridge)
    release_freed_memory()
    bridge.eval()
    compat.check(bridge)
    # transformer-lens keeps a BOS-prepending copy as `bridge.tokenizer`; mechvis tokenises
    # with the model's own tokenizer so that inputs match the model's HF pipeline.
    bridge.hf_tokenizer = tokenizer
    if processor is not None:
        bridge.processor = processor
    return bridge
