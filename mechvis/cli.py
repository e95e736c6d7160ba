"""The `mechvis` command line: `mechvis inspect`, `mechvis demo`, ..., `mechvis serve`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mechvis.demo import run_demo
from mechvis.errors import InvalidArgumentError, MechvisError
from mechvis.generation import SamplingSettings
from mechvis.images import load_image
from mechvis.models import load_model
from mechvis.models.architecture import format_inspection
from mechvis.models.embedded import cache_dir
from mechvis.report import write_report
from mechvis.report.ablation import write_ablation_report
from mechvis.studies.instructions import instruction_attention_check
from mechvis.studies.repetition_eval import PROMPTS, format_results, run_evaluation
from mechvis.sweep import run_sweep, write_sweep_report
from mechvis.sweep.example import build_example
from mechvis.viz.figures import instruction_check_figure

DEMO_OUTPUT = "out/demo.html"


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct, offline)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights' dtype (analyses compute their metrics in float32 or float64 either way)",
    )


def _inspect(arguments: argparse.Namespace) -> None:
    print(format_inspection(load_model(arguments.model, dtype=arguments.dtype)))


INSTRUCTION_CHECK_OUTPUT = "out/instruction-check"


def _refuse_to_replace(path: str | None, default: str | None, force: bool) -> None:
    """A file the user named (not mechvis's own default output) is never replaced without --force."""

    if path is not None and path != default and Path(path).exists() and not force:
        raise InvalidArgumentError(f"{path} already exists; pass --force to replace it, or choose another file.")


def _demo(arguments: argparse.Namespace) -> None:
    _refuse_to_replace(arguments.output, DEMO_OUTPUT, arguments.force)
    run_demo(model_name=arguments.model, dtype=arguments.dtype, max_new_tokens=arguments.max_new_tokens, output=arguments.output)


def _config_count(model: str | None, key: str) -> int | None:
    """A count (`num_hidden_layers`, `max_position_embeddings`) of the language model read from
    config.json alone (the embedded model's converted cache, or a local model directory), without
    loading weights; None when not known cheaply (a hub name: the model load checks it)."""

    if model is None:
        path = cache_dir() / "smollm2-135m-instruct" / "config.json"
    else:
        path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    count = (config.get("text_config") or {}).get(key, config.get(key))
    return count if isinstance(count, int) and count > 0 else None


def _check_output_path(option: str, path: str | None) -> None:
    """An output file's place must be a directory or missing (made when the file is written)."""

    if path is None:
        return
    if not str(path).strip():
        raise InvalidArgumentError(f"{option} is empty; give a file name such as report.html.")
    blocking = next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise InvalidArgumentError(f"{option} {path} cannot be written: {blocking} is a file, not a directory.")
    # A file can be made where the output goes (tried with a temporary file, removed at once), so an
    # unwritable place fails now, not after the model has loaded and the run is lost.

    existing = next(parent for parent in Path(path).absolute().parents if parent.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        missing = "" if existing == Path(path).absolute().parent else f" (to hold {Path(path).absolute().parent})"
        raise InvalidArgumentError(
            f"{option} {path} cannot be written: nothing can be made in {existing}{missing}: {error.strerror or error}."
        ) from None


def _check_report_arguments(arguments: argparse.Namespace) -> None:
    """Everything about `mechvis report`'s arguments that can be checked without the model, checked
    before it loads (a bad option fails in well under a second)."""

    if not arguments.prompt.strip():
        raise InvalidArgumentError("--prompt is empty; give the text to generate from.")
    if arguments.max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be a positive integer; got {arguments.max_new_tokens}.")
    context = _config_count(arguments.model, "max_position_embeddings")
    if context is not None and arguments.max_new_tokens >= context:
        raise InvalidArgumentError(
            f"--max-new-tokens {arguments.max_new_tokens} does not fit this model's context of {context} tokens "
            "together with the prompt; ask for fewer."
        )

    try:  # the validator `generate` runs: temperature ≥ 0, a seed torch accepts
        SamplingSettings(arguments.temperature, seed=arguments.seed).validate()
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"--{error}") from None
    for option, path in (("-o/--output", arguments.output), ("--json", arguments.json)):
        _check_output_path(option, path)
        if path is not None and Path(path).is_dir():
            raise InvalidArgumentError(f"{option} {path} is a directory; give a file name such as report.html.")
        _refuse_to_replace(path, None, arguments.force)
    if arguments.json is not None and Path(arguments.json).resolve() == Path(arguments.output).resolve():
        raise InvalidArgumentError("--json and -o/--output name the same file; give two different files.")
    if arguments.layers:
        n_layers = _config_count(arguments.model, "num_hidden_layers")
        bad = [layer for layer in arguments.layers if n_layers is not None and not -n_layers <= layer < n_layers]
        if bad:
            raise InvalidArgumentError(f"--layers {bad[0]} is out of range: this model has layers 0..{n_layers - 1}.")
        normalised = [layer % n_layers for layer in arguments.layers] if n_layers is not None else list(arguments.layers)
        repeated = sorted({layer for layer in normalised if normalised.count(layer) > 1})
        if repeated:
            raise InvalidArgumentError(f"--layers names layer {repeated[0]} more than once; list each layer once.")
    if arguments.image is not None:
        load_image(arguments.image)  # an unreadable image fails here, not after the model loads


def _report(arguments: argparse.Namespace) -> None:
    _check_report_arguments(arguments)
    write_report(
        load_model(arguments.model, dtype=arguments.dtype),
        arguments.prompt,
        arguments.output,
        json_path=arguments.json,
        chat=arguments.chat,
        max_new_tokens=arguments.max_new_tokens,
        layers=arguments.layers,
        temperature=arguments.temperature,
        seed=arguments.seed,
        ablation=arguments.ablation,
        image=arguments.image,
        overwrite=arguments.force,
        full_rollout=arguments.full_rollout,
    )
    print(f"Wrote {arguments.output}" + (f" and {arguments.json}" if arguments.json else ""))


def _repetition_eval(arguments: argparse.Namespace) -> None:
    if not 2 <= arguments.prompts <= len(PROMPTS):
        raise InvalidArgumentError(f"--prompts must be between 2 and {len(PROMPTS)}; got {arguments.prompts}.")
    results = run_evaluation(
        load_model(arguments.model, dtype=arguments.dtype),
        n_prompts=arguments.prompts,
        max_new_tokens=arguments.max_new_tokens,
        out_dir=Path(arguments.out),
        sampler_prompts=min(arguments.sampler_prompts, arguments.prompts),
        weights_path=Path(arguments.weights) if arguments.weights else None,
    )
    print(format_results(results))
    print(f"\nWrote {arguments.out}/repetition-eval.json and repetition-eval.png")


def _ablate(arguments: argparse.Namespace) -> None:
    sweep = write_ablation_report(
        load_model(arguments.model, dtype=arguments.dtype), arguments.prompt, arguments.target, arguments.output,
        method=arguments.method, chat=arguments.chat, overwrite=arguments.force,
    )
    print("Heads whose ablation moves P(target) most:")
    for layer, head, effect in sweep.top(10):
        print(f"  L{layer}H{head}: {effect:+.4f}")
    print(f"Wrote {arguments.output}")


def _instruction_check(arguments: argparse.Namespace) -> None:
    prompts = list(arguments.prompt or [])
    if arguments.prompts_file:
        try:
            prompts += [line for line in Path(arguments.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(f"--prompts-file {arguments.prompts_file} cannot be read as UTF-8 text: "
                                       f"{getattr(error, 'strerror', None) or error}.") from error
    if not prompts:
        raise InvalidArgumentError("Give at least one prompt: --prompt TEXT (repeatable) or --prompts-file FILE.")
    if not arguments.keyword or not all(keyword.strip() for keyword in arguments.keyword):
        raise InvalidArgumentError("Give the instruction's keywords with --keyword, each a non-empty string.")
    out = Path(arguments.out)
    blocking = next((parent for parent in (out, *out.parents) if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise InvalidArgumentError(f"--out {out} cannot be a directory: {blocking} is a file.")
    for name in ("instruction-check.json", "instruction-check.png"):  # mechvis's default folder is its own
        _refuse_to_replace(str(out / name), str(Path(INSTRUCTION_CHECK_OUTPUT) / name), arguments.force)
    check = instruction_attention_check(
        load_model(arguments.model), prompts, arguments.keyword, arguments.threshold,
        max_new_tokens=arguments.max_new_tokens, chat=arguments.chat, match=arguments.match,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "instruction-check.json").write_text(json.dumps(
        {"keywords": check.keywords, "threshold": check.threshold, "layers": check.layers, "prompts": check.table()}, indent=2))
    instruction_check_figure(check).savefig(out / "instruction-check.png", dpi=120)
    for row in check.table():
        print(f"{'BELOW' if row['below_threshold'] else 'ok   '}  {row['score']:.3f}  {row['prompt'][:70]}")
    print(f"Wrote {out}/instruction-check.json and instruction-check.png")


# --- mechvis sweep / sweep-report (mechvis/sweep) ---------------------------------------------

def _sweep_params(pairs: Sequence[str]) -> dict:
    params: dict = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        analysis, dot, name = key.partition(".")
        if not separator or not dot:
            raise InvalidArgumentError(f"--param takes ANALYSIS.NAME=VALUE (e.g. lens.k=5); got {pair!r}.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        params.setdefault(analysis, {})[name] = parsed
    return params


def _sweep(arguments: argparse.Namespace) -> None:
    dataset, analyses = arguments.dataset, arguments.analysis
    if arguments.example:
        if arguments.model is not None:
            raise InvalidArgumentError("--example runs on the embedded model; drop --model.")
        if dataset is not None:
            raise InvalidArgumentError(f"--example builds its own dataset; drop {dataset} or drop --example.")
        if arguments.example_items < 1:
            raise InvalidArgumentError(f"--example-items must be at least 1; got {arguments.example_items}.")
        paths = build_example(Path(arguments.output) / "example-data", n_sentences=arguments.example_items,
                              n_paired=arguments.example_items // 3)
        dataset, analyses = paths["text"], analyses or ["lens", "heads", "tokens"]
    if dataset is None:
        raise InvalidArgumentError("Give a dataset (a .jsonl or .parquet file) or --example.")
    if arguments.backend == "local" and arguments.workers is not None:
        raise InvalidArgumentError("--workers sets the number of Ray actors; use it with --backend ray "
                                   "(the local back-end runs one process: --threads-per-worker sets its threads).")
    result = run_sweep(
        dataset, arguments.output, analyses or ["lens"], params=_sweep_params(arguments.param), model=arguments.model,
        dtype=arguments.dtype, shard_size=arguments.shard_size, backend=arguments.backend, address=arguments.address,
        workers=arguments.workers, threads_per_worker=arguments.threads_per_worker, overwrite=arguments.overwrite,
        batch=not arguments.no_batch,
    )
    done = len(result.shards_run)
    print(f"{result.n_items} items in {result.n_shards} shards: {done} run, {result.shards_skipped} already complete "
          f"({result.seconds:.1f} s). Rows and summary in {result.out_dir}")


def _sweep_report(arguments: argparse.Namespace) -> None:
    _refuse_to_replace(arguments.output, None, arguments.force)
    print(f"Wrote {write_sweep_report(arguments.directory, arguments.output)}")


def _add_sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="run analyses over a dataset into Parquet shards (resumable; local or Ray)")
    sweep.add_argument("dataset", nargs="?", default=None, help="a .jsonl or .parquet dataset (format in the README)")
    sweep.add_argument("-a", "--analysis", nargs="+", default=None,
                       help="lens, heads, tokens, repetition, image, ablation (default: lens)")
    sweep.add_argument("-o", "--output", required=True, help="output directory (re-running the same sweep resumes)")
    _add_model_argument(sweep)
    sweep.add_argument("--param", action="append", default=[], help="ANALYSIS.NAME=VALUE, e.g. lens.k=5 (repeatable)")
    sweep.add_argument("--shard-size", type=int, default=8, help="items per Parquet shard (the most a crash loses)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local")
    sweep.add_argument("--address", default=None, help="Ray cluster address (auto, ray://host:10001); default: a local cluster")
    sweep.add_argument("--workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs − 1)")
    sweep.add_argument("--threads-per-worker", type=int, default=None,
                       help="torch threads (and Ray CPUs) per Ray actor (default 1); locally: torch threads (default: unchanged)")
    sweep.add_argument("--overwrite", action="store_true", help="delete the directory's sweep files and start over")
    sweep.add_argument("--no-batch", action="store_true",
                       help="one forward per item (default: a shard's text items of equal token length share one forward)")
    sweep.add_argument("--example", action="store_true",
                       help="build the real example dataset (sentences of the Python docs) and sweep it on the embedded model")
    sweep.add_argument("--example-items", type=int, default=60, help="sentences in the --example dataset")
    sweep.set_defaults(handler=_sweep)
    report = commands.add_parser("sweep-report", help="an offline HTML summary of a sweep directory")
    report.add_argument("directory")
    report.add_argument("-o", "--output", default=None,
                        help="the HTML file (default: DIR/sweep-report.html, replaced; another existing file needs --force)")
    report.add_argument("--force", action="store_true", help="replace an existing --output file")
    report.set_defaults(handler=_sweep_report)


def _serve(arguments: argparse.Namespace) -> None:
    from mechvis.serve import serve  # fastapi and uvicorn: the optional `web` extra

    serve(arguments.model, host=arguments.host, port=arguments.port, model_roots=arguments.model_root,
          token=arguments.token, open_browser=arguments.open, dtype=arguments.dtype)


def _add_serve_parser(commands) -> None:
    serve_parser = commands.add_parser("serve", help="the interactive inference visualiser (a local web app)")
    _add_model_argument(serve_parser)
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs a token)")
    serve_parser.add_argument("--port", type=int, default=5050, help="0 picks a free port")
    serve_parser.add_argument("--model-root", action="append", default=[], metavar="DIR",
                              help="a directory whose model subdirectories the page may load (repeatable)")
    serve_parser.add_argument("--token", default="auto", help="auto (random), none (loopback only) or a value")
    serve_parser.add_argument("--open", action="store_true", help="open the page in the browser")
    serve_parser.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechvis", description="Look inside language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect_parser = commands.add_parser(
        "inspect", help="architecture summary, component tree and hook names of a model"
    )
    _add_model_argument(inspect_parser)
    inspect_parser.set_defaults(handler=_inspect)

    demo_parser = commands.add_parser(
        "demo", help="analyse the embedded model on a built-in chat prompt that makes it loop"
    )
    _add_model_argument(demo_parser)
    demo_parser.add_argument("--max-new-tokens", type=int, default=64)
    demo_parser.add_argument("-o", "--output", default=DEMO_OUTPUT,
                             help=f"where to write the report ({DEMO_OUTPUT} is replaced; another existing file needs --force)")
    demo_parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    demo_parser.set_defaults(handler=_demo)

    report = commands.add_parser("report", help="generate from a prompt and write one offline HTML report")
    report.add_argument("--prompt", required=True)
    _add_model_argument(report)
    report.add_argument("--chat", action="store_true", help="use the model's chat template")
    report.add_argument("--max-new-tokens", type=int, default=64)
    report.add_argument("--layers", type=int, nargs="+", default=None, help="layers with attention views (default: 4 spread over the depth)")
    report.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    report.add_argument("--seed", type=int, default=None)
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.add_argument("--json", default=None, help="also write the results as JSON (schema in the README)")
    report.add_argument("--image", default=None, help="an image file, for a vision-language model")
    report.add_argument("--ablation", action="store_true", help="add a head-ablation sweep of the last generated token")
    report.add_argument("--full-rollout", action="store_true",
                        help="also export the N × N rollout matrix in the JSON (default: rows for the last prompt token and generated tokens)")
    report.add_argument("--force", action="store_true", help="replace existing output files")
    report.set_defaults(handler=_report)

    ablate = commands.add_parser("ablate", help="ablate every head and measure P(target) at the last position")
    ablate.add_argument("--prompt", required=True)
    ablate.add_argument("--target", required=True, help="the target token (one token, e.g. ' Paris')")
    _add_model_argument(ablate)
    ablate.add_argument("--method", choices=("zero", "mean", "resample"), default="zero")
    ablate.add_argument("--chat", action="store_true")
    ablate.add_argument("-o", "--output", required=True, help="the HTML file to write")
    ablate.add_argument("--force", action="store_true", help="replace an existing output file")
    ablate.set_defaults(handler=_ablate)

    evaluation = commands.add_parser(
        "repetition-eval", help="generate a labelled corpus and score the repetition monitor and samplers"
    )
    _add_model_argument(evaluation)
    evaluation.add_argument("--prompts", type=int, default=52, help="how many built-in prompts (each greedy and sampled)")
    evaluation.add_argument("--max-new-tokens", type=int, default=96)
    evaluation.add_argument("--sampler-prompts", type=int, default=20, help="prompts for the sampler comparison")
    evaluation.add_argument("--out", default="out/repetition-eval", help="directory for the JSON and the figure")
    evaluation.add_argument("--weights", default=None, help="where to write the fitted monitor (default: --out)")
    evaluation.set_defaults(handler=_repetition_eval)

    instruction = commands.add_parser(
        "instruction-check", help="how much attention generated answers pay instruction keywords, per layer"
    )
    _add_model_argument(instruction)
    instruction.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    instruction.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    instruction.add_argument("--keyword", action="append", required=True, help="an instruction keyword (repeatable)")
    instruction.add_argument("--threshold", type=float, default=0.05, help="flag prompts whose mean attention mass is below this")
    instruction.add_argument("--match", choices=("spelling", "semantic"), default="spelling")
    instruction.add_argument("--max-new-tokens", type=int, default=32)
    instruction.add_argument("--chat", action="store_true")
    instruction.add_argument("--out", default=INSTRUCTION_CHECK_OUTPUT, help="directory for the JSON table and the figure")
    instruction.add_argument("--force", action="store_true", help="replace instruction-check.json/.png already in --out")
    instruction.set_defaults(handler=_instruction_check)
    _add_sweep_commands(commands)
    _add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        arguments.handler(arguments)
    except MechvisError as error:
        print(f"mechvis: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever torch was
        resume = " Complete shards are kept: run the same command again to resume." if arguments.handler is _sweep else ""
        print(f"mechvis: interrupted.{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
