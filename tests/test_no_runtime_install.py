"""transformer-lens pip-installs torchvision at run time when a multimodal model boots without it.
With mechvis's declared dependencies that must never happen."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import mechvis
from tests.tiny import tiny_llava_config


def test_torch_and_torchvision_import_together():
    import torchvision
    from torchvision.ops import nms  # the operator a mismatched pair fails to register

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
    assert torchvision.__version__


def test_booting_a_tiny_llava_starts_no_pip(monkeypatch, tokenizer):
    started: list[object] = []
    original_init = subprocess.Popen.__init__

    def recording_init(self, args, *rest, **kwargs):
        started.append(args)
        if "pip" in " ".join(map(str, args if isinstance(args, (list, tuple)) else [args])):
            raise AssertionError(f"a pip subprocess was started: {args}")
        return original_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    config = tiny_llava_config()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    try:
        bridge = mechvis.load_model(model, tokenizer=tokenizer, device="cpu")
    except AssertionError:
        raise
    except Exception as error:  # noqa: BLE001 - booting may fail later for other reasons (VLM issue)
        pytest.fail(f"booting a tiny LLaVA failed: {type(error).__name__}: {error}")
    assert not [args for args in started if "pip" in str(args)]
    assert bridge.cfg.n_layers == 2


def test_llava_logprobs_equal_hf_with_text_after_the_image(tokenizer):
    """A first VLM check: LLaVA through the bridge, an image and text after it, no hub lookups."""
    import copy

    config = tiny_llava_config()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    reference = copy.deepcopy(model)
    bridge = mechvis.load_model(model, tokenizer=tokenizer, device="cpu")
    assert bridge.cfg.model_name == "<LlavaForConditionalGeneration object>"  # not a repo id: no hub lookups
    tokens = torch.tensor([[1, 504, 3575] + [49_151] * 16 + [282, 4649, 314, 3575]])  # 16 patches, then text
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = bridge(tokens, pixel_values=pixels).log_softmax(-1)
        theirs = reference(input_ids=tokens, pixel_values=pixels).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() <= 1e-4
    _, cache = bridge.run_with_cache(tokens, pixel_values=pixels)
    assert "vision_encoder.hook_vision_embed" in cache and cache["blocks.1.attn.hook_pattern"].shape[-1] == 23
