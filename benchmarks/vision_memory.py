"""Peak memory of image-attention metrics on a tiny random LLaVA at 1,024 image tokens: mechvis's
streamed computation (hooks keep only query rows × image columns) against caching everything
with run_with_cache. Each measurement runs in its own process. The peak is the kernel's high-water
mark of resident memory (VmHWM), reset after the model is loaded (`/proc/self/clear_refs` ← 5), so
loading's own peak does not hide the analysis's; a machine where it cannot be reset or read fails
loudly instead of printing a number that measures nothing."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile


def _tiny_llava(image_size: int = 256, patch_size: int = 8, layers: int = 6, heads: int = 4):
    """A tiny random LLaVA on the embedded model's tokenizer with (image_size / patch_size)² image
    tokens (default 32 × 32 = 1,024), and a random image of that size."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    import mechvis
    from mechvis.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=2048),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((image_size, image_size, 3)) * 255).astype("uint8"))
    return bridge, image


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory cannot be measured here")


def _reset_peak() -> int:
    """Reset the resident high-water mark to the current resident size; return that size (kB)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    resident, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
    if peak > resident * 1.02 + 1024:
        raise RuntimeError(f"the peak (VmHWM {peak} kB) was not reset to the resident size ({resident} kB)")
    return resident


def _worker(mode: str) -> None:
    import mechvis
    from mechvis.analysis.vision import image_attention
    from mechvis.studies.executors import record_attention_rows

    bridge, image = _tiny_llava()
    before = _reset_peak()
    prompt = "Where is the object in this picture?"
    if mode == "stream":
        result = image_attention(record_attention_rows(bridge, prompt, image=image, query_positions=[-1]), query_positions=[-1])
    else:
        run = mechvis.run(bridge, prompt, image=image)
        result = image_attention(run, query_positions=[-1])
    after = _status_kb("VmHWM")
    if after <= before:
        raise RuntimeError(f"peak memory did not rise above {before} kB while computing: the measurement measures nothing")
    print(json.dumps({"peak_increase_mb": (after - before) / 1024, "tokens": len(result.grid.positions)}))


def main() -> None:
    results = {}
    for mode in ("stream", "cache"):
        with tempfile.TemporaryFile() as output:
            subprocess.run([sys.executable, "-m", "benchmarks.vision_memory", mode], stdout=output, check=True)
            output.seek(0)
            results[mode] = json.loads(output.read().decode().strip().splitlines()[-1])
    stream, cache = results["stream"]["peak_increase_mb"], results["cache"]["peak_increase_mb"]
    print(f"image metrics at {results['stream']['tokens']} image tokens (tiny LLaVA, 6 layers): streamed peak +{stream:.0f} MB, "
          f"run_with_cache everything +{cache:.0f} MB ({cache / max(stream, 1e-9):.1f}× more)")


if __name__ == "__main__":
    _worker(sys.argv[1])
