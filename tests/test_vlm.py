"""Vision-language models: LLaVA through the bridge, run with an image, image-region metrics."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import mechvis
from mechvis.analysis.vision import image_attention
from mechvis.errors import InvalidArgumentError
from tests.tiny import tiny_llava_config

VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tokenizer_dir):
    """A tiny random LLaVA (CLIP 32×32 px, 8 px patches → 4×4 image tokens), its processor, and
    an untouched HF copy."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_llava_config(vocab_size=len(tokenizer), image_token=image_token)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    reference = copy.deepcopy(model)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=VLM_CHAT_TEMPLATE,
    )
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    return bridge, reference, processor


def _picture(seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((40, 48, 3)) * 255).astype("uint8"))


def test_run_with_an_image_matches_hf(tiny_llava, tmp_path):
    bridge, reference, processor = tiny_llava
    picture = _picture()
    result = mechvis.run(bridge, "What is in the picture? Describe it.", image=picture)
    inputs = processor(text="<image>\nWhat is in the picture? Describe it.", images=picture, return_tensors="pt")
    assert result.tokens.tolist() == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = reference(**inputs).logits[0].log_softmax(-1)
    assert (result.logits.log_softmax(-1) - expected).abs().max() <= 1e-4  # text after the image included
    image_span = result.segments.of_kind("image")
    assert len(image_span) == 1 and len(image_span[0]) == 16
    grid = result.segments.image_grid
    assert (grid.rows, grid.cols) == (4, 4) and list(grid.positions) == list(image_span[0].positions)
    path = tmp_path / "picture.png"
    picture.save(path)
    from_path = mechvis.run(bridge, "What is in the picture? Describe it.", image=path)
    from_array = mechvis.run(bridge, "What is in the picture? Describe it.", image=np.asarray(picture))
    torch.testing.assert_close(from_path.logits, result.logits)
    torch.testing.assert_close(from_array.logits, result.logits)


def test_chat_with_an_image_and_image_metrics(tiny_llava):
    bridge, _, _ = tiny_llava
    result = mechvis.run(bridge, "Where is the red square?", image=_picture(1), chat=True)
    assert result.text.startswith("<|im_start|>user") and result.segments.image_grid is not None
    grid = result.segments.image_grid
    last = len(result.tokens) - 1
    attention = image_attention(result.cache, grid=grid, query_positions=[last - 1, last])
    assert attention.image_mass.shape == (2, 4, 2) and (attention.image_mass > 0).all()
    torch.testing.assert_close(attention.maps.sum(-1), torch.ones(2, 4, 2))
    assert "vision_encoder.hook_vision_embed" in result.cache


@pytest.mark.parametrize("content", ["user", "東京 🎉 <|im_start|>user\n"])
def test_chat_with_an_image_labels_the_content_by_the_template(tiny_llava, content):
    """The user's content sits between the image tokens and the turn's <|im_end|> (the template
    writes <|im_start|>user\\n<image>{content}<|im_end|>); the text is the tokenizer's decode."""
    bridge, _, processor = tiny_llava
    tokenizer = processor.tokenizer
    result = mechvis.run(bridge, [{"role": "user", "content": content}], image=_picture(1), chat=True)
    ids = result.tokens.tolist()
    last_image = max(p for p, t in enumerate(ids) if t == processor.image_token_id)
    end = ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), last_image)
    assert result.segments.positions("user") == list(range(last_image + 1, end))
    assert tokenizer.decode(ids[last_image + 1 : end]) == content
    assert result.text == tokenizer.decode(ids) and "".join(result.str_tokens) == result.text
    assert result.segments.kind_at(1) == "template"  # the role name in the markup


def test_image_errors(tiny_llava, tiny, tmp_path):
    bridge, _, _ = tiny_llava
    text_only, _ = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="text-only"):
        mechvis.run(text_only, "Describe", image=_picture())
    with pytest.raises(InvalidArgumentError, match="no image was given"):
        mechvis.run(bridge, "<image>\nDescribe it")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(InvalidArgumentError, match="Could not read the image"):
        mechvis.run(bridge, "Describe", image=broken)
    with pytest.raises(InvalidArgumentError, match="Could not read the image"):
        mechvis.run(bridge, "Describe", image=tmp_path / "missing.png")
    with pytest.raises(InvalidArgumentError, match="height, width, 3"):
        mechvis.run(bridge, "Describe", image=np.zeros((4, 4)))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        mechvis.run(bridge, "<image> and <image>", image=_picture())


def _qwen_vl(kind: str):
    """A tiny random Qwen2-VL or Qwen2.5-VL and inputs: one image of 4 × 6 patches (merged 2 × 2
    into 2 × 3 = 6 LLM tokens) followed by text, so wrong mRoPE positions would show."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(vocab_size=49_160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=49_155, video_token_id=49_156, vision_start_token_id=49_153, vision_end_token_id=49_154)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config, model_class = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens), Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
        config, model_class = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.config._attn_implementation = "eager"
    ids = torch.tensor([[1, 504, 49_153] + [49_155] * 6 + [49_154, 282, 4649, 314, 3575, 700]])
    inputs = dict(
        pixel_values=torch.randn(24, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1)),
        image_grid_thw=torch.tensor([[1, 4, 6]]),
        mm_token_type_ids=(ids == 49_155).int(),
    )
    return model, ids, inputs


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_logprobs_equal_hf_with_text_after_the_image(kind, tokenizer):
    model, ids, inputs = _qwen_vl(kind)
    reference = copy.deepcopy(model)
    bridge = mechvis.load_model(model, tokenizer=tokenizer, device="cpu")
    with torch.no_grad():
        ours = bridge(ids, **inputs).log_softmax(-1)
        theirs = reference(input_ids=ids, **inputs).logits.log_softmax(-1)
        # The check has teeth: plain 1-D positions (a naive shim) move the text after the image.
        naive = reference(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None].expand(3, 1, -1), **inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (naive.log_softmax(-1) - theirs).abs().max() > 1e-3
    _, cache = bridge.run_with_cache(ids, **inputs)
    assert "vision_encoder.hook_vision_embed" in cache and cache["blocks.1.attn.hook_pattern"].shape[-1] == ids.shape[1]
    if kind == "qwen2_vl":
        assert type(bridge.adapter).__name__ == "Qwen2VLShimAdapter"


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_vision_rollout_matches_numpy_on_the_towers_own_attention(kind, tokenizer, monkeypatch):
    """The reference records the vision tower's own eager attention weights while it runs (per
    image or window chunk), lays Qwen2.5-VL's windows back out with transformers' window index,
    rolls out in numpy and places each patch by the model's own (h, w) rotary positions."""
    import importlib

    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from mechvis.analysis.vision import ImageGrid, vision_rollout
    from tests.reference import rollout_loop

    model, ids, inputs = _qwen_vl(kind)
    reference = copy.deepcopy(model)
    reference.config.vision_config._attn_implementation = "eager"
    bridge = mechvis.load_model(model, tokenizer=tokenizer, device="cpu")
    _, cache = bridge.run_with_cache(ids, **inputs)
    image_positions = tuple(p for p, t in enumerate(ids[0].tolist()) if t == 49_155)
    grid = ImageGrid(2, 3, image_positions, merge_size=2)
    queries = [ids.shape[1] - 3, ids.shape[1] - 1]
    rolled = vision_rollout(cache, grid=grid, query_positions=queries)

    module = importlib.import_module(type(reference).__module__)
    chunks = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        output, weights = original(*args, **kwargs)
        if "Vision" in type(args[0]).__name__:  # the language model's layers use it too
            chunks.append(weights[0].double().numpy())
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        language = torch.stack(reference(input_ids=ids, **inputs, output_attentions=True).attentions)[:, 0].double().numpy()
    n, heads = 24, 2
    layers = []
    while chunks:  # the chunks of one layer tile its n positions (one image, or its windows)
        layer, start = np.zeros((heads, n, n)), 0
        while start < n:
            block = chunks.pop(0)
            layer[:, start : start + block.shape[-1], start : start + block.shape[-1]] = block
            start += block.shape[-1]
        layers.append(layer)
    assert len(layers) == 2
    order = np.arange(n)
    if kind == "qwen2_5_vl":
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, 56, 14)
        order = (window_index.numpy()[:, None] * 4 + np.arange(4)).flatten()
        assert not np.array_equal(order, np.arange(n))  # the windows really reorder the patches
    restore = np.argsort(order)
    vision = rollout_loop(np.stack(layers))[restore][:, restore]
    hw = get_vision_position_ids(inputs["image_grid_thw"], 2).numpy()
    token_of = (hw[:, 0] // 2) * 3 + hw[:, 1] // 2
    per_token = np.stack([vision[token_of == j].mean(0) for j in range(6)])
    text_part = rollout_loop(language)[queries][:, list(image_positions)]
    in_sequence = text_part @ per_token
    expected = np.zeros_like(in_sequence)
    expected[:, hw[:, 0] * 6 + hw[:, 1]] = in_sequence
    assert rolled.patch_shape == (4, 6) and rolled.vision_layers == [0, 1]
    np.testing.assert_allclose(rolled.maps.numpy(), expected / expected.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(rolled.image_mass.numpy(), text_part.sum(-1), atol=1e-5)
    assert rolled.maps.std(-1).min() > 1e-4  # not a flat map: the check has something to compare


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_run_with_its_processor_then_vision_rollout(kind, tokenizer_dir, tmp_path):
    """The whole path a user takes: mechvis.run with a picture through the model's processor
    (completion prompt wrapped in the vision start/end markers), then the rollout onto patches."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from mechvis.analysis.vision import vision_rollout

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # 49,152 … 49,156; the first is unused so the ids match _qwen_vl's config.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|unused|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    assert tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"]) == [49_153, 49_155]
    model, _, _ = _qwen_vl(kind)
    reference = copy.deepcopy(model)
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=56 * 84)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    picture = Image.fromarray((np.random.default_rng(3).random((56, 84, 3)) * 255).astype("uint8"))
    result = mechvis.run(bridge, "Where is the red part?", image=picture)
    inputs = processor(text="<|vision_start|><|image_pad|><|vision_end|>\nWhere is the red part?", images=picture, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits[0].log_softmax(-1)
    assert result.tokens.tolist() == inputs["input_ids"][0].tolist()
    assert (result.logits.log_softmax(-1) - expected).abs().max() <= 1e-4
    grid = result.segments.image_grid
    assert (grid.rows, grid.cols, grid.merge_size) == (2, 3, 2)
    rolled = vision_rollout(result.cache, grid=grid, query_positions=[-1])
    assert rolled.patch_shape == (4, 6) and rolled.maps.shape == (1, 24)
    assert float(rolled.maps.sum()) == pytest.approx(1.0, abs=1e-5) and bool((rolled.maps >= 0).all())
    from mechvis.analysis.vision import ImageGrid
    from mechvis.errors import MissingActivationsError

    with pytest.raises(InvalidArgumentError, match="merges 1 × 1 patches; the vision tower merges 2"):
        vision_rollout(result.cache, grid=ImageGrid(4, 6, tuple(range(24))), query_positions=[-1])
    language_only = mechvis.run(bridge, "Where is the red part?", image=picture, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    with pytest.raises(MissingActivationsError, match="vision_encoder.hook_in"):
        vision_rollout(language_only.cache, grid=grid, query_positions=[-1])
    from mechvis.report import write_report

    write_report(bridge, "Describe it.", tmp_path / "q.html", json_path=tmp_path / "q.json", image=picture, max_new_tokens=3)
    vision = json.loads((tmp_path / "q.json").read_text())["vision"]
    assert (vision["grid"]["rows"], vision["grid"]["cols"]) == (2, 3) and vision["rollout_patch_shape"] == [4, 6]


def test_unsupported_vlm_architecture(tokenizer):
    from transformers import PaliGemmaConfig

    from mechvis.errors import UnsupportedArchitectureError
    from mechvis.models import architecture_of

    config = PaliGemmaConfig()
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2VLForConditionalGeneration"):
        architecture_of(config)


def test_llava_onevision_through_the_bridge(tokenizer_dir):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=image_id, video_token_index=image_id + 1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_1",
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    reference = copy.deepcopy(model)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints, do_pad=True),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
        vision_feature_select_strategy="full", image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_1",
    )
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    picture = _picture(2)
    result = mechvis.run(bridge, "What is this? Tell me.", image=picture)
    inputs = processor(text="<image>\nWhat is this? Tell me.", images=picture, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits[0].log_softmax(-1)
    assert (result.logits.log_softmax(-1) - expected).abs().max() <= 1e-4
    assert len(result.segments.positions("image")) == int((inputs["input_ids"] == image_id).sum())
    # The layout, found independently: the model's own packed features, where rows equal to its
    # row-end embedding mark the ends of the high-resolution grid's rows after the base image.
    wide = Image.fromarray((np.random.default_rng(4).random((30, 75, 3)) * 255).astype("uint8"))
    shapes = []
    for image in (picture, wide):
        result = mechvis.run(bridge, "What is this? Tell me.", image=image)
        inputs = processor(text="<image>\nWhat is this? Tell me.", images=image, return_tensors="pt")
        with torch.no_grad():
            packed = reference.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output
        packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
        row_end = (packed == reference.model.image_newline).all(-1).nonzero().flatten().tolist()
        image_positions = result.segments.positions("image")
        base = 4  # 28 px / 14 px patches: a 2 × 2 overview image first
        rows, cols = len(row_end), row_end[0] - base
        expected = [image_positions[i] for i in range(base, len(image_positions)) if i not in row_end]
        grid = result.segments.image_grid
        assert (grid.rows, grid.cols) == (rows, cols) and list(grid.positions) == expected
        assert row_end == [base + r * (cols + 1) + cols for r in range(rows)]
        shapes.append((rows, cols))
    assert shapes[0][0] == shapes[0][1] > 1 and shapes[1][0] < shapes[1][1]  # square, then wide


def test_logit_lens_at_image_tokens_matches_hf(tiny_llava):
    from mechvis.analysis import logit_lens

    bridge, reference, processor = tiny_llava
    picture = _picture(3)
    result = mechvis.run(bridge, "Describe the picture.", image=picture)
    image_positions = result.segments.positions("image")
    lens = logit_lens(result.cache, bridge, positions=image_positions + [len(result.tokens) - 1])
    inputs = processor(text="<image>\nDescribe the picture.", images=picture, return_tensors="pt")
    with torch.no_grad():
        output = reference(**inputs, output_hidden_states=True)
        language = reference.model.language_model
        rows = [reference.lm_head(language.norm(hidden))[0] for hidden in output.hidden_states[:-1]] + [output.logits[0]]
    expected = torch.stack(rows)[:, lens.positions].double().log_softmax(-1)
    entropy = -(expected.exp() * expected).sum(-1)
    torch.testing.assert_close(lens.entropy.double(), entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(lens.max_probs.double(), expected.exp().amax(-1), atol=1e-4, rtol=0)


def test_vision_rollout_matches_numpy_on_hf_attentions(tiny_llava):
    from mechvis.analysis.vision import vision_rollout
    from tests.reference import rollout_loop

    bridge, reference, processor = tiny_llava
    picture = _picture(4)
    result = mechvis.run(bridge, "Where is it?", image=picture)
    grid = result.segments.image_grid
    queries = [len(result.tokens) - 2, len(result.tokens) - 1]
    rolled = vision_rollout(result.cache, grid=grid, query_positions=queries)
    inputs = processor(text="<image>\nWhere is it?", images=picture, return_tensors="pt")
    with torch.no_grad():
        language = torch.stack(reference(**inputs, output_attentions=True).attentions)[:, 0].double().numpy()
        vision = reference.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    vision = torch.stack(vision)[:, 0].double().numpy()
    assert rolled.patch_shape == (grid.rows, grid.cols)
    assert reference.config.vision_feature_layer == -2 and rolled.vision_layers == [0]  # 2 layers: the penultimate is layer 0
    text_part = rollout_loop(language)[queries][:, list(grid.positions)]
    combined = (text_part @ rollout_loop(vision[:1])[1:])[:, 1:]  # image token i ↔ vision position i + 1; CLS dropped
    np.testing.assert_allclose(rolled.maps.numpy(), combined / combined.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(rolled.image_mass.numpy(), text_part.sum(-1), atol=1e-5)


def test_visual_information_and_compare(tiny_llava):
    from mechvis.analysis.vision import compare, image_attention
    from mechvis.studies.vision import visual_information
    from mechvis.viz.figures import comparison_figure

    bridge, reference, processor = tiny_llava
    picture, other = _picture(5), _picture(6)
    information = visual_information(bridge, "Describe it.", picture, " A red square")
    grey = Image.fromarray(np.full((40, 48, 3), 128, np.uint8))
    for candidate, scores in ((picture, information.with_image), (grey, information.with_blank)):
        inputs = processor(text="<image>\nDescribe it.", images=candidate, return_tensors="pt")
        ids = torch.cat([inputs["input_ids"], torch.tensor([information.tokens])], dim=1)
        with torch.no_grad():
            log_probs = reference(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].double().log_softmax(-1)
        start = inputs["input_ids"].shape[1]
        expected = log_probs[start - 1 : -1].gather(-1, ids[0, start:, None])[:, 0]
        torch.testing.assert_close(scores.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(information.pointwise, information.with_image - information.with_blank)

    runs = [mechvis.run(bridge, "Where is it?", image=image) for image in (picture, other)]
    attentions = [image_attention(r.cache, grid=r.segments.image_grid, query_positions=[-1]) for r in runs]
    comparison = compare(*attentions)
    first, second, delta = comparison.table["image mass"]
    assert first == pytest.approx(attentions[0].image_mass.mean().item()) and delta == pytest.approx(second - first)
    assert set(comparison.table) >= {"entropy (nats)", "Gini", "k90 / N", "centre row"}
    figure = comparison_figure([a.maps[0, 0, 0] for a in attentions], [(4, 4), (4, 4)], [picture, other], ["a", "b"])
    assert len(figure.axes) == 2


def test_generate_with_an_image(tiny_llava):
    from mechvis.analysis.vision import image_attention

    bridge, reference, processor = tiny_llava
    picture = _picture(7)
    trace = mechvis.generate(bridge, "What do you see?", image=picture, max_new_tokens=6)
    inputs = processor(text="<image>\nWhat do you see?", images=picture, return_tensors="pt")
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=2)[0, inputs["input_ids"].shape[1]:]
    assert trace.generated_ids == expected.tolist()[: len(trace.generated_ids)]
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    assert (teacher_forced - trace.step_logits.log_softmax(-1)).abs().max() <= 1e-4
    grid = trace.run.segments.image_grid
    dynamics = image_attention(trace.run.cache, grid=grid, query_positions=list(trace.generated_positions))
    assert dynamics.image_mass.shape == (2, 4, len(trace.generated_ids))  # attention to the image, token by token


def test_monitor_temperature_with_an_image(tiny_llava, streamed_features):
    from mechvis.generation.monitor import find_induction_heads
    from mechvis.analysis.repetition import repetition_features
    from mechvis.generation import MonitorTemperature, SamplingSettings

    bridge, _, _ = tiny_llava
    induction = find_induction_heads(bridge, threshold=0.0, top=2)
    trace = mechvis.generate(bridge, "What do you see?", image=_picture(3), max_new_tokens=8,
                             sampling=SamplingSettings(seed=0, schedule=MonitorTemperature(induction=induction)))
    assert len(streamed_features) == len(trace.generated_ids) == 8
    offline = repetition_features(bridge, trace, induction)  # the image tokens are part of the prefix
    torch.testing.assert_close(torch.stack(streamed_features), offline.values, atol=1e-4, rtol=1e-4)


def test_recorded_image_attention_equals_the_cached_one(tiny_llava):
    from mechvis.analysis.vision import image_attention
    from mechvis.studies.executors import record_attention_rows

    bridge, _, _ = tiny_llava
    picture = _picture(8)
    result = mechvis.run(bridge, "Where is the cat?", image=picture)
    cached = image_attention(result.cache, grid=result.segments.image_grid, query_positions=[-2, -1], sink_cells=[0])
    recorded = record_attention_rows(bridge, "Where is the cat?", image=picture, query_positions=[-2, -1])
    streamed = image_attention(recorded, query_positions=[-2, -1], sink_cells=[0])
    torch.testing.assert_close(streamed.image_mass, cached.image_mass)
    torch.testing.assert_close(streamed.maps, cached.maps)
    torch.testing.assert_close(streamed.metrics.entropy, cached.metrics.entropy)


def test_report_with_an_image(tiny_llava, tmp_path):

    from mechvis.report import write_report

    bridge, _, _ = tiny_llava
    picture = _picture(9)
    write_report(bridge, "Describe <b>this</b>.", tmp_path / "r.html", json_path=tmp_path / "r.json", image=picture, max_new_tokens=4)
    document = (tmp_path / "r.html").read_text()
    assert '<section id="vision">' in document and "&lt;b&gt;this&lt;/b&gt;" in document
    vision = json.loads((tmp_path / "r.json").read_text())["vision"]
    assert (vision["grid"]["rows"], vision["grid"]["cols"]) == (4, 4) and len(vision["image_mass_per_layer"]) == 2
    assert sum(vision["mean_map"]) == pytest.approx(1.0, abs=1e-3) and len(vision["rollout_map"]) == 16 and vision["rollout_patch_shape"] == [4, 4]


def test_vision_entry_points_reject_bad_input(tiny_llava):
    from mechvis.analysis.vision import ImageGrid, vision_rollout
    from mechvis.studies.executors import record_attention_rows
    from mechvis.studies.vision import visual_information

    bridge, _, _ = tiny_llava
    picture = _picture(10)
    with pytest.raises(InvalidArgumentError, match="continuation is empty"):
        visual_information(bridge, "Describe it.", picture, "")
    result = mechvis.run(bridge, "Where?", image=picture)
    merged = ImageGrid(2, 2, tuple(result.segments.image_grid.positions[:4]), merge_size=2)
    with pytest.raises(InvalidArgumentError, match="not mapped yet"):
        vision_rollout(result.cache, grid=merged, query_positions=[-1])
    with pytest.raises(InvalidArgumentError, match="position"):
        record_attention_rows(bridge, "Where?", image=picture, query_positions=[500])


def test_hooked_generation_with_an_image_equals_the_teacher_forced_pass(tiny_llava):
    bridge, _, _ = tiny_llava
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda tensor, hook: tensor)]):
        trace = mechvis.generate(bridge, "What do you see?", image=_picture(4), max_new_tokens=6)
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    assert (teacher_forced - trace.step_logits.log_softmax(-1)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_hooked_kv_cached_decoding_equals_a_full_pass(kind, tokenizer):
    """HF's KV-cached generate through the hooked bridge (mRoPE positions carried across steps)
    sees the logits one full pass over the same tokens gives."""
    model, ids, inputs = _qwen_vl(kind)
    bridge = mechvis.load_model(model, tokenizer=tokenizer, device="cpu")
    with torch.no_grad(), bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda tensor, hook: tensor)]):
        output = bridge.original_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, max_new_tokens=5,
                                                do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=2)
        sequence = output.sequences
        full_inputs = dict(inputs, mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 5, dtype=torch.int)], 1))
        full = bridge(sequence, **full_inputs)[0, ids.shape[1] - 1 : -1]
    stepped = torch.stack([step[0] for step in output.logits])
    assert (stepped.log_softmax(-1) - full.log_softmax(-1)).abs().max() <= 1e-4
