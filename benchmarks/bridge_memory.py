"""Resident memory of the embedded model after loading: mechvis's bridge versus the plain HF model,
each in a fresh process, measured by the OS (/proc/self/status: VmRSS now, VmHWM the peak).

`imports_mb` is the process after its imports (torch, transformers; the bridge's also mechvis and
transformer-lens), `rss_mb` after loading and one forward pass over 64 tokens (the plain model's
safetensors weights are memory-mapped and become resident only when read), `peak_mb` the
highest RSS of the process. Linux only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def measure(kind: str, directory: str | None = None) -> dict[str, float]:
    """Load the embedded model as `kind` ("hf" from its converted checkpoint `directory`, "bridge",
    or "bridge-previous": `load_model` without this issue's savings) in this process and return its memory in MB (call it in a fresh process: see
    `measure_in_subprocess`)."""
    import torch
    import transformers  # noqa: F401

    if kind in ("bridge", "bridge-previous"):
        import transformer_lens.model_bridge  # noqa: F401 - imported by load_model anyway

        import mechvis

        if kind == "bridge-previous":  # as loading was before issue 18: no trim, centring clones every weight
            import mechvis.models.loading as loading
            import mechvis.models.unembedding as unembedding

            import contextlib

            loading.release_freed_memory = lambda: False
            loading.lighter_weight_processing = contextlib.nullcontext
            loading.copy_weights_out_of_files = lambda module: 0
            unembedding._center_unembedding_only = (
                lambda center, state_dict, keys, cfg, adapter: center(state_dict, cfg=cfg, adapter=adapter))
        imports = _status()["VmRSS"]
        model = mechvis.load_model(device="cpu")
    elif kind == "hf":
        from transformers import AutoModelForCausalLM

        imports = _status()["VmRSS"]  # torch and transformers only: what a plain HF user imports
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    else:
        raise ValueError(f"kind must be 'hf' or 'bridge'; got {kind!r}")
    with torch.no_grad():
        model(torch.arange(64)[None])
    status = _status()
    tensors = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        tensors[storage.data_ptr()] = storage.nbytes()
    return {"imports_mb": imports, "rss_mb": status["VmRSS"], "peak_mb": status["VmHWM"],
            "tensor_mb": sum(tensors.values()) / 2**20}


def measure_in_subprocess(kind: str) -> dict[str, float]:
    """`measure(kind)` in a fresh Python process."""
    from mechvis.models import embedded_model_dir

    script = ("import json, sys; from benchmarks.bridge_memory import measure; "
              "print(json.dumps(measure(*sys.argv[1:])))")
    output = subprocess.run([sys.executable, "-c", script, kind, str(embedded_model_dir())], cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=900).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    hf, bridge, previous = (measure_in_subprocess(kind) for kind in ("hf", "bridge", "bridge-previous"))
    print("embedded model memory after loading (fresh process each, OS-measured, MB):")
    print(f"  {'':16s} {'imports':>8s} {'loaded':>8s} {'model':>8s} {'peak':>8s} {'tensors':>8s}")
    for name, values in (("plain HF", hf), ("bridge", bridge), ("bridge, previous", previous)):
        print(f"  {name:16s} {values['imports_mb']:8.0f} {values['rss_mb']:8.0f} "
              f"{values['rss_mb'] - values['imports_mb']:8.0f} {values['peak_mb']:8.0f} {values['tensor_mb']:8.0f}")
    extra = (bridge["rss_mb"] - bridge["imports_mb"]) - (hf["rss_mb"] - hf["imports_mb"])
    print(f"  the bridge's model holds {extra:.0f} MB more than the plain model's "
          f"(its unembedding, untied to be centred, is {bridge['tensor_mb'] - hf['tensor_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
