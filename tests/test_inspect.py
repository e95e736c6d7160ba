"""inspect_model / `mechvis inspect`: the architecture numbers, read independently from configs."""

from __future__ import annotations

import pytest

from mechvis.models.architecture import format_inspection, hook_names_by_component, inspect_model
from mechvis.cli import main


def _hf_parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # ties counted once


@pytest.mark.parametrize(
    ("architecture", "overrides", "kind", "positional", "norm", "mlp"),
    [
        ("llama", {}, "GQA", "RoPE (θ=10000)", "RMSNorm", "gated"),
        ("llama", {"num_key_value_heads": 1}, "MQA", "RoPE", "RMSNorm", "gated"),
        ("llama", {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
         "MHA", "RoPE (θ=500000)", "RMSNorm", "gated"),
        ("gpt2", {}, "MHA", "learned absolute", "LayerNorm", "plain"),
        ("gemma2", {}, "GQA", "RoPE", "RMSNorm", "gated"),
    ],
)
def test_summary_matches_the_config(tiny, architecture, overrides, kind, positional, norm, mlp):
    bridge, reference = tiny(architecture, **overrides)
    summary = inspect_model(bridge)
    config = reference.config
    assert summary.n_layers == config.num_hidden_layers
    assert summary.d_model == config.hidden_size
    assert summary.n_heads == config.num_attention_heads
    assert summary.n_kv_heads == getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert summary.attention_kind == kind
    assert summary.positional.startswith(positional)
    assert summary.norm == norm and summary.mlp.startswith(mlp)
    assert summary.d_vocab == config.vocab_size
    assert summary.n_params == _hf_parameter_count(reference)
    assert summary.sliding_window == (8 if architecture == "gemma2" else None)


def test_hook_names_are_grouped_by_component(tiny):
    bridge, _ = tiny("llama")
    groups = hook_names_by_component(bridge)
    assert "hook_pattern" in groups["blocks.{i}.attn"]
    assert "hook_resid_post" in groups["blocks.{i}"]
    assert not any(component.startswith("blocks.1") for component in groups)
    text = format_inspection(bridge)
    assert "blocks: 3 × BlockBridge" in text and "attn: " in text


def test_cli_inspect_a_local_directory(tmp_path, tokenizer, capsys):
    from tests.tiny import tiny_hf_model

    tiny_hf_model("gpt2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "GPT2LMHeadModel" in output and "learned absolute" in output and "hook_resid_pre" in output


def test_cli_reports_errors_without_a_traceback(capsys):
    assert main(["inspect", "--model", "no-such-org/no-such-model"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mechvis: error:") and "Traceback" not in error


@pytest.mark.integration
def test_embedded_summary(embedded):
    summary = inspect_model(embedded)
    assert (summary.n_layers, summary.d_model, summary.n_heads, summary.n_kv_heads) == (30, 576, 9, 3)
    assert summary.attention_kind == "GQA" and summary.positional == "RoPE (θ=100000)"
    assert summary.n_params == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert summary.n_ctx == 8192
