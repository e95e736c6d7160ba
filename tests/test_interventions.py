"""Interventions: ablation, patching, steering, keyword boost."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.errors import InvalidArgumentError
from mechvis.interventions import (
    KeywordBoost,
    ablate_heads,
    ablate_layers,
    ablation_sweep,
    activation_patching,
    add_vector,
    intervene,
    logit_difference,
    loss,
    patch_activation,
    repetition_confidence,
    steer_attention,
    steering_vector,
    target_probability,
)

PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_head_ablation_changes_only_that_heads_share(tiny):
    model, _ = tiny("llama")
    clean = mechvis.run(model, PROMPT)
    with intervene(model, ablate_heads(model, [(1, 2)])):
        ablated = mechvis.run(model, PROMPT)
    for layer in (0, 1):
        torch.testing.assert_close(ablated.cache[f"blocks.{layer}.hook_resid_pre"], clean.cache[f"blocks.{layer}.hook_resid_pre"], rtol=0, atol=0)
    heads, labels = clean.cache.stack_head_results(layer=2, return_labels=True)  # transformer-lens' own per-head results
    head = heads[labels.index("L1H2"), 0]
    torch.testing.assert_close(ablated.cache["blocks.1.hook_attn_out"][0], clean.cache["blocks.1.hook_attn_out"][0] - head, atol=1e-5, rtol=1e-5)
    assert (ablated.cache["blocks.1.attn.hook_z"][0, :, 2] == 0).all()
    torch.testing.assert_close(mechvis.run(model, PROMPT).logits, clean.logits, rtol=0, atol=0)  # removed on exit


def test_zero_ablating_every_head_zeroes_the_attention_output(tiny):
    model, _ = tiny("llama")  # no attention output bias
    with intervene(model, ablate_heads(model, [(2, h) for h in range(4)])):
        all_heads = mechvis.run(model, PROMPT)
    with intervene(model, ablate_layers(model, [2], component="attn")):
        layer = mechvis.run(model, PROMPT)
    torch.testing.assert_close(all_heads.logits, layer.logits, atol=1e-5, rtol=1e-5)
    assert all_heads.cache["blocks.2.hook_attn_out"].abs().max() == 0


def test_mean_and_resample_ablation_use_the_reference(tiny):
    model, _ = tiny("gpt2")
    references = [mechvis.run(model, text) for text in ("A quiet day in the park.", "Numbers: one, two, three, four.")]
    with intervene(model, ablate_heads(model, [(0, 1)], method="mean", reference=references)):
        ablated = mechvis.run(model, PROMPT)
    expected = torch.cat([r.cache["blocks.0.attn.hook_z"][0, 1:, 1] for r in references]).mean(0)
    torch.testing.assert_close(ablated.cache["blocks.0.attn.hook_z"][0, :, 1], expected.expand(len(ablated.tokens), -1))
    other = mechvis.run(model, "When Anna and Peter went to the beach, Peter gave a towel to")
    assert len(other.tokens) == len(ablated.tokens)
    with intervene(model, ablate_heads(model, [(2, 3)], method="resample", reference=other)):
        resampled = mechvis.run(model, PROMPT)
    torch.testing.assert_close(resampled.cache["blocks.2.attn.hook_z"][0, :, 3], other.cache["blocks.2.attn.hook_z"][0, :, 3])
    with intervene(model, ablate_heads(model, [(2, 3)], method="resample", reference=references[0])):
        with pytest.raises(InvalidArgumentError, match="same length"):
            mechvis.run(model, PROMPT + " and then some more words to make it longer")


def test_batched_sweep_equals_one_ablation_at_a_time(tiny):
    model, _ = tiny("qwen2")
    tokens = mechvis.run(model, PROMPT).tokens
    metric = logit_difference(model, " Mary", " John")
    sweep = ablation_sweep(model, tokens, metric, batch_size=5)
    assert sweep.effect.shape == (3, 4)
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        with torch.no_grad(), intervene(model, ablate_heads(model, [(layer, head)])):
            single = metric(model(tokens[None]))[0].item()
        assert sweep.effect[layer, head].item() == pytest.approx(single - sweep.baseline, abs=1e-5)
    assert sweep.top(1)[0][2] == pytest.approx(sweep.effect.abs().max().item() * (1 if sweep.top(1)[0][2] > 0 else -1))
    confidence = repetition_confidence([3, 5, 7])
    probabilities = mechvis.run(model, PROMPT).logits.softmax(-1)
    assert confidence(mechvis.run(model, PROMPT).logits[None])[0].item() == pytest.approx(
        probabilities[[3, 5, 7]].max(-1).values.mean().item(), abs=1e-6)
    assert ablation_sweep(model, tokens, confidence).effect.shape == (3, 4)
    loss_sweep = ablation_sweep(model, tokens, loss(tokens), batch_size=16)
    reference_loss = torch.nn.functional.cross_entropy(mechvis.run(model, PROMPT).logits[:-1], tokens[1:]).item()
    assert loss_sweep.baseline == pytest.approx(reference_loss, abs=1e-5)


def test_patching_the_whole_clean_residual_recovers_the_clean_logits(tiny):
    model, _ = tiny("llama")
    clean = mechvis.run(model, PROMPT)
    corrupted = mechvis.run(model, "When Mary and John went to the store, Mary gave a drink to")
    last = model.cfg.n_layers - 1
    with intervene(model, patch_activation(clean, f"blocks.{last}.hook_resid_pre")):
        patched = mechvis.run(model, "When Mary and John went to the store, Mary gave a drink to")
    torch.testing.assert_close(patched.logits, clean.logits, rtol=0, atol=1e-6)


def test_residual_patching_is_one_where_the_prompts_differ(tiny):
    model, _ = tiny("llama")
    clean = mechvis.run(model, PROMPT)
    corrupted = mechvis.run(model, "When Mary and John went to the store, Mary gave a drink to")
    differing = [p for p, (a, b) in enumerate(zip(clean.tokens, corrupted.tokens)) if a != b]
    assert len(differing) == 1
    result = activation_patching(model, clean, corrupted, logit_difference(model, " Mary", " John"), kind="resid_pre")
    # Layer 0's residual is the embedding: patching the one differing token makes the input clean.
    assert result.normalised[0, differing[0]].item() == pytest.approx(1.0, abs=1e-4)
    same = [p for p in range(len(clean.tokens)) if p != differing[0]]
    assert result.normalised[0, same].abs().max() < 1e-4
    heads = activation_patching(model, clean, corrupted, logit_difference(model, " Mary", " John"), kind="heads")
    with torch.no_grad():
        def one_head(z, hook):
            z = z.clone()
            z[:, :, 1] = clean.cache["blocks.1.attn.hook_z"][:, :, 1]
            return z
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", one_head)]):
            manual = logit_difference(model, " Mary", " John")(model(corrupted.tokens[None]))[0].item()
    assert heads.patched[1, 1].item() == pytest.approx(manual, abs=1e-5)
    with pytest.raises(InvalidArgumentError, match="same number of tokens"):
        activation_patching(model, clean, mechvis.run(model, "Too short"), loss(clean.tokens))


def test_attention_steering_scales_and_renormalises(tiny):
    model, _ = tiny("llama")
    clean = mechvis.run(model, PROMPT)
    keys, queries = [2, 3], [8, 10]
    with intervene(model, steer_attention(model, keys, 3.0, query_positions=queries, layers=[1], heads=[0, 2])):
        steered = mechvis.run(model, PROMPT)
    before = clean.cache["blocks.1.attn.hook_pattern"][0]
    after = steered.cache["blocks.1.attn.hook_pattern"][0]
    for head in (0, 2):
        for query in queries:
            expected = before[head, query].clone()
            expected[keys] *= 3.0
            torch.testing.assert_close(after[head, query], expected / expected.sum())
    torch.testing.assert_close(after[1], before[1])  # other heads untouched
    torch.testing.assert_close(after[:, 5], before[:, 5])  # other queries untouched
    with intervene(model, steer_attention(model, keys, 1.0)):
        identity = mechvis.run(model, PROMPT)
    torch.testing.assert_close(identity.logits, clean.logits, atol=1e-6, rtol=0)


def test_activation_addition(tiny):
    model, _ = tiny("llama")
    clean = mechvis.run(model, PROMPT)
    with intervene(model, add_vector(model, 1, torch.zeros(64))):
        zero = mechvis.run(model, PROMPT)
    torch.testing.assert_close(zero.logits, clean.logits, rtol=0, atol=0)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with intervene(model, add_vector(model, 1, vector, scale=2.0, positions=[4])):
        steered = mechvis.run(model, PROMPT)
    difference = steered.cache["blocks.1.hook_resid_post"][0] - clean.cache["blocks.1.hook_resid_post"][0]
    torch.testing.assert_close(difference[4], 2.0 * vector)
    assert difference[:4].abs().max() == 0
    direction = steering_vector(model, ["I love this!", "Wonderful day."], ["I hate this!", "Awful day."], 1)
    assert direction.shape == (64,)
    with pytest.raises(InvalidArgumentError, match="shape"):
        add_vector(model, 1, torch.zeros(63))


@pytest.mark.parametrize("make", [
    lambda model: ablate_heads(model, [(1, 0), (2, 3)]),
    lambda model: steer_attention(model, [1, 2], 4.0),
    lambda model: add_vector(model, 0, torch.ones(64) * 0.5, positions=[3, 12, 14]),
])
def test_interventions_act_the_same_while_generating(tiny, make):
    model, _ = tiny("llama")
    with intervene(model, make(model)):
        trace = mechvis.generate(model, PROMPT, max_new_tokens=6)
    # trace.run is one full pass over the same tokens under the same intervention: the KV-cached
    # steps must have seen the same logits (positions tracked across steps).
    teacher_forced = trace.run.logits[trace.prompt_length - 1 : -1].log_softmax(-1)
    torch.testing.assert_close(trace.step_logits.log_softmax(-1), teacher_forced, atol=1e-4, rtol=0)
    plain = mechvis.generate(model, PROMPT, max_new_tokens=6)
    assert not torch.allclose(plain.step_logits, trace.step_logits)


def test_keyword_boost(tiny):
    model, _ = tiny("llama")
    boost = KeywordBoost(model, [" banana"], bias=100.0)
    trace = mechvis.generate(model, PROMPT, max_new_tokens=3, recorders=[boost])
    banana = model.hf_tokenizer.encode(" banana", add_special_tokens=False)
    assert trace.generated_ids == banana * 3
    with pytest.raises(InvalidArgumentError, match="No keywords"):
        KeywordBoost(model, [], 1.0)


def test_bad_indices(tiny):
    model, _ = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="layer 3"):
        ablate_heads(model, [(3, 0)])
    with pytest.raises(InvalidArgumentError, match="head 4"):
        ablate_heads(model, [(0, 4)])
    with pytest.raises(InvalidArgumentError, match="pair"):
        ablate_heads(model, [5])
    with pytest.raises(InvalidArgumentError, match="No heads"):
        ablate_heads(model, [])
    with pytest.raises(InvalidArgumentError, match="method"):
        ablate_heads(model, [(0, 0)], method="noise")
    with pytest.raises(InvalidArgumentError, match="component"):
        ablate_layers(model, [0], component="norm")
    with pytest.raises(InvalidArgumentError, match="not one"):
        target_probability(model, " internationalisation")
    with pytest.raises(InvalidArgumentError, match="factor"):
        steer_attention(model, [1], -1.0)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_cli_ablate_writes_the_heatmap_and_table(tmp_path, tokenizer, method, capsys):
    from mechvis.cli import main
    from tests.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output = tmp_path / "ablation.html"
    arguments = ["ablate", "--prompt", "Tom & <b>Ann</b> went to the", "--target", " store", "--model", str(model_dir),
                 "--method", method, "-o", str(output)]
    assert main(arguments) == 0
    document = output.read_text()
    assert document.count("<tr><td>L") == 10 and "data:image/png;base64," in document
    assert "Tom &amp; &lt;b&gt;Ann&lt;/b&gt;" in document and "<b>Ann</b>" not in document
    assert "L" in capsys.readouterr().out
    assert main(arguments) == 2  # no silent overwrite


def test_report_ablation_section(tiny, tmp_path):
    import json

    from mechvis.report import write_report

    model, _ = tiny("llama")
    write_report(model, "One two three", tmp_path / "r.html", json_path=tmp_path / "r.json", max_new_tokens=3, ablation=True)
    exported = json.loads((tmp_path / "r.json").read_text())
    assert len(exported["ablation"]["effect"]) == 3 and len(exported["ablation"]["effect"][0]) == 4
    assert '<section id="ablation">' in (tmp_path / "r.html").read_text()
