"""Vision-language models: LLaVA through the bridge, run with an image, image-region metrics."""

from __future__ import annotations

import copy

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
    attention = image_attention(result.cache, bridge, grid, query_positions=[last - 1, last])
    assert attention.image_mass.shape == (2, 4, 2) and (attention.image_mass > 0).all()
    torch.testing.assert_close(attention.maps.sum(-1), torch.ones(2, 4, 2))
    assert "vision_encoder.hook_vision_embed" in result.cache


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
    assert result.segments.image_grid is None  # base image + tiles + row ends: not a plain grid (yet)


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
    rolled = vision_rollout(result.cache, bridge, grid, query_positions=queries)
    inputs = processor(text="<image>\nWhere is it?", images=picture, return_tensors="pt")
    with torch.no_grad():
        language = torch.stack(reference(**inputs, output_attentions=True).attentions)[:, 0].double().numpy()
        vision = reference.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    vision = torch.stack(vision)[:, 0].double().numpy()
    assert reference.config.vision_feature_layer == -2 and rolled.vision_layers == [0]  # 2 layers: the penultimate is layer 0
    text_part = rollout_loop(language)[queries][:, list(grid.positions)]
    combined = (text_part @ rollout_loop(vision[:1])[1:])[:, 1:]  # image token i ↔ vision position i + 1; CLS dropped
    np.testing.assert_allclose(rolled.maps.numpy(), combined / combined.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(rolled.image_mass.numpy(), text_part.sum(-1), atol=1e-5)


def test_visual_information_and_compare(tiny_llava):
    from mechvis.analysis.vision import compare, image_attention, visual_information
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
    attentions = [image_attention(r.cache, bridge, r.segments.image_grid, query_positions=[-1]) for r in runs]
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
    dynamics = image_attention(trace.run.cache, bridge, grid, query_positions=list(trace.generated_positions))
    assert dynamics.image_mass.shape == (2, 4, len(trace.generated_ids))  # attention to the image, token by token


def test_streamed_image_attention_equals_the_cached_one(tiny_llava):
    from mechvis.analysis.vision import image_attention, stream_image_attention

    bridge, _, _ = tiny_llava
    picture = _picture(8)
    result = mechvis.run(bridge, "Where is the cat?", image=picture)
    cached = image_attention(result.cache, bridge, result.segments.image_grid, query_positions=[-2, -1], sink_cells=[0])
    streamed = stream_image_attention(bridge, "Where is the cat?", picture, query_positions=[-2, -1], sink_cells=[0])
    torch.testing.assert_close(streamed.image_mass, cached.image_mass)
    torch.testing.assert_close(streamed.maps, cached.maps)
    torch.testing.assert_close(streamed.metrics.entropy, cached.metrics.entropy)


def test_report_with_an_image(tiny_llava, tmp_path):
    import json

    from mechvis.report import write_report

    bridge, _, _ = tiny_llava
    picture = _picture(9)
    write_report(bridge, "Describe <b>this</b>.", tmp_path / "r.html", json_path=tmp_path / "r.json", image=picture, max_new_tokens=4)
    document = (tmp_path / "r.html").read_text()
    assert '<section id="vision">' in document and "&lt;b&gt;this&lt;/b&gt;" in document
    vision = json.loads((tmp_path / "r.json").read_text())["vision"]
    assert (vision["grid"]["rows"], vision["grid"]["cols"]) == (4, 4) and len(vision["image_mass_per_layer"]) == 2
    assert sum(vision["mean_map"]) == pytest.approx(1.0, abs=1e-3) and vision["rollout_map"] is not None


def test_vision_entry_points_reject_bad_input(tiny_llava):
    from mechvis.analysis.vision import ImageGrid, stream_image_attention, vision_rollout, visual_information

    bridge, _, _ = tiny_llava
    picture = _picture(10)
    with pytest.raises(InvalidArgumentError, match="continuation is empty"):
        visual_information(bridge, "Describe it.", picture, "")
    result = mechvis.run(bridge, "Where?", image=picture)
    merged = ImageGrid(2, 2, tuple(result.segments.image_grid.positions[:4]), merge_size=2)
    with pytest.raises(InvalidArgumentError, match="not mapped yet"):
        vision_rollout(result.cache, bridge, merged, query_positions=[-1])
    with pytest.raises(InvalidArgumentError, match="position"):
        stream_image_attention(bridge, "Where?", picture, query_positions=[500])
