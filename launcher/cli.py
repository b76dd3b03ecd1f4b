"""`xdrive`: the launcher CLI. Thin: one command is one library call; errors become one line."""

from __future__ import annotations

import sys
from typing import Any

import click

from xdrive import __version__
from xdrive.errors import XdriveError


class _Group(click.Group):
    """Turns library errors into a clean one-line message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XdriveError as e:
            click.echo(f"xdrive: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xdrive")
def cli() -> None:
    """A named, portable drive for AWS spot instances.

    \b
    Example:
      xdrive sandbox up          # a local AWS to try everything on
    """


def _register_subcommands() -> None:
    from xdrive.sandbox.cli import sandbox

    cli.add_command(sandbox)


def main() -> None:
    _register_subcommands()
    cli()
