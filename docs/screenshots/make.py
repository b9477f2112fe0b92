"""Regenerate the screenshots of docs/collectors.md from the real window.

The screenshots are taken by the GUI tests themselves (tests/test_gui.py),
so every picture in the docs shows a state the tests drove the app into and
checked.  This runs those tests once with EIDETIC_SCREENSHOTS pointing here;
it needs what they need: Xvfb, xdotool, Pillow, and root with an sshd for
the server pictures (the host key, password and changed-key states).

    .venv/bin/python docs/screenshots/make.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def main() -> int:
    env = dict(os.environ, EIDETIC_SCREENSHOTS=str(HERE))
    # One process (no xdist): the pictures use fixed folder names under /tmp/lab-pc.
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
            str(REPO / "tests" / "test_gui.py")]
    code = subprocess.call(argv, cwd=REPO, env=env)
    shots = sorted(p.name for p in HERE.glob("*.png"))
    print(f"{len(shots)} screenshots in {HERE}: {', '.join(shots)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
