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
COMMANDS = ("init", "ingest", "status", "log", "checkout", "fsck", "replicate", "restore", "purge", "send", "gui", "demo")
# What the client-only install (a lab PC's, without the [server] extra) can run;
# every other command first checks that the server libraries are installed.
CLIENT_COMMANDS = ("send", "gui")


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["help", *COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "help":
            return help_command
        if name not in COMMANDS:
            return None
        command = _with_verbosity(importlib.import_module(f"{__package__}.commands.{name}").command)
        if name in CLIENT_COMMANDS:
            return command
        # Checked when the command runs, after its options are parsed: its --help
        # works in the client-only install too.
        command.callback = _needs_server(f"eidetic {name}", command.callback)
        return command


def _with_verbosity(command: click.Command) -> click.Command:
    """A copy of *command* that also takes -v/--verbose and -q/--quiet after
    its name (``eidetic fsck -v``); they add to the ones before it."""
    taken = {o for p in command.params for o in getattr(p, "opts", ())}
    extra = []
    if not taken & {"-v", "--verbose"}:
        extra.append(click.Option(["-v", "--verbose", "_eidetic_verbose"], count=True,
                                  help="Say more (may be repeated; also before the command)."))
    if not taken & {"-q", "--quiet"}:
        extra.append(click.Option(["-q", "--quiet", "_eidetic_quiet"], count=True,
                                  help="Say only errors, warnings and results (also before the command)."))
    wrapped = copy.copy(command)
    wrapped.params = [*command.params, *extra]
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, _eidetic_verbose: int = 0, _eidetic_quiet: int = 0, **kwargs):
        obj = click.get_current_context().find_object(Ctx)
        if obj is not None:
            obj.add_verbosity(_eidetic_verbose, _eidetic_quiet)
        return callback(*args, **kwargs)
    wrapped.callback = run
    return wrapped


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
                   "else the built-in default layout under the data directory).  The word "
                   "'default' (--config default, EIDETIC_CONFIG=default) means the built-in "
                   "default layout even when /etc/eidetic/eidetic.yaml exists.")
@click.option("-v", "--verbose", count=True, help="Say more (may be repeated; also after the command).")
@click.option("-q", "--quiet", count=True,
              help="Say only errors, warnings and the results a command is run for "
                   "(log's history, --json output, fsck's findings); also after the command.")
@click.version_option(__version__, prog_name="eidetic")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: int) -> None:
    """eidetic: a content-addressed archive that never forgets a version.

    `eidetic help COMMAND` (or `eidetic COMMAND --help`) explains a command.
    """
    ctx.obj = Ctx(config_path, verbose, quiet)


@click.command("help")
@click.argument("name", metavar="[COMMAND]", required=False)
@click.option("--man", is_flag=True, help="Print the man page instead (roff; read it with 'man -l -').")
@click.pass_context
def help_command(ctx: click.Context, name: str | None, man: bool) -> None:
    """Show the help of COMMAND, or of eidetic and its list of commands."""
    group_ctx = ctx.parent if ctx.parent is not None else ctx
    if man:
        from .manpages import page
        click.echo(page(name), nl=False)
        return
    if name is None:
        click.echo(group_ctx.get_help())
        return
    command = cli.get_command(group_ctx, name)
    if command is None:
        click.echo(f"eidetic: no command {name!r} (commands: {', '.join(cli.list_commands(group_ctx))})",
                   err=True)
        sys.exit(2)
    with click.Context(command, info_name=name, parent=group_ctx) as sub:
        click.echo(command.get_help(sub))


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
        # filename may be bytes (we pass bytes paths) and may hold any byte, or
        # be a file descriptor (os.stat(fd) says which one): shown as it is
        name = e.filename
        where = (f": {display(os.fsencode(name)) if isinstance(name, (str, bytes)) else name}"
                 if name is not None and name != "" else "")
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
