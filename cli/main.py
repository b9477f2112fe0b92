"""The ``eidetic`` command: a click group and the one place where library
errors become exit statuses and one-line messages (never a traceback)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from eidetic import __version__
from eidetic.core.errors import EideticError
from eidetic.core.layout import display

from .common import Ctx

# Subcommands are imported only when used: `eidetic log` must start fast.
COMMANDS = ("init", "ingest", "status", "log", "checkout", "fsck", "purge", "send", "demo")


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__package__}.commands.{name}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="EIDETIC_CONFIG", type=click.Path(dir_okay=False),
              help="Config file (default: $EIDETIC_CONFIG, else /etc/eidetic/eidetic.yaml, "
                   "else the built-in default layout under the data directory).")
@click.option("-v", "--verbose", count=True, help="Say more.")
@click.version_option(__version__, prog_name="eidetic")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """eidetic: a content-addressed archive that never forgets a version."""
    ctx.obj = Ctx(config_path, verbose)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="eidetic", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("eidetic: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except EideticError as e:
        click.echo(f"eidetic: {e.message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("eidetic: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:
        # An environment problem we did not anticipate: one line, not a traceback.
        # filename may be bytes (we pass bytes paths) and may hold any byte
        where = f": {display(os.fsencode(e.filename))}" if e.filename else ""
        click.echo(f"eidetic: {e.strerror or e}{where}", err=True)
        sys.exit(3)
    except Exception as e:  # a bug: say so in one line; the traceback on request
        if os.environ.get("EIDETIC_DEBUG"):
            raise
        click.echo(f"eidetic: internal error: {type(e).__name__}: {e} "
                   "(set EIDETIC_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(70)
    sys.exit(0)


if __name__ == "__main__":
    main()
