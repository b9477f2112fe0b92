"""eidetic gui: the collectors' desktop app (the window is eidetic.client.gui)."""

from __future__ import annotations

import sys

import click

from ..common import Ctx


@click.command("gui")
@click.pass_obj
def command(ctx: Ctx) -> None:
    """Open the desktop app for sending study data (for data collectors).

    The same as the eidetic-gui program: choose a saved destination and the
    study folder, tick what to send, press Send.
    """
    # Imported here: tkinter loads only when the window is wanted.
    from eidetic.client.gui import main

    code = main()
    if code:
        sys.exit(code)
