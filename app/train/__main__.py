"""`python -m app.train train|eval ...` until the `tokserve` command line wires these in."""

from __future__ import annotations

import argparse

from app.train.cli import add_subcommands


def main() -> int:
    """Parse and dispatch to the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="python -m app.train")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
