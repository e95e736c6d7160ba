"""Keywords found by meaning and the instruction-attention check, against HF hidden states,
embeddings and attentions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import mechvis
from mechvis.analysis.spans import find_token_spans
from mechvis.studies.instructions import instruction_attention_check
from mechvis.analysis.spans import semantic_token_spans
from mechvis.errors import InvalidArgumentError
from tests.reference import hf_attentions, hf_forward

PROMPT = "Please answer briefly: what colour is the sky?"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b))


def test_semantic_match_on_embeddings_and_hidden_states(tiny):
    model, reference = tiny("llama")
    run = mechvis.run(model, PROMPT)
    keyword = " briefly"
    ids = model.hf_tokenizer.encode(keyword, add_special_tokens=False)
    table = reference.get_input_embeddings().weight.detach().double().numpy()
    match = semantic_token_spans(run, keyword, model, threshold=0.99)
    expected = _cosine(table[run.tokens.numpy()], table[ids].mean(0))
    np.testing.assert_allclose(match.scores[1:].numpy(), expected[1:], atol=1e-5)
    assert np.isnan(match.scores[0].item())
    by_spelling = find_token_spans(run, "briefly")
    if len(ids) == 1:  # the same single token: cosine 1 exactly where the spelling is
        assert [span.positions for span in match.spans] == [span.positions for span in by_spelling]
    assert find_token_spans(run, keyword, match="semantic", model=model, threshold=0.99) == match.spans

    layer = 1
    at_layer = semantic_token_spans(run, keyword, model, layer=layer, threshold=0.5)
    hidden = hf_forward(reference, run.tokens.tolist()).hidden_states[layer + 1][0].double().numpy()
    bos = [model.hf_tokenizer.bos_token_id] if model.hf_tokenizer.bos_token_id is not None else []
    alone = hf_forward(reference, bos + ids).hidden_states[layer + 1][0, len(bos):].double().numpy().mean(0)
    np.testing.assert_allclose(at_layer.scores[1:].numpy(), _cosine(hidden, alone)[1:], atol=1e-4)
    # The model is the run's cache's own (issue 24): without model= the same spans; a cache that
    # knows no model (a plain dict of tensors) still says what is missing.
    assert find_token_spans(run, keyword, match="semantic", threshold=0.99) == match.spans
    with pytest.raises(InvalidArgumentError, match="needs the model"):
        find_token_spans(dataclasses.replace(run, cache=dict(run.cache.cache_dict)), keyword, match="semantic")
    with pytest.raises(InvalidArgumentError, match="match"):
        find_token_spans(run, keyword, match="sound")
    with pytest.raises(InvalidArgumentError, match="threshold"):
        semantic_token_spans(run, keyword, model, threshold=2.0)


def test_instruction_attention_check_matches_hf_attentions(tiny):
    model, reference = tiny("llama")
    prompts = [PROMPT, "Answer in French, briefly: where is Paris?"]
    check = instruction_attention_check(model, prompts, ["briefly"], 0.5, max_new_tokens=4)
    for index, prompt in enumerate(prompts):
        tokens = mechvis.encode(model, prompt).token_ids
        full = tokens + check.answer_ids[index]
        attentions = hf_attentions(reference, full)
        queries = list(range(len(tokens) - 1, len(full) - 1))
        keys = check.key_positions[index]
        expected = attentions[:, :, queries][..., keys].sum(-1).mean(axis=(1, 2))
        np.testing.assert_allclose(check.mass[index].numpy(), expected, atol=1e-5)
    assert check.below == [i for i in range(2) if check.score[i] < 0.5]
    assert instruction_attention_check(model, prompts, ["briefly"], 0.0, max_new_tokens=2).below == []
    with pytest.raises(InvalidArgumentError, match="None of the keywords"):
        instruction_attention_check(model, ["Nothing here"], ["briefly"], 0.1, max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        instruction_attention_check(model, prompts, ["briefly"], 1.5)


def test_cli_instruction_check(tmp_path, tokenizer, capsys):
    from mechvis.cli import main
    from tests.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "check"
    arguments = ["instruction-check", "--model", str(model_dir), "--prompt", PROMPT, "--prompt", "Be brief & <b>polite</b>: hi",
                 "--keyword", "brief", "--keyword", "briefly", "--threshold", "0.9", "--max-new-tokens", "3", "--out", str(out)]
    assert main(arguments) == 0
    table = json.loads((out / "instruction-check.json").read_text())
    assert len(table["prompts"]) == 2 and all(row["below_threshold"] for row in table["prompts"])
    assert (out / "instruction-check.png").stat().st_size > 1000
    assert "BELOW" in capsys.readouterr().out
    assert main(["instruction-check", "--model", str(model_dir), "--prompt", "nothing", "--keyword", "zebra", "--out", str(out), "--force"]) == 2
