"""Shared fixtures: the embedded model (loaded once per session) and tiny random models."""

from __future__ import annotations

import copy
import os

# Tests never need the hub; fail fast instead of retrying an unreachable network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import mechvis  # noqa: E402
from tests.tiny import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The embedded model's tokenizer (49,152 tokens, chat template) saved to a temp dir."""
    from mechvis.models import embedded_model_dir

    directory = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def tiny(tokenizer):
    """Factory: tiny(architecture) -> (bridge, untouched HF reference copy of the same weights)."""

    def build(architecture: str = "llama", seed: int = 0, **overrides):
        hf_model = tiny_hf_model(architecture, seed, **overrides)
        reference = copy.deepcopy(hf_model)
        return mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu"), reference

    return build


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A session-wide tiny Llama bridge (3 layers, 4 heads) for property tests on synthetic caches."""
    return mechvis.load_model(tiny_hf_model("llama"), tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct as a hooked model, loaded once per test session."""
    return mechvis.load_model(device="cpu")


@pytest.fixture(scope="session")
def embedded_reference():
    """The embedded model as a plain HF model (eager attention), independent of the bridge."""
    from transformers import AutoModelForCausalLM

    from mechvis.models import embedded_model_dir

    return AutoModelForCausalLM.from_pretrained(
        embedded_model_dir(), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture
def streamed_features(monkeypatch):
    """The rows `StreamingFeatures.step` returns while `mechvis.generate` decodes, one per step."""
    import mechvis.generation.recorders
    from mechvis.generation.monitor import StreamingFeatures

    class _Rows(list):
        paths: list

        def __init__(self):
            super().__init__()
            self.paths = []

    class Recording(StreamingFeatures):
        def step(self, tokens, logits):
            rows.append(super().step(tokens, logits))
            return rows[-1]

        def hooks(self):  # `rows.paths` says where the features were recorded
            rows.paths.append("bridge")
            return super().hooks()

        def module_hooks(self, model):
            found = super().module_hooks(model)
            rows.paths.append("modules" if found is not None else "no modules")
            return found

    rows = _Rows()

    monkeypatch.setattr(mechvis.generation.recorders, "StreamingFeatures", Recording)
    return rows


@pytest.fixture
def no_model_work(monkeypatch):
    """Any model loading or forward pass fails the test (the tokenizer may load)."""
    import mechvis.sweep.shards as shards

    def forbidden(*args, **kwargs):
        raise AssertionError("model work before validation finished")

    monkeypatch.setattr(mechvis, "load_model", forbidden)
    monkeypatch.setattr(shards.ShardWorker, "__init__", forbidden)
    monkeypatch.setattr(shards, "weights_hash", forbidden)
