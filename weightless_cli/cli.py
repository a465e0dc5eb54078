"""The `weightless` command line: a thin click layer over the stage modules."""

from __future__ import annotations

import sys

import click

from weightless_cli import __version__
from weightless_cli.errors import EXIT_BAD_INPUT, WeightlessError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="weightless")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make neural networks small: prune, cluster and Bloomier-encode ONNX weights."""
    ctx.obj = {"debug": debug}


def main() -> None:
    """Console entry point: map expected errors to one-line messages and exit codes."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("weightless: aborted", err=True)
        sys.exit(130)
    except WeightlessError as exc:
        if debug:
            raise
        click.echo(f"weightless: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except MemoryError:
        if debug:
            raise
        click.echo("weightless: error: out of memory", err=True)
        sys.exit(EXIT_BAD_INPUT)
