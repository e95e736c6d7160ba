"""Top-k over long rows (a vocabulary) without a full `torch.topk` pass.

`torch.topk` over a 49,152-wide row costs about twice an in-cache `log_softmax` of it on CPU. Two
levels are cheaper: view each row as chunks of `CHUNK` entries, take every chunk's maximum (one
`amax` pass at memory speed), keep the k chunks with the largest maxima (plus the remainder that
does not fill a chunk), and run `torch.topk` over those k·CHUNK candidates only.

Why the candidates hold the top-k values (ties included): let S be the k chosen chunks and m_S the
smallest of their maxima. Every chunk outside S has its maximum ≤ m_S, and S holds at least k
entries ≥ m_S (its k maxima), so the k-th largest value v_k of the row is ≥ m_S. An entry outside S
is ≤ m_S ≤ v_k: every entry > v_k is in S, and S holds as many entries equal to v_k as the top k
need (if v_k > m_S all of them, since none is outside; if v_k = m_S, S has ≥ k entries ≥ v_k). So
the k largest values of the candidates are the k largest values of the row, in the same order.
The ids can differ from `torch.topk`'s only between exactly equal values (whose order topk leaves
unspecified too). NaN entries are not supported (rows of finite values and ±inf are).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

CHUNK = 128  # entries per chunk: 384 chunks for a 49,152-token vocabulary; k = 5 leaves 640 candidates


def two_level_topk(
    rows: Float[Tensor, "n width"], k: int, chunk: int = CHUNK
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """(values, ids) of the k largest entries of each row, largest first: the values equal
    `rows.topk(k, dim=-1).values`; ids equal topk's except between exactly tied values.

    `rows` must be 2-D and contiguous in its last dimension; 1 ≤ k ≤ width.
    """
    n, width = rows.shape
    n_chunks = width // chunk
    if n_chunks <= 2 * k or n == 0:  # too few chunks to skip any: one topk over the row
        return rows.topk(k, dim=-1)
    full = n_chunks * chunk
    chunks = rows[:, :full].reshape(n, n_chunks, chunk)  # a view for contiguous rows
    chosen = chunks.amax(-1).topk(k, dim=-1, sorted=False).indices  # (n, k) chunk ids
    candidates = chunks[torch.arange(n, device=rows.device)[:, None], chosen].view(n, k * chunk)
    ids = (chosen[:, :, None] * chunk + torch.arange(chunk, device=rows.device)).view(n, k * chunk)
    if full < width:  # the remainder that does not fill a chunk is always a candidate
        candidates = torch.cat([candidates, rows[:, full:]], dim=1)
        ids = torch.cat([ids, torch.arange(full, width, device=rows.device).expand(n, -1)], dim=1)
    values, where = candidates.topk(k, dim=-1)
    return values, ids.gather(1, where)
