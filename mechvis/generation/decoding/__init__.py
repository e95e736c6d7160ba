"""CPU fast paths for decoding, behind `mechvis.config(fast_decoding=...)` (default on): the model
HF's generate runs (`decoder`), the halves product (`halves`), grouped-query attention without
`repeat_kv` (`grouped`), the preallocated KV cache (`cache`) and lean single-token steps (`lean`).
Each is used only where a check at first use found it equal to what it replaces, remembered in
one memo (`memo.VERIFIED`); `decoding_stats()` counts what they did."""

from mechvis.generation.decoding.memo import decoding_stats

__all__ = ["decoding_stats"]
