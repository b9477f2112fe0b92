"""The ``eidetic`` command: a click group and the one place where library
errors become exit statuses and one-line messages (never a traceback)."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys

import click

from eidetic import __version__
from eidetic.core.errors import EideticError, ServerNotInstalled
from eidetic.core.layout import display

from .common import SERVER_LIBRARIES, Ctx, require_server, server_install_command

# Subcommands are imported only when used: `eidetic log` must start fast.
COMMANDS = ("init", "ingest", "status", "log", "checkout", "fsck", "purge", "send", "gui", "demo")
# What the client-only install (a lab PC's, without the [server] extra) can run;
# every other command first checks that the server libraries are installed.
CLIENT_COMMANDS = ("send", "gui")


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        command = importlib.import_module(f"{__package__}.commands.{name}").command
        if name in CLIENT_COMMANDS:
            return command
        # Checked when the command runs, after its options are parsed: its --help
        # works in the client-only install too.
        checked = copy.copy(command)
        checked.callback = _needs_server(f"eidetic {name}", command.callback)
        return checked


def _needs_server(command: str, callback):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        require_server(command)
        try:
            return callback(*args, **kwargs)
        except ImportError as e:
            # A server library found by the check but broken on import: the same one line.
            top = (e.name or "").split(".")[0]
            if top not in SERVER_LIBRARIES:
                raise
            raise ServerNotInstalled(command, [top], server_install_command()) from e
    return run


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
