"""Man pages (roff, section 1) generated from the click commands themselves,
so they say what ``eidetic COMMAND --help`` says and never drift from it.

    python -m eidetic_cli.manpages OUTDIR     # writes eidetic.1 and eidetic-COMMAND.1

``page(None)`` is eidetic(1) (global options, the command list, environment,
files, exit statuses); ``page("status")`` is eidetic-status(1).  No
dependency beyond click: the text comes from each command's help and its
options' help records, the synopsis from click's usage pieces.

The date in the pages is $SOURCE_DATE_EPOCH when set (reproducible builds),
else today.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import re
import sys

import click

from eidetic import __version__

MANUAL = "eidetic manual"

# What README.md's "Exit statuses" says, for eidetic(1).
EXIT_STATUS = [
    ("0", "success"),
    ("1", "something is wrong: a failed entry, an fsck finding, a path with no history"),
    ("2", "a usage or config error"),
    ("3", "the environment stops us: a lock, an I/O error, the network, a server command in an install "
          "without the [server] extra"),
    ("70", "an internal error (a bug; EIDETIC_DEBUG=1 shows the traceback)"),
    ("130", "interrupted"),
]

ENVIRONMENT = [
    ("EIDETIC_CONFIG", "the config file when --config is not given; the word default means the built-in "
                       "default layout"),
    ("EIDETIC_HOME", "the data directory of the default layout (else $XDG_DATA_HOME/eidetic, else "
                     "~/.local/share/eidetic)"),
    ("EIDETIC_DEBUG", "set to 1: an internal error shows its traceback"),
    ("_EIDETIC_COMPLETE", "shell completion: bash_source, zsh_source or fish_source prints the script "
                          "for that shell (see docs/admin.md, \"Shell completion\")"),
]


# ------------------------------------------------------------------ roff

def _escape(text: str) -> str:
    """Plain text as roff: backslashes doubled as \\e, hyphens as \\- (so they
    copy and search as ASCII hyphens), `code` in bold."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    # Non-ASCII as groff's named Unicode characters: a page reads the same in any locale.
    return re.sub(r"[^\x00-\x7f]", lambda m: f"\\[u{ord(m.group()):04X}]", text)


def _line(text: str) -> str:
    """A text line that cannot be read as a request (a leading . or ')."""
    text = _escape(text)
    return "\\&" + text if text.startswith((".", "'")) else text


def _paragraphs(help_text: str) -> list[str]:
    """Click's help text as roff paragraphs: text is refilled by the
    formatter (.PP), a block marked with click's \\b line is kept as is (.nf)."""
    help_text = inspect.cleandoc(help_text).split("\f")[0]
    out = []
    for block in re.split(r"\n\s*\n", help_text):
        lines = block.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            out += [".PP", ".nf"] + [_line(ln) for ln in lines[1:]] + [".fi"]
        else:
            out += [".PP", _line(" ".join(ln.strip() for ln in lines))]
    return out


def _summary(command: click.Command) -> str:
    """The NAME line's text: the command's short help, else the first sentence of its help."""
    if command.short_help:
        return command.short_help.rstrip(".")
    first = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".")


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.strftime("%Y-%m-%d")


def _header(title: str, summary: str) -> list[str]:
    return [f'.TH "{title.upper()}" "1" "{_date()}" "eidetic {__version__}" "{MANUAL}"',
            ".SH NAME", f"{_escape(title)} \\- {_escape(summary)}"]


def _options(params: list[click.Parameter], ctx: click.Context) -> list[str]:
    out = []
    for p in params:
        if isinstance(p, click.Argument):     # in the synopsis, described by the help text
            continue
        rec = p.get_help_record(ctx)
        if rec is None:          # arguments and hidden options
            continue
        opts, help_text = rec
        out += [".TP", "\\fB" + _escape(opts).replace(" ", "\\fR \\fI", 1) + "\\fR"
                if " " in opts.split(", ")[-1] else "\\fB" + _escape(opts) + "\\fR"]
        out.append(_line(" ".join(help_text.split())) if help_text else "")
    return [ln for ln in out if ln != ""]


def _see_also(names: list[str], but: str | None) -> list[str]:
    refs = [f"\\fBeidetic\\fR(1)"] if but is not None else []
    refs += [f"\\fBeidetic\\-{_escape(n)}\\fR(1)" for n in names if n != but]
    return [".SH SEE ALSO", ",\n".join(refs)]


# ------------------------------------------------------------------ pages

def _group() -> tuple[click.Group, click.Context]:
    from .main import cli
    return cli, click.Context(cli, info_name="eidetic", **cli.context_settings)


def command_names() -> list[str]:
    """Every command that gets a page of its own (as ``eidetic --help`` lists them)."""
    group, ctx = _group()
    return [n for n in group.list_commands(ctx) if group.get_command(ctx, n) is not None]


def page(name: str | None = None) -> str:
    """The man page of ``eidetic`` (None) or of ``eidetic NAME``, as roff.
    Raises click.UsageError for a command that does not exist."""
    group, gctx = _group()
    names = command_names()
    if name is None:
        return _main_page(group, gctx, names)
    command = group.get_command(gctx, name)
    if command is None:
        raise click.UsageError(f"no command {name!r} (commands: {', '.join(names)})")
    ctx = click.Context(command, info_name=name, parent=gctx)
    out = _header(f"eidetic-{name}", _summary(command))
    pieces = command.collect_usage_pieces(ctx)
    out += [".SH SYNOPSIS", ".B eidetic", "[\\fIGLOBAL OPTIONS\\fR]", f".B {_escape(name)}",
            _line(" ".join(pieces))]
    out += [".SH DESCRIPTION"] + _paragraphs(command.help or "")
    opts = _options(command.get_params(ctx), ctx)
    if opts:
        out += [".SH OPTIONS"] + opts
    out += [".PP", "The global options (\\fB\\-\\-config\\fR, \\fB\\-v\\fR, \\fB\\-q\\fR) are described in "
                   "\\fBeidetic\\fR(1)."]
    out += _see_also(names, name)
    return "\n".join(out) + "\n"


def _main_page(group: click.Group, gctx: click.Context, names: list[str]) -> str:
    out = _header("eidetic", "a content-addressed archive that never forgets a version")
    out += [".SH SYNOPSIS", ".B eidetic", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]..."]
    out += [".SH DESCRIPTION"] + _paragraphs(group.help or "")
    out += [".PP", _line("Lab PCs push study data one way into a watched inbox on a locked-down server; "
                         "eidetic stores every distinct file content once, named by its BLAKE3, writes an "
                         "append-only, hash-chained manifest per upload and keeps a browsable read-only "
                         "tree in which a path sent again keeps all of its versions.")]
    out += [".SH GLOBAL OPTIONS"] + _options(group.get_params(gctx), gctx)
    out.append(".SH COMMANDS")
    for n in names:
        command = group.get_command(gctx, n)
        out += [".TP", f"\\fBeidetic\\-{_escape(n)}\\fR(1)", _line(_summary(command))]
    out.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        out += [".TP", f"\\fB{_escape(var)}\\fR", _line(text)]
    out += [".SH FILES", ".TP", "\\fI/etc/eidetic/eidetic.yaml\\fR",
            "the config file when neither \\fB\\-\\-config\\fR nor \\fBEIDETIC_CONFIG\\fR names one",
            ".TP", "\\fI~/.local/state/eidetic/eidetic\\-client.yaml\\fR",
            "the uploader's own settings and saved destinations, over the machine's "
            "\\fI/etc/eidetic/eidetic\\-client.yaml\\fR (\\fBeidetic\\-send\\fR(1)); "
            "\\fBEIDETIC_CLIENT_HOME\\fR names another folder"]
    out.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _line(text)]
    out += _see_also(names, None)
    return "\n".join(out) + "\n"


def write_all(outdir: str) -> list[str]:
    """Write eidetic.1 and eidetic-COMMAND.1 for every command into *outdir*
    (made if missing); returns the paths written."""
    os.makedirs(outdir, exist_ok=True)
    written = []
    for name in [None, *command_names()]:
        path = os.path.join(outdir, "eidetic.1" if name is None else f"eidetic-{name}.1")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page(name))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m eidetic_cli.manpages OUTDIR\n"
              "Writes the man pages eidetic.1 and eidetic-COMMAND.1 into OUTDIR "
              "(for example /usr/local/share/man/man1).", file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        for path in write_all(argv[0]):
            print(path)
    except OSError as e:
        print(f"eidetic_cli.manpages: {e.strerror}: {e.filename}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
