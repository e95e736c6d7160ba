"""Model loading: the embedded default, hub names, local directories and HF model objects."""

from mechvis.models.embedded import EMBEDDED_MODEL_NAME, cache_dir, embedded_gguf_path, embedded_model_dir
from mechvis.models.loading import architecture_of, load_model, supported_architectures

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "architecture_of",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "load_model",
    "supported_architectures",
]
