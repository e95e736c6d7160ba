"""`mechvis.config` / `mechvis.config_context`, and what `fast_decoding=False` switches off: the halves
product, grouped-query attention, lean steps and the preallocated KV cache (HF's plain modules decode)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

import mechvis
from mechvis.errors import InvalidArgumentError
from mechvis.generation.decoding import decoding_stats
from mechvis.generation.decoding.cache import preallocated_cache
from mechvis.generation.decoding.decoder import decoding_model, _unwrapped
from mechvis.generation.decoding.grouped import _GROUPED_ATTENTION
from mechvis.generation.decoding.halves import SingleRowLinear
from mechvis.generation.decoding.memo import VERIFIED


def _lean_steps() -> int:
    return decoding_stats().get("lean_steps", 0)


def test_config_reads_sets_and_the_context_restores():
    assert mechvis.config() == {"fast_decoding": True}
    with mechvis.config_context(fast_decoding=False) as inside:
        assert inside == mechvis.config() == {"fast_decoding": False}
        with mechvis.config_context(fast_decoding=True):
            assert mechvis.config()["fast_decoding"] is True  # the innermost block wins
        assert mechvis.config()["fast_decoding"] is False
    assert mechvis.config()["fast_decoding"] is True
    with pytest.raises(RuntimeError), mechvis.config_context(fast_decoding=False):
        raise RuntimeError("restored on the way out too")
    assert mechvis.config()["fast_decoding"] is True
    try:
        assert mechvis.config(fast_decoding=False) == {"fast_decoding": False}
        seen = []
        thread = threading.Thread(target=lambda: seen.append(mechvis.config()["fast_decoding"]))
        thread.start()
        thread.join()
        assert seen == [False]  # process-wide: every thread
    finally:
        mechvis.config(fast_decoding=True)
    assert mechvis.config()["fast_decoding"] is True


def test_a_context_block_stays_in_its_thread():
    inside, outside = threading.Event(), threading.Event()
    seen = []

    def other():
        with mechvis.config_context(fast_decoding=False):
            inside.set()
            outside.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    seen.append(mechvis.config()["fast_decoding"])
    outside.set()
    thread.join()
    assert seen == [True]


@pytest.mark.parametrize("settings", [{"fast_decodng": False}, {"speed": 1}])
def test_unknown_settings_name_the_valid_ones(settings):
    with pytest.raises(InvalidArgumentError, match="fast_decoding"):
        mechvis.config(**settings)
    with pytest.raises(InvalidArgumentError, match="fast_decoding"):
        with mechvis.config_context(**settings):
            pass
    assert mechvis.config() == {"fast_decoding": True}


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_settings_take_values_of_their_type(value):
    with pytest.raises(InvalidArgumentError, match="bool"):
        mechvis.config(fast_decoding=value)
    with pytest.raises(InvalidArgumentError, match="bool"):
        with mechvis.config_context(fast_decoding=value):
            pass
    assert mechvis.config() == {"fast_decoding": True}


def _fast_paths(decoder: torch.nn.Module) -> dict[str, bool]:
    modules = list(decoder.modules())
    return {
        "halves": any(type(module) is SingleRowLinear for module in modules),
        "grouped": any(getattr(getattr(module, "config", None), "_attn_implementation", None) == _GROUPED_ATTENTION
                       for module in modules if hasattr(module, "num_key_value_groups")),
        "lean": any("_mechvis_lean_plan" in module.__dict__ for module in modules),
    }


def test_fast_decoding_off_decodes_through_hfs_plain_modules_with_the_same_tokens(tiny):
    """Off: no `SingleRowLinear`, no grouped attention, no lean step, no preallocated cache, the
    bridge's wrappers still skipped; the tokens and step logits those of the fast path (≤ 1e-5, as
    with and without lean steps) and of HF's own greedy decoding."""
    model, reference = tiny("llama", seed=21)  # 4 query and 2 key/value heads: grouped attention applies
    shapes = Counter(tuple(linear.weight.shape) for linear in _unwrapped(model.original_model, halves=False, grouped=False).modules()
                     if type(linear) is torch.nn.Linear and SingleRowLinear.suits(linear))
    with VERIFIED.isolated():
        VERIFIED.remember("halves", (tuple(sorted(shapes.items())), torch.get_num_threads()), True)  # as if this machine measured the halves product faster
        assert _fast_paths(decoding_model(model)) == {"halves": True, "grouped": True, "lean": True}
        before = _lean_steps()
        fast = mechvis.generate(model, "Once upon a time", max_new_tokens=10, analysis_pass=False)
        assert _lean_steps() - before >= len(fast.generated_ids) - 1
        with mechvis.config_context(fast_decoding=False):
            decoder = decoding_model(model)
            assert _fast_paths(decoder) == {"halves": False, "grouped": False, "lean": False}
            assert not any("_original_component" in module._modules for module in decoder.modules())  # still unwrapped
            assert preallocated_cache(decoder, 16) is None
            before = _lean_steps()
            plain = mechvis.generate(model, "Once upon a time", max_new_tokens=10, analysis_pass=False)
            assert _lean_steps() == before
        assert _fast_paths(decoding_model(model)) == {"halves": True, "grouped": True, "lean": True}  # restored
    assert plain.generated_ids == fast.generated_ids
    assert (plain.step_logits - fast.step_logits).abs().max() <= 1e-5
    prompt_ids = plain.run.tokens[: plain.prompt_length].tolist()
    with torch.no_grad():
        hf = reference.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                max_new_tokens=10, do_sample=False, pad_token_id=2)
    assert plain.generated_ids == hf[0, len(prompt_ids):].tolist()[: len(plain.generated_ids)]


def test_a_context_block_around_stream_generate_reaches_its_decoding_thread(tiny):
    model, _ = tiny("llama", seed=22)
    mechvis.generate(model, "Once", max_new_tokens=2, analysis_pass=False)  # the checks, made once
    with mechvis.config_context(fast_decoding=False):
        before = _lean_steps()
        events = list(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False))
        assert _lean_steps() == before and len(events) > 1
    before = _lean_steps()
    list(mechvis.stream_generate(model, "Once upon a time", max_new_tokens=6, analysis_pass=False))
    assert _lean_steps() > before


def test_prepare_decoding_checks_nothing_while_off(tiny, monkeypatch):
    import mechvis.generation.decoding.decoder as decoder

    model, _ = tiny("llama", seed=23)
    called = []
    monkeypatch.setattr(decoder, "halves_win", lambda root: called.append(root) or False)
    with mechvis.config_context(fast_decoding=False):
        mechvis.generation.prepare_decoding(model)
    assert called == []
    mechvis.generation.prepare_decoding(model)
    assert called
