"""`ray-updown <stage>`: one subcommand per stage of the data's way.

Each subcommand parses its flags, builds the stage's typed config (defaults, then `--config`
YAML, then the convenience flags, then `key=value` overrides) and calls the stage's one entry
function, which ends with a summary of what it wrote where. Errors of the package are printed
as one line on stderr with exit status 2; no stack trace (cli_output.py: errors, warnings
and the Ray workers' output). The subcommands and their arguments are cli_commands.py's
table; what each does is cli_handlers.py.
"""

from __future__ import annotations

import argparse
import sys

from ray_updown.cli_commands import COMMANDS, Command


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as the package's (its usage block is --help's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config values (applied before overrides)")
    p.add_argument("--show-config", action="store_true",
                   help="print every config field with its resolved value as YAML, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted for nested fields (e.g. optim.lr=0.02)")


def _add_command(sub, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help,
                       description=command.help if command.describe else None)
    for a in command.args:
        p.add_argument(*a.names, **a.options)
    if command.config:
        _add_config_args(p)
    p.set_defaults(spec=command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ray-updown", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ray_updown.cli_output import run_command

    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.spec.handler(args))


if __name__ == "__main__":
    sys.exit(main())
