"""Shared state of one server process (the model, its lock, the run store, uploaded images),
handed to routes with `Depends(get_state)`; nothing lives in module globals."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

import mechvis
from mechvis.errors import InvalidArgumentError
from mechvis.serve.store import RunStore


@dataclass
class ServerState:
    model: Any = None  # a TransformerBridge, or None until one is loaded
    model_name: str | None = None
    model_roots: tuple[Path, ...] = ()
    store: RunStore = field(default_factory=RunStore)
    generation_lock: threading.Lock = field(default_factory=threading.Lock)
    status: str = "idle"  # idle | loading | generating | analysing
    cancel: threading.Event | None = None
    images: dict[str, Any] = field(default_factory=dict)  # id → PIL image (bounded)
    token: str | None = None
    loopback: bool = True
    card: dict | None = None
    model_extras: dict = field(default_factory=dict)  # per-model memo (induction heads)

    def require_model(self):
        if self.model is None:
            raise HTTPException(409, "No model is loaded; load one from the model root first.")
        return self.model


def get_state(request: Request) -> ServerState:
    return request.app.state.mechvis


def resolve_model_dir(roots: tuple[Path, ...], name: str) -> Path:
    """The directory `name` (relative to one of `roots`) names, refusing anything that leaves
    its root (.., absolute paths, symlinks pointing outside) and anything without safetensors
    weights. Raises InvalidArgumentError; reads nothing but directory entries."""
    if not roots:
        raise InvalidArgumentError("This server has no --model-root; models cannot be loaded from the browser.")
    if not name or name.startswith(("/", "\\")) or "\x00" in name or os.path.isabs(name):
        raise InvalidArgumentError("Give a model directory relative to a model root.")
    for root in roots:
        root = root.resolve()
        candidate = (root / name).resolve()
        if not candidate.is_relative_to(root) or candidate == root:
            continue
        if not candidate.is_dir():
            continue
        files = list(candidate.iterdir())
        if any(file.is_symlink() and not file.resolve().is_relative_to(root) for file in files):
            raise InvalidArgumentError(f"{name!r} links to files outside the model root; refused.")
        if any(file.suffix in (".py",) for file in files):
            raise InvalidArgumentError(f"{name!r} ships Python code; remote code is never run.")
        if not any(file.name.endswith(".safetensors") for file in files):
            raise InvalidArgumentError(f"{name!r} has no .safetensors weights; only safetensors are loaded.")
        if not (candidate / "config.json").is_file():
            raise InvalidArgumentError(f"{name!r} has no config.json.")
        return candidate
    raise InvalidArgumentError(f"No model directory {name!r} inside the model roots.")


def list_model_dirs(roots: tuple[Path, ...]) -> list[str]:
    """The loadable model directories directly inside the roots (those `resolve_model_dir` accepts)."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            try:
                resolve_model_dir((root,), child.name)
            except InvalidArgumentError:
                continue
            found.append(child.name)
    return found


def load_from_root(directory: Path):
    """A hooked model from a checked directory: safetensors weights only, no remote code."""


    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory, use_safetensors=True, trust_remote_code=False, attn_implementation="eager"
    )
    return mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
