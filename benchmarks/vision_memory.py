"""Peak memory of image-attention metrics on a tiny random LLaVA at 1,024 image tokens: mechvis's
streamed computation (hooks keep only query rows × image columns) against caching everything
with run_with_cache. Each measurement runs in its own process (peak RSS is a high-water mark)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile


def _tiny_llava():
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
                                       image_size=256, patch_size=8),  # 32 × 32 = 1,024 image tokens
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 256, "width": 256}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    bridge = mechvis.load_model(model, tokenizer=tokenizer, processor=processor, device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8"))
    return bridge, image


def _worker(mode: str) -> None:
    import mechvis
    from mechvis.analysis.vision import image_attention, stream_image_attention

    bridge, image = _tiny_llava()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prompt = "Where is the object in this picture?"
    if mode == "stream":
        result = stream_image_attention(bridge, prompt, image, query_positions=[-1])
    else:
        run = mechvis.run(bridge, prompt, image=image)
        result = image_attention(run.cache, bridge, run.segments.image_grid, query_positions=[-1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
