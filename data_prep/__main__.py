"""`python -m data_prep {convert,inspect,synth} ...`, installed as the `mugs-prep` command."""

import argparse
import sys

from data_prep import OneLineParser, PrepError, convert, error_line, inspect_beton, synth
from mugs_fast.data.beton import BetonError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mugs-prep", description="Offline data preparation: image folders -> .beton, and the built-in dataset."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{convert,inspect,synth}")
    for module in (convert, inspect_beton, synth):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. Exit status: 0 done, 1 error (one line on stderr), 2 usage, 130/143 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PrepError, BetonError, OSError) as e:
        print(f"mugs-prep {args.command}: error: {error_line(e)}", file=sys.stderr)
    except KeyboardInterrupt as e:
        print(f"mugs-prep {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(e, convert.Terminated) else 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
