"""Names that moved in the reorganisation (issue 24) keep working for one release: each old name
warns with a MechvisDeprecationWarning that names the new import, and is the very same object."""

from __future__ import annotations

import importlib

import pytest

from mechvis.errors import MechvisDeprecationWarning

MOVED = [
    ("mechvis.analysis", "InputAttribution", "mechvis.studies.attribution:InputAttribution"),
    ("mechvis.analysis", "LongContextAnalysis", "mechvis.studies.longcontext:LongContextAnalysis"),
    ("mechvis.analysis", "analyse_long", "mechvis.studies.longcontext:analyse_long"),
    ("mechvis.analysis", "attention_gradient_relevancy", "mechvis.studies.gradients:attention_gradient_relevancy"),
    ("mechvis.analysis", "gradient_x_input", "mechvis.studies.attribution:gradient_x_input"),
    ("mechvis.analysis", "instruction_attention_check", "mechvis.studies.instructions:instruction_attention_check"),
    ("mechvis.analysis", "integrated_gradients", "mechvis.studies.gradients:integrated_gradients"),
    ("mechvis.analysis", "occlusion", "mechvis.studies.attribution:occlusion"),
    ("mechvis.analysis", "pixel_integrated_gradients", "mechvis.studies.gradients:pixel_integrated_gradients"),
    ("mechvis.analysis", "stream_image_dynamics", "mechvis.studies.streamed:stream_image_dynamics"),
    ("mechvis.running", "CHAT_ROLES", "mechvis.types:CHAT_ROLES"),
    ("mechvis.running", "DecodedTokens", "mechvis.types:DecodedTokens"),
    ("mechvis.running", "Encoded", "mechvis.types:Encoded"),
    ("mechvis.running", "ImageGrid", "mechvis.types:ImageGrid"),
    ("mechvis.running", "Message", "mechvis.types:Message"),
    ("mechvis.running", "Span", "mechvis.types:Span"),
    ("mechvis.running", "chat_content_spans", "mechvis.text:chat_content_spans"),
    ("mechvis.running", "decode_tokens", "mechvis.text:decode_tokens"),
    ("mechvis.running", "load_image", "mechvis.images:load_image"),
    ("mechvis.running", "str_tokens_of", "mechvis.text:str_tokens_of"),
    ("mechvis.running", "text_problem", "mechvis.text:text_problem"),
    ("mechvis.running", "vocabulary_strings", "mechvis.text:vocabulary_strings"),
    ("mechvis.running", "with_text_appended", "mechvis.images:with_text_appended"),
    ("mechvis.analysis.attention", "find_token_spans", "mechvis.analysis.spans:find_token_spans"),
    ("mechvis.analysis.attention", "visible_keys", "mechvis.models.architecture:visible_keys"),
    ("mechvis.analysis.repetition", "FEATURES", "mechvis.generation.monitor:FEATURES"),
    ("mechvis.analysis.repetition", "RepetitionMonitor", "mechvis.generation.monitor:RepetitionMonitor"),
    ("mechvis.analysis.repetition", "StreamingFeatures", "mechvis.generation.monitor:StreamingFeatures"),
    ("mechvis.analysis.repetition", "WEIGHTS_RESOURCE", "mechvis.generation.monitor:WEIGHTS_RESOURCE"),
    ("mechvis.analysis.repetition", "find_induction_heads", "mechvis.generation.monitor:find_induction_heads"),
    ("mechvis.analysis.repetition", "rep_labels", "mechvis.generation.monitor:rep_labels"),
    ("mechvis.analysis.vision", "VisualInformation", "mechvis.studies.vision:VisualInformation"),
    ("mechvis.analysis.vision", "stream_image_attention", "mechvis.studies.streamed:stream_image_attention"),
    ("mechvis.analysis.vision", "visual_information", "mechvis.studies.vision:visual_information"),
    ("mechvis.analysis.dynamics", "stream_image_dynamics", "mechvis.studies.streamed:stream_image_dynamics"),
]

MOVED_MODULES = [
    ("mechvis.architecture", "inspect_model", "mechvis.models.architecture"),
    ("mechvis.unembedding", "centring_offset", "mechvis.models.unembedding"),
    ("mechvis.analysis.longcontext", "analyse_long", "mechvis.studies.longcontext"),
    ("mechvis.analysis.instructions", "instruction_attention_check", "mechvis.studies.instructions"),
    ("mechvis.analysis.instructions", "semantic_token_spans", "mechvis.analysis.spans"),
    ("mechvis.analysis.attribution", "occlusion", "mechvis.studies.attribution"),
    ("mechvis.analysis.gradients", "integrated_gradients", "mechvis.studies.gradients"),
]


@pytest.mark.parametrize(("old", "name", "where"), MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_a_moved_name_warns_and_is_the_new_object(old, name, where):
    new_module, new_name = where.split(":")
    with pytest.warns(MechvisDeprecationWarning, match=rf"from {new_module} import {new_name}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new_module), new_name)


@pytest.mark.parametrize(("old", "name", "new"), MOVED_MODULES, ids=[f"{old}.{name}" for old, name, _ in MOVED_MODULES])
def test_a_moved_module_warns_and_gives_the_new_objects(old, name, new):
    with pytest.warns(MechvisDeprecationWarning, match=new.replace(".", r"\.")):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)


def test_an_unknown_name_is_still_an_attribute_error():
    import mechvis.analysis

    with pytest.raises(AttributeError, match="no attribute 'no_such_analysis'"):
        mechvis.analysis.no_such_analysis  # noqa: B018
