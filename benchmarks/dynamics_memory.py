"""Peak memory of attention dynamics over a 128-token generation with 576 image tokens (LLaVA-1.5's
24 × 24 grid: CLIP at 336 px with 14 px patches) on a tiny random LLaVA (8 layers × 8 heads):
`record_while_decoding` + `image_dynamics` (hooks keep each decode step's query row over the image) against
`generate` caching the attention patterns, then `image_dynamics` on the teacher-forced pass. Each
measurement runs in its own process; the peak is VmHWM reset after the model loads (see
benchmarks/vision_memory.py). The two results must agree (≤ 1e-4), else the benchmark fails."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from benchmarks.vision_memory import _reset_peak, _status_kb, _tiny_llava

NEW_TOKENS = 128
LAYERS, HEADS = 8, 8


def _worker(mode: str) -> None:
    import mechvis
    from mechvis.analysis import hooks_for
    from mechvis.analysis.dynamics import image_dynamics
    from mechvis.studies.executors import record_while_decoding

    bridge, image = _tiny_llava(image_size=336, patch_size=14, layers=LAYERS, heads=HEADS)  # 24 × 24 = 576 image tokens
    prompt = "Describe this picture in detail."
    before = _reset_peak()
    if mode == "stream":
        recorded = record_while_decoding(bridge, prompt, image=image, max_new_tokens=NEW_TOKENS)
        trace, dynamics = recorded.trace, image_dynamics(recorded)
    else:
        trace = mechvis.generate(bridge, prompt, image=image, max_new_tokens=NEW_TOKENS,
                                 names_filter=hooks_for(bridge, "attention"))
        dynamics = image_dynamics(trace)
    after = _status_kb("VmHWM")
    if after <= before:
        raise RuntimeError(f"peak memory did not rise above {before} kB while computing: the measurement measures nothing")
    print(json.dumps({"peak_increase_mb": (after - before) / 1024, "image_tokens": len(dynamics.grid.positions),
                      "generated": len(trace.generated_ids), "positions": len(trace.run.tokens),
                      "image_mass": dynamics.image_mass.tolist()}))


def main() -> None:
    import numpy as np

    results = {}
    for mode in ("stream", "teacher_forced"):
        with tempfile.TemporaryFile() as output:
            subprocess.run([sys.executable, "-m", "benchmarks.dynamics_memory", mode], stdout=output, check=True)
            output.seek(0)
            results[mode] = json.loads(output.read().decode().strip().splitlines()[-1])
    stream, forced = results["stream"], results["teacher_forced"]
    if stream["generated"] != forced["generated"]:
        raise RuntimeError(f"the two runs generated {stream['generated']} and {forced['generated']} tokens")
    np.testing.assert_allclose(stream["image_mass"], forced["image_mass"], atol=1e-4)  # the same dynamics
    a, b = stream["peak_increase_mb"], forced["peak_increase_mb"]
    print(f"image dynamics over {stream['generated']} generated tokens with {stream['image_tokens']} image tokens "
          f"({stream['positions']} positions; tiny LLaVA, {LAYERS} layers × {HEADS} heads): streamed peak +{a:.0f} MB, "
          f"teacher-forced (attention cache) +{b:.0f} MB ({b / max(a, 1e-9):.1f}× more); results equal ≤ 1e-4")


if __name__ == "__main__":
    _worker(sys.argv[1])
