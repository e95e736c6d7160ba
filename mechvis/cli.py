"""The `mechvis` command line: `mechvis inspect`, `mechvis demo`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mechvis.errors import MechvisError


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct, offline)",
    )


def _inspect(arguments: argparse.Namespace) -> None:
    from mechvis.architecture import format_inspection
    from mechvis.models import load_model

    print(format_inspection(load_model(arguments.model)))


def _demo(arguments: argparse.Namespace) -> None:
    from mechvis.demo import run_demo

    run_demo(model_name=arguments.model, max_new_tokens=arguments.max_new_tokens)


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
    demo_parser.add_argument("--max-new-tokens", type=int, default=48)
    demo_parser.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        arguments.handler(arguments)
    except MechvisError as error:
        print(f"mechvis: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
