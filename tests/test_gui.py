"""The collectors' desktop app (eidetic/client/gui.py) in real windows on a
virtual display (Xvfb, started here), driven by real X key events (xdotool)
and Tk events: choose a destination and a folder, tick parts, send into a
local inbox and over SFTP to a real sshd (a key, and a password for a
throwaway system user), Cancel midway and resume, the first-contact dialog
accepted and refused, a changed host key, failures in plain words.

Every state is screenshotted from the real window and checked not blank.
With EIDETIC_SCREENSHOTS=FOLDER the screenshots the docs use are written
there under fixed names (docs/screenshots/make.py does that).
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

tk = pytest.importorskip("tkinter", reason="this Python has no Tk (tkinter)")
from tkinter import font as tkfont  # noqa: E402

from conftest import make_layout  # noqa: E402
from eidetic.client import gui  # noqa: E402
from eidetic.client.send import send  # noqa: E402
from sshd_peer import SSHServer, keygen, need_sshd  # noqa: E402

XVFB = shutil.which("Xvfb")
XDOTOOL = shutil.which("xdotool")
DOCS_SHOTS = os.environ.get("EIDETIC_SCREENSHOTS")
STUDY_FILES = {
    **{f"eprime/s{i:02d}.txt": bytes([65 + i % 26]) * 40_000 for i in range(1, 25)},
    "biopac/s01.acq": b"\x01" * 300_000,
    "biopac/s02.acq": b"\x02" * 200_000,
    "eyetracker/s01.edf": b"\x03" * 150_000,
    "notes.txt": b"session notes\n",
    "eprime/Thumbs.db": b"never sent",
}


# ------------------------------------------------------------- the display

@pytest.fixture(scope="session")
def xdisplay():
    """A virtual X display for the whole session (a free display number,
    chosen by Xvfb itself with -displayfd)."""
    if XVFB is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb)")
    if XDOTOOL is None:
        pytest.skip("xdotool is not installed (apt-get install xdotool)")
    r, w = os.pipe()
    proc = subprocess.Popen([XVFB, "-displayfd", str(w), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n"):
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(r, 16) if ready else b""
            if not chunk:
                raise RuntimeError(f"Xvfb did not start (exit status {proc.poll()})")
            number += chunk
        display = f":{int(number)}"
    finally:
        os.close(r)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    yield display
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def not_blank(img) -> None:
    colours = img.getcolors(1 << 24)
    assert colours is not None and len(colours) > 16, "the screenshot is blank"
    assert max(n for n, _ in colours) < 0.97 * img.width * img.height, "the screenshot is one colour"


class Window:
    """The app in a real Tk window, with helpers that drive it like a person."""

    def __init__(self, display: str, home: Path, machine: Path, shots: Path, send_fn=None,
                 scale: float | None = None) -> None:
        self.display = display
        self.shots = shots
        self.root = tk.Tk(className="eidetic")
        self.app = gui.App(self.root, home=str(home), machine_settings=str(machine), send_fn=send_fn, scale=scale)
        self.root.geometry("+20+20")
        self.pump(0.1)
        self.root.focus_force()
        self.pump(0.1)

    # -- the event loop

    def pump(self, seconds: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while True:
            self.root.update()
            if time.monotonic() >= end:
                return
            time.sleep(0.01)

    def until(self, cond, timeout: float = 20, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or cond}; message: {self.text('message')!r}, "
                                     f"detail: {self.text('detail')!r}, summary: {self.text('summary')!r}")
            self.pump(0.02)

    def scanned(self, source: Path | None = None) -> None:
        def done():
            s = self.app.scan
            return self.app.scan_job is None and self.app._rescan_after is None and s is not None and \
                (source is None or s.source == str(source))
        self.until(done, what="the folder scan")

    def finished(self, timeout: float = 30) -> str:
        self.until(lambda: self.app.job is None and self.app.outcome is not None, timeout, "the end of the send")
        self.pump(0.05)
        return self.app.outcome

    # -- people's input: real X key events

    def keys(self, *keys: str) -> None:
        self.pump(0.02)
        subprocess.run([XDOTOOL, "key", "--clearmodifiers", "--delay", "15", *keys], check=True, timeout=20)
        self.pump(0.1)

    def type(self, text: str) -> None:
        self.pump(0.02)
        # From stdin, not argv: a text starting with "-" (a random password
        # can) would be read by xdotool as an option.
        subprocess.run([XDOTOOL, "type", "--delay", "2", "--file", "-"], input=text.encode(), check=True,
                       timeout=20)
        self.pump(0.1)

    def focus(self, widget) -> None:
        widget.focus_force()
        self.until(lambda: self.root.focus_get() is widget, 5, f"focus on {widget}")

    def text(self, name: str) -> str:
        return str(getattr(self.app, name).cget("text"))

    # -- screenshots

    def shot(self, name: str, dialog: bool = True):
        from PIL import ImageGrab

        self.pump(0.15)
        wins = [self.root] + ([self.app.dialog.top] if dialog and self.app.dialog is not None else [])
        x0 = min(w.winfo_rootx() for w in wins)
        y0 = min(w.winfo_rooty() for w in wins)
        x1 = max(w.winfo_rootx() + w.winfo_width() for w in wins)
        y1 = max(w.winfo_rooty() + w.winfo_height() for w in wins)
        img = ImageGrab.grab(bbox=(x0, y0, x1, y1), xdisplay=self.display)
        not_blank(img)
        img.save(self.shots / f"{name}.png")
        if DOCS_SHOTS:
            img.save(Path(DOCS_SHOTS) / f"{name}.png", optimize=True)
        return img

    def close(self) -> None:
        try:
            self.app.destroy()
        except tk.TclError:
            pass


@pytest.fixture
def base(tmp_path) -> Path:
    """Where the lab PC's folders are: short, fixed paths when the
    screenshots are for the docs (they show them)."""
    if not DOCS_SHOTS:
        yield tmp_path
        return
    root = Path("/tmp/lab-pc")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pc(base, tmp_path, monkeypatch, xdisplay) -> dict:
    """The lab PC: a client folder, an empty home (no ~/.ssh keys, no agent),
    no machine-wide settings, and a study folder with three parts."""
    home = base / "home"
    home.mkdir()
    client = base / "client"
    client.mkdir()
    (client / "eidetic-client.yaml").write_text("location: labA\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("EIDETIC_CLIENT_HOME", str(client))
    machine = tmp_path / "machine-wide.yaml"
    monkeypatch.setenv("EIDETIC_CLIENT_MACHINE_SETTINGS", str(machine))
    study = base / "Data" / "foo"
    for rel, data in STUDY_FILES.items():
        p = study / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    shots = tmp_path / "shots"
    shots.mkdir()
    return {"client": client, "machine": machine, "study": study, "shots": shots, "display": xdisplay}


@pytest.fixture
def window(pc):
    made: list[Window] = []

    def make(send_fn=None, scale: float | None = None) -> Window:
        w = Window(pc["display"], pc["client"], pc["machine"], pc["shots"], send_fn, scale)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def settings(pc, **dests) -> None:
    """Saved destinations in the collector's own settings file."""
    lines = ["location: labA", "destinations:"]
    for name, d in dests.items():
        lines.append(f"  {name}:")
        lines += [f"    {k}: {v}" for k, v in d.items()]
    (pc["client"] / "eidetic-client.yaml").write_text("\n".join(lines) + "\n")


def entries(inbox: Path) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(inbox))
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


@pytest.fixture
def lay(base):
    return make_layout(base / "server", studies=("foo",))


# ------------------------------------------------------------------ tests

def test_choose_a_destination_and_a_folder_tick_parts_and_send_into_an_inbox(pc, window, lay):
    settings(pc, other={"study": "bar", "to": "/nonexistent/inbox"}, foo={"study": "foo", "to": lay.inbox})
    w = window()
    app = w.app
    # The first of the sorted names is chosen; pick foo with the keyboard: Alt+D, then Down in the list.
    assert app.dest_var.get() == "foo"     # sorted: foo, other
    w.keys("alt+d")
    assert w.root.focus_get() is app.dest_combo
    app.dest_combo.current(1)
    app.dest_combo.event_generate("<<ComboboxSelected>>")
    w.pump()
    assert app.dest_var.get() == "other" and not app.user_entry.winfo_ismapped()
    app.dest_combo.current(0)
    app.dest_combo.event_generate("<<ComboboxSelected>>")
    w.scanned()
    assert w.text("summary") == "Choose the study folder." and str(app.send_button.cget("state")) == "disabled"

    w.keys("alt+f")                 # the folder, typed
    assert w.root.focus_get() is app.source_entry
    w.type(str(pc["study"]))
    w.keys("Return")
    w.scanned(pc["study"])
    assert app.tree.get_children() == ("biopac", "eprime", "eyetracker")
    assert app.tree.set("eprime", "files") == "24" and app.tree.set("eprime", "size") == "938 KB"
    assert "1.5 MB, 28 files, all new; 1 file directly in the folder" == w.text("everything_info")
    assert w.text("summary") == "Will send the whole folder: 28 files, 1.5 MB."
    w.shot("ready")
    w.keys("alt+w")

    # Tick eprime and biopac only: Alt+W, arrows, space.
    w.keys("alt+w")
    assert w.root.focus_get() is app.tree and app.tree.focus() == "biopac"
    w.keys("Down", "Down", "space")         # unticking one part keeps the others
    assert not app.selection.everything and app.selection.parts == {"biopac", "eprime"}
    assert app.tree.item("eyetracker", "text").startswith(gui.UNCHECKED)
    assert app.tree.item("eprime", "text").startswith(gui.CHECKED)
    assert w.text("summary") == "Will send biopac, eprime: 26 files, 1.4 MB."
    w.shot("parts")
    w.keys("Return")                # Enter sends (from the tree; in the folder field it looks again)
    assert w.finished() == "sent", w.text("message")
    assert w.text("message").startswith("Sent 26 files (1.4 MB)")
    assert w.text("message").endswith("to study foo. They will appear in the archive within a minute.")
    assert "The upload is called foo-labA-" in w.text("advice")
    assert "1 file or folder left out (ones that are never sent, such as Thumbs.db)." in w.text("advice")
    w.shot("sent")
    visible, hidden = entries(lay.inbox)
    assert len(visible) == 1 and hidden == []
    arrived = sorted(str(p.relative_to(lay.inbox / visible[0])) for p in (lay.inbox / visible[0]).rglob("*")
                     if p.is_file() and p.name != ".eidetic-description.jsonl")
    assert arrived == sorted(k for k in STUDY_FILES if k.startswith(("eprime/s", "biopac/")))
    # The archive takes it, with its provenance.
    results = lay.ingest("foo")
    assert [r.outcome for r in results] == ["ingested"]
    assert (lay.tree("foo") / "eprime" / "s01.txt").read_bytes() == STUDY_FILES["eprime/s01.txt"]
    # After the send the counts say nothing changed.
    w.scanned()
    assert app.tree.set("eprime", "changed") == "none"

    # The choices are remembered: a new window comes back with them.
    w.app.close()
    w2 = window()
    w2.scanned(pc["study"])
    assert w2.app.dest_var.get() == "foo" and w2.app.source_var.get() == str(pc["study"])
    assert w2.app.selection.parts == {"biopac", "eprime"} and not w2.app.selection.everything
    assert "password" not in (pc["client"] / "gui-choices.json").read_text()


def paused_at(files: int):
    """A real send that stops after *files* files until the test lets it go on."""
    reached, go = threading.Event(), threading.Event()

    def run(opts, hooks):
        inner = hooks.progress

        def progress(p):
            if p.phase == "sending" and p.files_done >= files and not reached.is_set():
                inner(p)
                reached.set()
                assert go.wait(30)
            inner(p)
        hooks.progress = progress
        return send(opts, hooks)
    return run, reached, go


def test_cancel_midway_leaves_only_a_dot_entry_and_the_next_send_resumes_and_says_so(pc, window, lay):
    settings(pc, foo={"study": "foo", "to": lay.inbox, "source": pc["study"]})
    run, reached, go = paused_at(12)
    w = window(send_fn=run)
    app = w.app
    w.scanned(pc["study"])
    w.keys("alt+s")
    w.until(reached.is_set, what="the send to reach file 12")
    # The window stays responsive while the worker sends: it redraws progress and takes keys.
    w.until(lambda: " · 12 of 28 files" in w.text("progress_label"), what="the progress line at file 12")
    assert 0 < float(app.progress.cget("value")) < 1000
    assert str(app.cancel_button.cget("state")) == "normal" and str(app.send_button.cget("state")) == "disabled"
    assert w.text("file_label").startswith("Sending eprime/")
    w.shot("sending")
    w.keys("Escape")                # Escape is Cancel
    assert app.job is None or app.job.cancelling
    go.set()
    assert w.finished() == "cancelled"
    assert "Sending was stopped" in w.text("message") and "press Send to continue" in w.text("message")
    visible, hidden = entries(lay.inbox)
    assert visible == [] and len(hidden) == 1
    w.scanned()
    assert "A send of this folder was stopped before it finished: Send continues it" in w.text("summary")
    w.shot("cancelled")

    w.keys("alt+s")
    assert w.finished() == "sent"
    assert "finishing the send that was stopped earlier" in w.text("message")
    visible, hidden = entries(lay.inbox)
    assert visible == [hidden_name[1:] for hidden_name in [f".{visible[0]}"]] and hidden == []
    assert [r.outcome for r in lay.ingest("foo")] == ["ingested"]
    w.shot("resumed")


def test_a_missing_inbox_is_a_failure_in_plain_words_with_copyable_details(pc, window, base):
    settings(pc, foo={"study": "foo", "to": base / "not-mounted" / "inbox", "source": pc["study"]})
    w = window()
    w.scanned(pc["study"])
    w.focus(w.app.send_button)
    w.keys("Return")
    assert w.finished() == "failed"
    assert w.text("message") == "The inbox could not be found."
    assert "check that it is connected" in w.text("advice")
    assert "does not exist" in w.text("detail")
    w.shot("failed")
    w.keys("alt+c")
    copied = w.root.clipboard_get()
    assert "outcome: failed" in copied and "TransportError" in copied and "Traceback" in copied
    assert str(pc["study"]) in copied
    assert "copied" in w.text("progress_label")


def test_add_a_destination_in_the_form(pc, window, lay):
    w = window()
    app = w.app
    assert "No destination is saved" in w.text("dest_info")
    w.keys("alt+a")
    w.until(lambda: isinstance(app.dialog, gui.AddDestinationDialog), what="the form")
    form = app.dialog
    w.until(lambda: w.root.focus_get() is form.entries["study"], 5, "focus in the study field")
    w.type("foo-study")
    w.keys("Tab")
    w.type(str(lay.inbox))
    w.keys("Return")
    assert "letters, digits and _" in form.error.get()
    assert w.root.focus_get() is form.entries["study"]
    w.shot("add-destination")
    w.keys("alt+s")                 # Alt+S selects the study field's text: typing replaces it
    w.type("foo")
    w.keys("Return")
    w.until(lambda: app.dialog is None, what="the form to close")
    saved = (pc["client"] / "eidetic-client.yaml").read_text()
    assert "destinations:" in saved and f"to: {lay.inbox}" in saved and "location: labA" in saved
    assert app.dest_var.get() == "foo"
    assert w.text("dest_info") == f"Study foo, sent to the folder {lay.inbox}"


def test_the_form_for_a_server_keeps_the_user_name_and_the_fingerprint(pc, window):
    w = window()
    app = w.app
    w.keys("alt+a")
    w.until(lambda: isinstance(app.dialog, gui.AddDestinationDialog), what="the form")
    form = app.dialog
    for key, value in (("study", "foo"), ("address", "dropbox.example.org:/data/inbox"), ("user", "jdoe"),
                       ("fingerprint", "ED25519 SHA256:3v0urZzqFeqwWrDASR26AB1O5GxvPvORm8LeTmM75sA"),
                       ("name", "foo server")):
        form.vars[key].set(value)
    form.save_button.invoke()
    w.pump()
    d = app.settings.destinations["foo server"]
    assert (d.to, d.host_key) == ("sftp://jdoe@dropbox.example.org/data/inbox",
                                  "SHA256:3v0urZzqFeqwWrDASR26AB1O5GxvPvORm8LeTmM75sA")
    assert app.user_entry.winfo_ismapped() and app.user_var.get() == "jdoe"


# ------------------------------------------------------------------- SFTP

@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    need_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def sftp_settings(pc, sshd, inbox: Path, **extra) -> None:
    settings(pc, foo={"study": "foo", "to": sshd.url(inbox), "source": pc["study"],
                      "identity": sshd.user_key, **extra})


def test_first_contact_shows_the_fingerprint_and_accepting_sends_over_sftp(pc, window, lay, sshd):
    sftp_settings(pc, sshd, lay.inbox)
    w = window()
    app = w.app
    w.scanned(pc["study"])
    assert app.user_entry.winfo_ismapped() and app.user_var.get() == "root"
    w.keys("alt+s")
    w.until(lambda: isinstance(app.dialog, gui.HostKeyDialog), what="the host key dialog")
    dlg = app.dialog
    assert dlg.fingerprint.get() == f"ED25519 {sshd.host_fingerprint}"
    w.until(lambda: w.root.focus_get() is dlg.refuse_button, 5, "focus on Do not connect")
    w.shot("host-key")
    w.keys("alt+a")
    assert w.finished() == "sent", w.text("message")
    assert w.text("message").startswith("Sent 28 files (1.5 MB) to study foo.")
    known = (pc["client"] / "known_hosts").read_text()
    assert known == sshd.known_hosts_line()
    assert [r.outcome for r in lay.ingest("foo")] == ["ingested"]


def test_refusing_the_fingerprint_sends_nothing_and_says_so(pc, window, lay, sshd):
    sftp_settings(pc, sshd, lay.inbox)
    w = window()
    w.scanned(pc["study"])
    w.keys("alt+s")
    w.until(lambda: isinstance(w.app.dialog, gui.HostKeyDialog), what="the host key dialog")
    w.keys("Return")                # the safe default: Do not connect
    assert w.finished() == "failed"
    assert w.text("message") == "The server's fingerprint was not accepted, so nothing was sent."
    assert "accept it only if it is exactly the same" in w.text("advice")
    assert entries(lay.inbox) == ([], [])
    assert not (pc["client"] / "known_hosts").exists()


def test_a_saved_fingerprint_needs_no_question(pc, window, lay, sshd):
    sftp_settings(pc, sshd, lay.inbox, host_key=sshd.host_fingerprint)
    w = window()
    w.scanned(pc["study"])
    w.keys("alt+s")
    assert w.finished() == "sent"
    assert w.app.dialog is None


def test_a_changed_host_key_is_refused_with_a_plain_explanation(pc, window, lay, sshd, tmp_path):
    other = tmp_path / "other_host_key"
    keygen(other)
    (pc["client"] / "known_hosts").write_text(sshd.known_hosts_line(Path(f"{other}.pub").read_text()))
    sftp_settings(pc, sshd, lay.inbox)
    w = window()
    w.scanned(pc["study"])
    w.keys("alt+s")
    assert w.finished() == "failed"
    assert w.text("message") == \
        "The server's identity has CHANGED since this computer last sent to it, so nothing was sent."
    assert w.text("advice").startswith("Do not send again yet.")
    assert sshd.host_fingerprint in w.text("detail")
    assert entries(lay.inbox) == ([], [])
    w.shot("changed-key")


@pytest.fixture(scope="module")
def password_server(tmp_path_factory):
    """A throwaway system user with a password, an inbox it owns in a folder
    any user can reach, and an sshd that accepts passwords."""
    need_sshd()
    if not (shutil.which("useradd") and shutil.which("userdel") and shutil.which("chpasswd")):
        pytest.skip("useradd/userdel/chpasswd (passwd) are not installed")
    user, password = f"eidgui{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    top = Path(tempfile.mkdtemp(prefix="eidetic-gui-pw-", dir="/tmp"))
    os.chmod(top, 0o755)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", str(top), "--shell", "/bin/sh", user],
                   check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True, capture_output=True,
                       timeout=30)
        inbox = top / "inbox"
        inbox.mkdir()
        shutil.chown(inbox, user, user)
        server = SSHServer(tmp_path_factory.mktemp("sshd-pw"), passwords=True).start()
        try:
            yield server, user, password, inbox
        finally:
            server.stop()
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=30)
        shutil.rmtree(top, ignore_errors=True)


def test_a_password_is_asked_in_a_dialog_only_when_the_server_wants_one_and_never_stored(pc, window,
                                                                                         password_server):
    server, user, password, inbox = password_server
    for stale in os.listdir(inbox):
        shutil.rmtree(inbox / stale)
    settings(pc, foo={"study": "foo", "to": server.url(inbox, user="someone"), "source": pc["study"],
                      "host_key": server.host_fingerprint})
    w = window()
    app = w.app
    w.scanned(pc["study"])
    w.keys("alt+y")                 # the collector's own user name on a shared lab PC
    w.type(user)
    assert app.user_var.get() == user
    w.keys("alt+s")
    w.until(lambda: isinstance(app.dialog, gui.PasswordDialog), what="the password dialog")
    dlg = app.dialog
    assert f"asks for the password of {user}" in str(dlg.body.winfo_children()[0].cget("text"))
    w.until(lambda: w.root.focus_get() is dlg.entry, 5, "focus in the password field")
    w.type("wrong-" + password)
    w.shot("password")
    w.keys("Return")
    assert w.finished() == "failed"
    assert w.text("message") == "The server did not accept your login."
    assert "Check your user name" in w.text("advice")

    w.scanned()
    assert w.root.focus_get() is app.send_button
    w.keys("Return")                # again, with the right password
    w.until(lambda: isinstance(app.dialog, gui.PasswordDialog), what="the password dialog")
    w.until(lambda: w.root.focus_get() is app.dialog.entry, 5, "focus in the password field")
    w.type(password)
    w.keys("Return")
    assert w.finished() == "sent", w.text("detail")
    visible, hidden = entries(inbox)
    assert len(visible) == 1 and hidden == []
    assert (inbox / visible[0] / "eprime" / "s01.txt").read_bytes() == STUDY_FILES["eprime/s01.txt"]
    for f in pc["client"].rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes(), f
    assert user in (pc["client"] / "gui-choices.json").read_text()


# ------------------------------------------------- keyboard and scaling

def test_the_keyboard_reaches_everything_in_order(pc, window, lay):
    settings(pc, foo={"study": "foo", "to": "sftp://jdoe@h/inbox", "source": pc["study"]})
    w = window()
    app = w.app
    w.scanned(pc["study"])
    order = [app.dest_combo, app.add_button, app.source_entry, app.browse_button, app.user_entry,
             app.everything_check, app.tree, app.changed_only_check, app.send_button]
    w.focus(app.dest_combo)
    seen = [app.dest_combo]
    for _ in order[1:]:
        w.keys("Tab")
        seen.append(w.root.focus_get())
    assert seen == order
    w.keys("alt+e")                 # Everything off: nothing ticked, Send says why it waits
    assert not app.selection.everything and w.text("summary") == "Tick what to send."
    assert str(app.send_button.cget("state")) == "disabled"
    w.keys("alt+w", "space")
    assert app.selection.parts == {"biopac"}
    w.keys("alt+e")
    assert app.selection.everything
    w.keys("alt+o")
    assert app.changed_only_var.get() is True


def test_readable_at_150_percent(pc, window):
    # A server destination: the tallest window (it has the user name row).
    settings(pc, foo={"study": "foo", "to": "sftp://jdoe@dropbox.example.org/data/inbox", "source": pc["study"]})
    w1 = window()
    w1.scanned(pc["study"])
    normal = tkfont.nametofont("TkDefaultFont", w1.root).metrics("linespace")
    height1 = w1.root.winfo_height()
    w1.close()
    w = window(scale=1.5)
    w.scanned(pc["study"])
    big = tkfont.nametofont("TkDefaultFont", w.root).metrics("linespace")
    assert 1.3 <= big / normal <= 1.7
    assert 1.3 <= w.root.winfo_height() / height1 <= 1.7
    # A 1080-line screen at 150 % shows 720 lines of the 100 % window: it fits.
    assert height1 <= 720 * 0.95, height1
    assert int(float(w.app.tree.tk.call("ttk::style", "lookup", "Treeview", "-rowheight"))) >= big
    w.shot("scaled-150")


# ------------------------------------------------------------ entry points

def test_eidetic_gui_without_a_desktop_says_so_in_one_line(tmp_path):
    from conftest import clean_env, one_line_error, run_cli

    env = clean_env(DISPLAY="", HOME=str(tmp_path), EIDETIC_CLIENT_HOME=str(tmp_path / "client"))
    res = run_cli("gui", env=env)
    assert res.returncode == 3, res
    assert "needs a desktop session; 'eidetic send' works without one" in one_line_error(res)
    # The eidetic-gui program (a gui-scripts entry: no console window on Windows) is the same main().
    res = subprocess.run([sys.executable, "-m", "eidetic.client.gui"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "cannot open a window" in one_line_error(res)
    assert "gui " in run_cli("--help", env=env).stdout
