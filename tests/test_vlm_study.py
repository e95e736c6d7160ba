"""The VLM attention study's newer families on tiny LLaVA and tiny Qwen2-VL with a synthetic image
holding a bright square: cross-modal gap, dynamics, gradients, two-condition comparisons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mechvis
from mechvis.errors import InvalidArgumentError
from tests.test_vlm import tiny_llava  # noqa: F401  (module fixture)


def square_image(with_square: bool = True, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """Dark noise with (optionally) a bright square in the top-left quadrant."""
    pixels = (np.random.default_rng(0).random((size[0], size[1], 3)) * 40).astype("uint8")
    if with_square:
        pixels[2 : size[0] // 2 - 2, 2 : size[1] // 2 - 2] = 250
    return Image.fromarray(pixels)


def test_cross_modal_matches_hf_hidden_states(tiny_llava):  # noqa: F811
    from mechvis.analysis.crossmodal import cross_modal
    from mechvis.viz.figures import cross_modal_figure

    bridge, reference, processor = tiny_llava
    result = mechvis.run(bridge, "Where is the bright square?", image=square_image())
    grid = result.segments.image_grid
    inputs = processor(text="<image>\nWhere is the bright square?", images=square_image(), return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**inputs, output_hidden_states=True).hidden_states  # embeddings, then after each layer
    measured = cross_modal(result.cache, bridge, grid)
    for layer in measured.layers:
        states = hidden[layer + 1][0].double().numpy()
        if layer == bridge.cfg.n_layers - 1:  # HF's last hidden state is after the final norm: use the cache's own
            continue
        image = states[list(grid.positions)]
        text = states[measured.text_positions]
        cosines = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
        assert measured.alignment[layer].item() == pytest.approx(cosines.mean(), abs=1e-5)
        gap = np.linalg.norm((image / np.linalg.norm(image, axis=1, keepdims=True)).mean(0) - (text / np.linalg.norm(text, axis=1, keepdims=True)).mean(0))
        assert measured.modality_gap[layer].item() == pytest.approx(gap, abs=1e-5)
        assert measured.centroid_distance[layer].item() == pytest.approx(np.linalg.norm(image.mean(0) - text.mean(0)), rel=1e-4)
    assert 0 not in measured.text_positions and not set(measured.text_positions) & set(grid.positions)
    assert len(cross_modal_figure(measured).axes) == 1
    with pytest.raises(InvalidArgumentError, match="outside the image"):
        cross_modal(result.cache, bridge, grid, text_positions=[grid.positions[0]])
