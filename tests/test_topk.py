"""The two-level top-k (mechvis.analysis._topk) against torch.topk: the same values, and ids that
differ only between exactly tied values (random rows with many ties, -inf entries, widths that are
not multiples of the chunk, tiny vocabularies, k up to 50)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechvis.analysis._topk import two_level_topk


def _assert_topk_equal(rows: torch.Tensor, k: int, chunk: int) -> None:
    values, ids = two_level_topk(rows, k, chunk)
    expected_values, expected_ids = rows.topk(k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(rows.gather(1, ids), values)  # each id points at its value
    assert all(len(set(row)) == k for row in ids.tolist())  # no entry twice
    distinct = torch.cat([values[:, :-1] != values[:, 1:], torch.ones(len(rows), 1, dtype=torch.bool)], 1)
    distinct &= torch.cat([torch.ones(len(rows), 1, dtype=torch.bool), values[:, 1:] != values[:, :-1]], 1)
    # an untied value, strictly above the rest of the row's values that topk left out, has the same id
    outside = rows.clone().scatter_(1, expected_ids, -torch.inf).amax(-1, keepdim=True)
    unique = distinct & (values > outside)
    assert torch.equal(ids[unique], expected_ids[unique])


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    width=st.integers(2, 3000),
    k=st.integers(1, 50),
    chunk=st.sampled_from([1, 2, 3, 7, 16, 128]),
    levels=st.integers(1, 40),  # few distinct levels: many exact ties
    infinite=st.floats(0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_level_topk_equals_torch_topk(n, width, k, chunk, levels, infinite, seed):
    k = min(k, width)
    generator = np.random.default_rng(seed)
    rows = generator.integers(0, levels, size=(n, width)).astype(np.float32) * 0.25
    rows[generator.random((n, width)) < infinite] = -np.inf
    _assert_topk_equal(torch.from_numpy(rows), k, chunk)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 50), width=st.sampled_from([49_152, 49_157, 50_257]), seed=st.integers(0, 2**31 - 1))
def test_two_level_topk_on_vocabulary_wide_rows(k, width, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(3, width, generator=generator) * 5
    rows[1, ::7] = rows[1, 3]  # a tied value repeated over many chunks
    rows[2, :100] = -torch.inf
    _assert_topk_equal(rows, k, 128)


def test_the_row_maximum_is_in_the_last_remainder():
    rows = torch.zeros(2, 1000)
    rows[0, 999] = 5.0  # the 1000 % 128 = 104 entries after the last full chunk
    rows[1, 998] = -1.0
    _assert_topk_equal(rows, 3, 128)
    assert two_level_topk(rows, 1, 128)[1][0, 0] == 999
