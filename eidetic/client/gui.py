"""The collectors' desktop app: one window titled "eidetic" (tkinter, themed
ttk widgets), for people who never open a terminal.

Only the widgets live here; what the app decides and says is in app.py
(tested without a display).  The send runs in a worker thread
(:class:`app.SendJob`) that never touches Tk: the window polls its events
and progress every POLL_MS with ``after()``, and answers its questions
(a password, a new host key) from dialogs.

Readable at 125-150 % scaling: every font is a named font in points (Tk
scales points with ``tk scaling``, which Windows sets from the display once
the process is DPI aware), every distance is in points, and the tree's row
height follows its font.  Keyboard: Tab order follows the window from top to
bottom, Alt plus the underlined letter reaches each field, Enter sends (or
presses the focused button), Escape cancels a send or closes a dialog.
"""

from __future__ import annotations

import os
import sys

try:
    import tkinter as tk
    from tkinter import filedialog, messagebox, ttk
    from tkinter import font as tkfont
except ImportError:         # a Python built without Tk: main() says what to install
    tk = None               # type: ignore[assignment]

from ..core.errors import ConfigError, EideticError
from . import app as logic
from .settings import ClientSettings, SavedDestination, load_settings, save_destination
from .state import client_dir

POLL_MS = 100               # the window redraws progress up to 10 times a second
RESCAN_DELAY_MS = 400       # typing a folder or a user name rescans once typing stops
SCALE_ENV = "EIDETIC_GUI_SCALE"     # e.g. 1.5: everything 50 % larger (tests, a lab PC's preference)
CHECKED, UNCHECKED = "\u2611", "\u2610"


def _dpi_aware() -> None:
    """Windows: draw sharp at 125-150 % instead of a blurry bitmap stretch
    (Tk then takes its scaling from the display's DPI)."""
    if sys.platform != "win32":
        return
    try:
        import ctypes
        ctypes.windll.shcore.SetProcessDpiAwareness(1)     # type: ignore[attr-defined]
    except Exception:
        pass


def setup_fonts_and_style(root: "tk.Tk", scale: float | None = None) -> None:
    """Named fonts in points (so ``tk scaling`` scales them), the app's own
    fonts derived from them, a theme that is not Tk's bare default, and row
    heights that follow the font."""
    if scale is None:
        try:
            scale = float(os.environ.get(SCALE_ENV, "") or 1.0)
        except ValueError:
            scale = 1.0
    if scale and abs(scale - 1.0) > 0.01:
        root.tk.call("tk", "scaling", float(root.tk.call("tk", "scaling")) * scale)
    px_per_pt = float(root.tk.call("tk", "scaling"))
    for name in tkfont.names(root):
        f = tkfont.nametofont(name, root)
        size = int(f.cget("size"))
        if size < 0:            # pixels (X11, some themes): in points, so scaling applies
            f.configure(size=max(6, round(-size / px_per_pt)))
    base = tkfont.nametofont("TkDefaultFont", root)
    size = int(base.cget("size"))
    fixed = tkfont.nametofont("TkFixedFont", root)
    # Kept on the root: Tk deletes a named font when its Python object goes.
    root._eidetic_fonts = [  # type: ignore[attr-defined]
        tkfont.Font(root, name="EideticHeading", family=base.cget("family"), size=round(size * 1.35),
                    weight="bold"),
        tkfont.Font(root, name="EideticResult", family=base.cget("family"), size=round(size * 1.15),
                    weight="bold"),
        tkfont.Font(root, name="EideticSmall", family=base.cget("family"), size=max(7, size - 1)),
        tkfont.Font(root, name="EideticFingerprint", family=fixed.cget("family"), size=round(size * 1.2),
                    weight="bold")]
    style = ttk.Style(root)
    if style.theme_use() == "default" and "clam" in style.theme_names():
        style.theme_use("clam")     # X11: Tk's "default" theme looks like 1995
    line = base.metrics("linespace")
    style.configure("Treeview", rowheight=int(line * 1.35))
    style.configure("Heading.TLabel", font="EideticHeading")
    style.configure("Small.TLabel", font="EideticSmall", foreground="#505050")
    style.configure("Success.TLabel", font="EideticResult", foreground="#17632a")
    style.configure("Failure.TLabel", font="EideticResult", foreground="#a4161a")
    style.configure("Neutral.TLabel", font="EideticResult")
    style.configure("Fingerprint.TEntry", font="EideticFingerprint")
    if style.theme_use() == "clam":
        # clam draws the bar in the window's own grey, and its check boxes and
        # arrows in fixed pixels: make them follow the font.
        style.configure("Horizontal.TProgressbar", background="#3b6ea5", lightcolor="#6b93c0",
                        darkcolor="#2b5585", bordercolor="#9e9a91")
        style.configure("TCheckbutton", indicatorsize=max(10, int(line * 0.7)))
        for element in ("TScrollbar", "TCombobox"):
            style.configure(element, arrowsize=max(12, int(line * 0.8)))


def _mnemonic(root: "tk.Misc", letter: str, action) -> None:
    for seq in (f"<Alt-{letter.lower()}>", f"<Alt-{letter.upper()}>"):
        root.bind(seq, lambda e: (action(), "break")[1])


def _focus(widget) -> None:
    widget.focus_set()
    if isinstance(widget, (ttk.Entry, ttk.Combobox)):
        widget.select_range(0, "end")
        widget.icursor("end")


# ------------------------------------------------------------------ dialogs

class _Dialog:
    """A modal dialog (its own Tk bindings: Enter, Escape, mnemonics)."""

    def __init__(self, app: "App", name: str, title: str) -> None:
        self.app = app
        # A thin frame of its own: without a window manager's border a dialog
        # would melt into the window behind it.
        self.top = tk.Toplevel(app.root, name=name, highlightthickness=1, highlightbackground="#8a857c")
        self.top.title(title)
        self.top.transient(app.root)
        self.top.resizable(False, False)
        self.top.protocol("WM_DELETE_WINDOW", self.cancel)
        self.body = ttk.Frame(self.top, padding="12p")
        self.body.grid(sticky="nsew")
        self.top.bind("<Escape>", lambda e: self.cancel())
        self.top.bind("<Return>", self._on_return)
        self.done = False
        app.dialog = self

    def _on_return(self, event) -> str:
        w = self.top.focus_get()
        if isinstance(w, ttk.Button):
            w.invoke()
        else:
            self.ok()
        return "break"

    def show(self, focus) -> None:
        self.top.update_idletasks()
        r = self.app.root
        x = r.winfo_rootx() + max(0, (r.winfo_width() - self.top.winfo_reqwidth()) // 2)
        y = r.winfo_rooty() + max(0, (r.winfo_height() - self.top.winfo_reqheight()) // 3)
        self.top.geometry(f"+{x}+{y}")
        self.top.deiconify()
        try:
            self.top.grab_set()
        except tk.TclError:
            pass            # not viewable yet (no window manager): the dialog still works
        focus.focus_set()

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.app.dialog is self:
            self.app.dialog = None
        try:
            self.top.grab_release()
        except tk.TclError:
            pass
        self.top.destroy()
        self.app.after_dialog()

    def ok(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def buttons(self, row: int, ok_text: str, ok_underline: int, cancel_text: str, cancel_underline: int):
        bar = ttk.Frame(self.body)
        bar.grid(row=row, column=0, columnspan=2, sticky="e", pady=("10p", 0))
        cancel = ttk.Button(bar, text=cancel_text, underline=cancel_underline, command=self.cancel,
                            name="cancel")
        ok = ttk.Button(bar, text=ok_text, underline=ok_underline, command=self.ok, name="ok")
        ok.grid(row=0, column=0, padx=(0, "6p"))
        cancel.grid(row=0, column=1)
        _mnemonic(self.top, ok_text[ok_underline], ok.invoke)
        _mnemonic(self.top, cancel_text[cancel_underline], cancel.invoke)
        return ok, cancel


class HostKeyDialog(_Dialog):
    """First contact with a server: its fingerprint, to compare."""

    def __init__(self, app: "App", info) -> None:
        super().__init__(app, "hostkey", "eidetic: check the server")
        before, fp, after = logic.host_key_text(info)
        wrap = app.wrap_length()
        ttk.Label(self.body, text=before, wraplength=wrap, justify="left").grid(row=0, column=0, sticky="w")
        self.fingerprint = tk.StringVar(self.top, fp)
        e = ttk.Entry(self.body, textvariable=self.fingerprint, state="readonly", style="Fingerprint.TEntry",
                      font="EideticFingerprint", width=len(fp) + 2, name="fingerprint", takefocus=True)
        e.grid(row=1, column=0, sticky="ew", pady="8p")
        ttk.Label(self.body, text=after, wraplength=wrap, justify="left").grid(row=2, column=0, sticky="w")
        self.accept_button, self.refuse_button = self.buttons(3, "Accept", 0, "Do not connect", 0)
        # Safe by default: Enter right away refuses; accepting takes a deliberate Tab or Alt+A.
        self.show(self.refuse_button)

    def _on_return(self, event) -> str:
        w = self.top.focus_get()
        (w if isinstance(w, ttk.Button) else self.refuse_button).invoke()
        return "break"

    def ok(self) -> None:
        self.close()
        self.app.answer(True)

    def cancel(self) -> None:
        self.close()
        self.app.answer(False)


class PasswordDialog(_Dialog):
    """The server asks for a password (or a key's passphrase): never stored."""

    def __init__(self, app: "App", prompt: str) -> None:
        super().__init__(app, "password", "eidetic: log in")
        question, label = logic.password_text(prompt)
        ttk.Label(self.body, text=question, wraplength=app.wrap_length(), justify="left").grid(
            row=0, column=0, columnspan=2, sticky="w", pady=(0, "8p"))
        ttk.Label(self.body, text=label, underline=0).grid(row=1, column=0, sticky="w", padx=(0, "6p"))
        self.secret = tk.StringVar(self.top)
        self.entry = ttk.Entry(self.body, textvariable=self.secret, show="\u2022", width=30, name="secret")
        self.entry.grid(row=1, column=1, sticky="ew")
        _mnemonic(self.top, label[0], lambda: _focus(self.entry))
        ttk.Label(self.body, text="It is sent to the server only, and never stored.", style="Small.TLabel").grid(
            row=2, column=0, columnspan=2, sticky="w", pady=("4p", 0))
        self.ok_button, self.cancel_button = self.buttons(3, "OK", 0, "Cancel", 0)
        self.show(self.entry)

    def ok(self) -> None:
        value = self.secret.get()
        self.secret.set("")
        self.close()
        self.app.answer(value or None)

    def cancel(self) -> None:
        self.secret.set("")
        self.close()
        self.app.answer(None)


class AddDestinationDialog(_Dialog):
    """A small form for a new saved destination (written to the per-user settings)."""

    FIELDS = (("study", "Study name:", 0), ("address", "Server address or inbox folder:", 7),
              ("user", "Your user name on the server:", 5), ("fingerprint", "Server fingerprint (optional):", 7),
              ("name", "Name for this destination (optional):", 0))

    def __init__(self, app: "App") -> None:
        super().__init__(app, "adddest", "eidetic: add a destination")
        ttk.Label(self.body, text="Your study runner gives you the study name, the server address (or the "
                                  "inbox folder) and the server's fingerprint.",
                  wraplength=app.wrap_length(), justify="left").grid(row=0, column=0, columnspan=2, sticky="w",
                                                                     pady=(0, "8p"))
        self.vars: dict[str, tk.StringVar] = {}
        self.entries: dict[str, ttk.Entry] = {}
        for i, (key, label, u) in enumerate(self.FIELDS, start=1):
            ttk.Label(self.body, text=label, underline=u).grid(row=i, column=0, sticky="w", padx=(0, "6p"),
                                                               pady="2p")
            v = tk.StringVar(self.top)
            e = ttk.Entry(self.body, textvariable=v, width=44, name=key)
            e.grid(row=i, column=1, sticky="ew", pady="2p")
            self.vars[key], self.entries[key] = v, e
            _mnemonic(self.top, label[u], lambda e=e: _focus(e))
        self.error = tk.StringVar(self.top)
        ttk.Label(self.body, textvariable=self.error, foreground="#a4161a", wraplength=app.wrap_length(),
                  justify="left", name="error").grid(row=len(self.FIELDS) + 1, column=0, columnspan=2, sticky="w",
                                                     pady=("6p", 0))
        self.save_button, self.cancel_button = self.buttons(len(self.FIELDS) + 2, "Save", 2, "Cancel", 0)
        self.show(self.entries["study"])

    def ok(self) -> None:
        v = {k: var.get() for k, var in self.vars.items()}
        try:
            dest = logic.destination_from_form(v["name"], v["study"], v["address"], v["user"], v["fingerprint"])
            if dest.name in self.app.settings.destinations:
                raise logic.FormError("name", f"A destination called {dest.name} exists already: give this "
                                              "one another name.")
            save_destination(self.app.home, dest)
        except logic.FormError as e:
            self.error.set(e.message)
            _focus(self.entries.get(e.field, self.entries["study"]))
            return
        except (ConfigError, OSError) as e:
            msg = e.message if isinstance(e, EideticError) else f"{e.strerror or e}: {e.filename or ''}"
            self.error.set(f"The destination could not be saved: {msg}")
            return
        self.close()
        self.app.destination_added(dest.name)

    def cancel(self) -> None:
        self.close()


# ------------------------------------------------------------------ window

class App:
    """The main window (see the module doc)."""

    def __init__(self, root: "tk.Tk", home: str | None = None, machine_settings: str | None = None,
                 send_fn=None, scale: float | None = None) -> None:
        self.root = root
        self.home = home or client_dir()
        self.machine_settings = machine_settings
        self.send_fn = send_fn
        self.job: logic.SendJob | None = None
        self.scan_job: logic.ScanJob | None = None
        self.scan: logic.FolderScan | None = None
        self.interrupted: logic.Interrupted | None = None
        self.selection = logic.Selection()
        self.dest: SavedDestination | None = None
        self.dialog: _Dialog | None = None
        self.details: str | None = None
        self.outcome: str | None = None         # "sent" | "cancelled" | "failed" (the last send's)
        self.settings_error: str | None = None
        self._rescan_after: str | None = None
        self._poll_after: str | None = None
        self._closing = False
        self.choices = logic.load_choices(self.home)
        self.settings = self._load_settings()

        root.title("eidetic")
        setup_fonts_and_style(root, scale)
        root.protocol("WM_DELETE_WINDOW", self.close)
        self._build()
        self._fill_destinations(self.choices.destination)
        self._poll_after = root.after(POLL_MS, self._poll)

    # -- building

    def _load_settings(self) -> ClientSettings:
        try:
            self.settings_error = None
            return load_settings(self.home, self.machine_settings)
        except ConfigError as e:
            self.settings_error = f"The settings file cannot be read, so no saved destination is shown: {e.message}"
            return ClientSettings()

    def wrap_length(self) -> int:
        return int(self.root.winfo_fpixels("330p"))

    def _build(self) -> None:
        root = self.root
        f = self.frame = ttk.Frame(root, padding="10p", name="main")
        f.grid(row=0, column=0, sticky="nsew")
        root.columnconfigure(0, weight=1)
        root.rowconfigure(0, weight=1)
        f.columnconfigure(1, weight=1)
        pad = {"pady": "3p"}
        wrap = self.wrap_length()

        ttk.Label(f, text="Destination:", underline=0).grid(row=1, column=0, sticky="w", padx=(0, "6p"), **pad)
        self.dest_var = tk.StringVar(root)
        self.dest_combo = ttk.Combobox(f, textvariable=self.dest_var, state="readonly", name="destination")
        self.dest_combo.grid(row=1, column=1, sticky="ew", **pad)
        self.dest_combo.bind("<<ComboboxSelected>>", lambda e: self._destination_chosen())
        self.add_button = ttk.Button(f, text="Add\u2026", underline=0, command=self.add_destination, name="add")
        self.add_button.grid(row=1, column=2, sticky="ew", padx=("6p", 0), **pad)
        self.dest_info = ttk.Label(f, style="Small.TLabel", wraplength=wrap, justify="left", name="destinfo")
        self.dest_info.grid(row=2, column=1, columnspan=2, sticky="w")

        ttk.Label(f, text="Study folder:", underline=6).grid(row=3, column=0, sticky="w", padx=(0, "6p"), **pad)
        self.source_var = tk.StringVar(root)
        self.source_entry = ttk.Entry(f, textvariable=self.source_var, width=48, name="source")
        self.source_entry.grid(row=3, column=1, sticky="ew", **pad)
        self.source_entry.bind("<Return>", lambda e: (self.rescan(), "break")[1])
        self.browse_button = ttk.Button(f, text="Browse\u2026", underline=0, command=self.browse, name="browse")
        self.browse_button.grid(row=3, column=2, sticky="ew", padx=("6p", 0), **pad)

        self.user_label = ttk.Label(f, text="Your user name:", underline=0)
        self.user_label.grid(row=4, column=0, sticky="w", padx=(0, "6p"), **pad)
        self.user_var = tk.StringVar(root)
        self.user_row = ttk.Frame(f)
        self.user_row.grid(row=4, column=1, columnspan=2, sticky="ew", **pad)
        self.user_entry = ttk.Entry(self.user_row, textvariable=self.user_var, width=20, name="user")
        self.user_entry.grid(row=0, column=0, sticky="w")
        self.user_note = ttk.Label(self.user_row, text="A password is asked only if the server wants one, and "
                                                       "never stored.", style="Small.TLabel", justify="left")
        self.user_note.grid(row=0, column=1, sticky="w", padx=("8p", 0))

        ttk.Label(f, text="What to send:", underline=0).grid(row=6, column=0, sticky="nw", padx=(0, "6p"),
                                                             pady=("8p", "3p"))
        self.everything_var = tk.BooleanVar(root, value=True)
        self.everything_check = ttk.Checkbutton(f, text="Everything in the study folder", underline=0,
                                                variable=self.everything_var, command=self._everything_toggled,
                                                name="everything")
        self.everything_check.grid(row=6, column=1, columnspan=2, sticky="w", pady=("8p", "3p"))
        self.everything_info = ttk.Label(f, style="Small.TLabel", name="everythinginfo")
        self.everything_info.grid(row=7, column=1, columnspan=2, sticky="w", pady=(0, "2p"))

        tree_frame = ttk.Frame(f)
        tree_frame.grid(row=8, column=1, columnspan=2, sticky="nsew", **pad)
        tree_frame.columnconfigure(0, weight=1)
        tree_frame.rowconfigure(0, weight=1)
        self.tree = ttk.Treeview(tree_frame, columns=("size", "files", "changed"), height=4, selectmode="browse",
                                 name="parts")
        em = tkfont.nametofont("TkDefaultFont").measure("0")
        self.tree.heading("#0", text="Folder", anchor="w")
        self.tree.heading("size", text="Size", anchor="e")
        self.tree.heading("files", text="Files", anchor="e")
        self.tree.heading("changed", text="New or changed", anchor="e")
        self.tree.column("#0", width=em * 22, stretch=True)
        self.tree.column("size", width=em * 9, anchor="e", stretch=False)
        self.tree.column("files", width=em * 8, anchor="e", stretch=False)
        self.tree.column("changed", width=em * 15, anchor="e", stretch=False)
        self.tree.tag_configure("implied", foreground="#707070")
        self.tree.grid(row=0, column=0, sticky="nsew")
        sb = ttk.Scrollbar(tree_frame, orient="vertical", command=self.tree.yview)
        sb.grid(row=0, column=1, sticky="ns")
        self.tree.configure(yscrollcommand=sb.set)
        self.tree.bind("<space>", self._tree_space)
        self.tree.bind("<Button-1>", self._tree_click)
        self.tree.bind("<FocusIn>", self._tree_focus)
        f.rowconfigure(8, weight=1)

        self.changed_only_var = tk.BooleanVar(root, value=False)
        self.changed_only_check = ttk.Checkbutton(
            f, text="Only files that are new or changed since the last send", underline=0,
            variable=self.changed_only_var, command=self._update_summary, name="changedonly")
        self.changed_only_check.grid(row=9, column=1, columnspan=2, sticky="w", **pad)

        self.summary = ttk.Label(f, wraplength=wrap, justify="left", name="summary")
        self.summary.grid(row=10, column=0, columnspan=3, sticky="w", pady=("6p", "3p"))

        ttk.Separator(f).grid(row=11, column=0, columnspan=3, sticky="ew", pady="4p")

        self.progress = ttk.Progressbar(f, orient="horizontal", mode="determinate", maximum=1000, name="progress")
        self.progress.grid(row=12, column=0, columnspan=3, sticky="ew", **pad)
        self.progress_label = ttk.Label(f, text=" ", name="progressline")
        self.progress_label.grid(row=13, column=0, columnspan=3, sticky="w")
        self.file_label = ttk.Label(f, text=" ", style="Small.TLabel", name="currentfile")
        self.file_label.grid(row=14, column=0, columnspan=3, sticky="w")

        self.message = ttk.Label(f, text="", style="Neutral.TLabel", wraplength=wrap, justify="left", name="message")
        self.message.grid(row=15, column=0, columnspan=3, sticky="w", pady=("8p", 0))
        self.advice = ttk.Label(f, text="", wraplength=wrap, justify="left", name="advice")
        self.advice.grid(row=16, column=0, columnspan=3, sticky="w", pady=("3p", 0))
        self.detail = ttk.Label(f, text="", style="Small.TLabel", wraplength=wrap, justify="left", name="detail")
        self.detail.grid(row=17, column=0, columnspan=3, sticky="w", pady=("3p", 0))

        bar = ttk.Frame(f)
        bar.grid(row=18, column=0, columnspan=3, sticky="ew", pady=("10p", 0))
        bar.columnconfigure(1, weight=1)
        self.copy_button = ttk.Button(bar, text="Copy details", underline=0, command=self.copy_details,
                                      state="disabled", name="copy")
        self.copy_button.grid(row=0, column=0, sticky="w")
        self.cancel_button = ttk.Button(bar, text="Cancel", underline=2, command=self.cancel, state="disabled",
                                        name="cancel")
        self.cancel_button.grid(row=0, column=2, padx=(0, "6p"))
        self.send_button = ttk.Button(bar, text="Send", underline=0, command=self.send, name="send",
                                      default="active")
        self.send_button.grid(row=0, column=3)

        self.frame.bind("<Configure>", self._rewrap)
        for var in (self.source_var, self.user_var):
            var.trace_add("write", lambda *a: self._rescan_soon())

        _mnemonic(root, "d", lambda: _focus(self.dest_combo))
        _mnemonic(root, "a", self.add_button.invoke)
        _mnemonic(root, "f", lambda: _focus(self.source_entry))
        _mnemonic(root, "b", self.browse_button.invoke)
        _mnemonic(root, "y", lambda: _focus(self.user_entry))
        _mnemonic(root, "w", lambda: self.tree.focus_set())
        _mnemonic(root, "e", self.everything_check.invoke)
        _mnemonic(root, "o", self.changed_only_check.invoke)
        _mnemonic(root, "n", self.cancel_button.invoke)
        _mnemonic(root, "s", self.send_button.invoke)
        _mnemonic(root, "c", self.copy_button.invoke)
        root.bind("<Return>", self._on_return)
        root.bind("<KP_Enter>", self._on_return)
        root.bind("<Escape>", lambda e: self.cancel())

    def _rewrap(self, event) -> None:
        wrap = max(self.wrap_length() // 2, event.width - int(self.root.winfo_fpixels("24p")))
        for w in (self.summary, self.message, self.advice, self.detail):
            w.configure(wraplength=wrap)
        self.dest_info.configure(wraplength=max(100, wrap - int(self.root.winfo_fpixels("90p"))))
        self.user_note.configure(wraplength=max(100, wrap - self.user_entry.winfo_width()
                                                - int(self.root.winfo_fpixels("110p"))))

    # -- destinations

    def _fill_destinations(self, prefer: str | None) -> None:
        names = sorted(self.settings.destinations)
        self.dest_combo.configure(values=names)
        if not names:
            self.dest_var.set("")
            self.dest = None
            self.dest_info.configure(text=self.settings_error or "No destination is saved on this computer yet: "
                                     "press Add to enter the one your study runner gave you.")
            self._apply_destination()
            return
        pick = prefer if prefer in self.settings.destinations else names[0]
        self.dest_var.set(pick)
        self._destination_chosen()

    def _destination_chosen(self) -> None:
        name = self.dest_var.get()
        self.dest = self.settings.destinations.get(name)
        self._apply_destination()

    def _apply_destination(self) -> None:
        d = self.dest
        remembered = self.choices.per_destination.get(d.name, {}) if d else {}
        if d is None:
            self.user_var.set("")
            self.selection = logic.Selection()
        else:
            where = "server" if logic.is_server(d.to) else "folder"
            self.dest_info.configure(text=f"Study {d.study}, sent to the {where} {d.to}")
            self.source_var.set(remembered.get("source") or d.source or "")
            self.user_var.set(remembered.get("user") or logic.user_of(d.to))
            self.selection = logic.Selection.initial(remembered, d)
            self.changed_only_var.set(bool(remembered.get("changed_only", False)))
        server = d is not None and logic.is_server(d.to)
        for w in (self.user_label, self.user_row):
            if server:
                w.grid()
            else:
                w.grid_remove()
        self.rescan()

    def add_destination(self) -> None:
        if self.busy():
            return
        AddDestinationDialog(self)

    def destination_added(self, name: str) -> None:
        self.settings = self._load_settings()
        self._fill_destinations(name)
        self.dest_combo.focus_set()

    # -- the study folder and its parts

    def browse(self) -> None:
        if self.busy():
            return
        start = self.source_var.get() or os.path.expanduser("~")
        chosen = filedialog.askdirectory(parent=self.root, initialdir=start if os.path.isdir(start) else None,
                                         title="Choose the study folder", mustexist=True)
        if chosen:
            self.source_var.set(os.path.normpath(chosen))
            self.rescan()

    def _rescan_soon(self) -> None:
        if self._rescan_after is not None:
            self.root.after_cancel(self._rescan_after)
        self._rescan_after = self.root.after(RESCAN_DELAY_MS, self.rescan)

    def rescan(self) -> None:
        """Look at the study folder again (in a worker): parts, sizes, changes."""
        if self._rescan_after is not None:
            self.root.after_cancel(self._rescan_after)
            self._rescan_after = None
        if self.scan_job is not None:
            self.scan_job.stop()
            self.scan_job = None
        self.scan = None
        self.interrupted = None
        source = self.source_var.get().strip()
        if self.dest is None or not source:
            self.scan = logic.FolderScan(source, error="Choose the study folder." if self.dest else
                                         "Choose where to send (or add a destination).")
            self._show_parts()
            return
        to = logic.address_with_user(self.dest.to, self.user_var.get())
        self.scan_job = logic.ScanJob(self.home, self.dest, to, source).start()
        self._show_parts()

    def _scan_finished(self, job: logic.ScanJob) -> None:
        self.scan_job = None
        self.scan = job.result
        self.interrupted = job.interrupted
        self._show_parts()

    def _show_parts(self) -> None:
        tree = self.tree
        keep = tree.focus()
        tree.delete(*tree.get_children())
        scan = self.scan
        self.everything_var.set(self.selection.everything)
        if scan is None or scan.error:
            self.everything_info.configure(text="")
            self._update_summary()
            return
        known = scan.ledger_known
        self.everything_info.configure(text=scan.total.describe(known) + (
            f"; {logic.plural(scan.top.files, 'file')} directly in the folder" if scan.top.files else ""))
        for p in scan.parts:
            ticked = self.selection.ticked(p.name)
            changed = "" if not known else (f"{p.changed:,}" if p.changed else "none")
            tree.insert("", "end", iid=p.name, text=f"{CHECKED if ticked else UNCHECKED} {p.name}",
                        values=(logic.format_size(p.bytes), f"{p.files:,}", changed),
                        tags=("implied",) if self.selection.everything else ())
        if keep and tree.exists(keep):
            tree.focus(keep)
            tree.selection_set(keep)
        self._update_summary()

    def _tree_focus(self, event) -> None:
        if not self.tree.focus():
            children = self.tree.get_children()
            if children:
                self.tree.focus(children[0])
                self.tree.selection_set(children[0])

    def _tree_space(self, event) -> str:
        item = self.tree.focus()
        if item:
            self.toggle_part(item)
        return "break"

    def _tree_click(self, event) -> None:
        item = self.tree.identify_row(event.y)
        if item and self.tree.identify_column(event.x) == "#0":
            self.tree.focus(item)
            self.tree.selection_set(item)
            self.toggle_part(item)

    def toggle_part(self, name: str) -> None:
        if self.busy() or self.scan is None:
            return
        self.selection.toggle(name, self.scan.names())
        self._show_parts()

    def _everything_toggled(self) -> None:
        if self.busy():
            self.everything_var.set(self.selection.everything)
            return
        if self.everything_var.get() != self.selection.everything:
            self.selection.toggle_everything()
        self._show_parts()

    def _update_summary(self) -> None:
        if self.busy():
            return
        why = logic.cannot_send_yet(self.dest, self.source_var.get(), self.scan, self.selection,
                                    self.user_var.get())
        if why is None:
            text = logic.what_will_be_sent(self.scan, self.selection, self.changed_only_var.get())
            if self.interrupted is not None:
                text += (" A send of this folder was stopped before it finished: Send continues it "
                         f"({logic.plural(self.interrupted.files_done, 'file')} already sent).")
            missing = self.selection.missing(self.scan.names()) if self.scan else []
            if missing:
                text += f" Not in the folder: {', '.join(missing)}."
        else:
            text = why
        self.summary.configure(text=text)
        self.send_button.configure(state="normal" if why is None else "disabled")

    # -- sending

    def busy(self) -> bool:
        return self.job is not None

    def _on_return(self, event) -> str:
        w = self.root.focus_get()
        if isinstance(w, ttk.Button):
            w.invoke()
        elif w is self.tree:
            self.send()
        elif not isinstance(w, ttk.Combobox) or str(self.dest_combo.cget("state")) == "readonly":
            self.send()
        return "break"

    def send(self) -> None:
        if self.busy() or str(self.send_button.cget("state")) == "disabled":
            return
        d = self.dest
        assert d is not None and self.scan is not None
        source = self.source_var.get().strip()
        user = self.user_var.get().strip()
        changed_only = self.changed_only_var.get()
        self.choices.remember(d.name, source, user, self.selection, changed_only)
        logic.save_choices(self.home, self.choices)
        names = self.scan.names()
        self.what = {"destination": d.name, "study": d.study, "to": logic.address_with_user(d.to, user),
                     "source": source, "parts": ", ".join(self.selection.chosen(names)) or "everything",
                     "changed only": changed_only, "settings": ", ".join(self.settings.files)}
        self._clear_result()
        try:
            opts = logic.send_options(d, source, self.selection, user, self.home, changed_only, names)
        except EideticError as e:
            self._show_failure(e, None)
            return
        self.job = logic.SendJob(opts, self.send_fn).start()
        self._set_inputs("disabled")
        self.send_button.configure(state="disabled")
        self.cancel_button.configure(state="normal")
        self.copy_button.configure(state="disabled")
        self.progress.configure(mode="indeterminate", value=0)
        self.progress.start(40)
        connecting = "Connecting to the server\u2026" if logic.is_server(d.to) else "Opening the inbox folder\u2026"
        self.progress_label.configure(text=connecting)
        self.summary.configure(text="Sending\u2026 You can keep working; Cancel stops the send, and the next "
                                    "Send continues it.")

    def cancel(self) -> None:
        job = self.job
        if job is None or job.cancelling:
            return
        job.cancel()
        if self.dialog is not None and isinstance(self.dialog, (HostKeyDialog, PasswordDialog)):
            self.dialog.close()     # the worker got its "no" from job.cancel()
        self.cancel_button.configure(state="disabled")
        self.progress_label.configure(text="Stopping\u2026")

    def answer(self, value) -> None:
        if self.job is not None:
            self.job.answer(value)

    def after_dialog(self) -> None:
        # Back to the main window (a window manager would do this for a
        # transient dialog; without one the keyboard would go nowhere).
        self.root.focus_force()
        target = self.cancel_button if self.busy() else self.send_button
        if str(target.cget("state")) != "disabled":
            target.focus_set()

    def _set_inputs(self, state: str) -> None:
        self.dest_combo.configure(state="disabled" if state == "disabled" else "readonly")
        for w in (self.add_button, self.source_entry, self.browse_button, self.user_entry,
                  self.everything_check, self.changed_only_check):
            w.configure(state=state)

    def _clear_result(self) -> None:
        self.message.configure(text="", style="Neutral.TLabel")
        self.advice.configure(text="")
        self.detail.configure(text="")
        self.file_label.configure(text=" ")
        self.outcome = None

    def _poll(self) -> None:
        self._poll_after = None
        try:
            if self.scan_job is not None and self.scan_job.done():
                self._scan_finished(self.scan_job)
            if self.job is not None:
                self._poll_job(self.job)
        finally:
            if not self._closing:
                self._poll_after = self.root.after(POLL_MS, self._poll)

    def _poll_job(self, job: logic.SendJob) -> None:
        p = job.take_progress()
        if p is not None and not job.cancelling:
            self._show_progress(p, job)
        while True:
            try:
                ev = job.events.get_nowait()
            except Exception:
                break
            if ev.kind == "notice":
                self.detail.configure(text=logic.plain_notice(str(ev.value)))
            elif ev.kind == "ask_host_key":
                if job.cancelling:
                    job.answer(False)
                else:
                    HostKeyDialog(self, ev.value)
            elif ev.kind == "ask_password":
                if job.cancelling:
                    job.answer(None)
                else:
                    PasswordDialog(self, str(ev.value))
            elif ev.kind in ("done", "cancelled", "failed"):
                self._finish(job, ev)
                break

    def _show_progress(self, p, job: logic.SendJob) -> None:
        if p.phase == "finishing":
            # The last step (the upload's description, then flushing the whole
            # upload to disk) reports no progress and can take seconds after a
            # large send: the bar moves, so the window keeps redrawing and never
            # looks stuck (bench/gui_send.py counts its redraws).
            if str(self.progress.cget("mode")) != "indeterminate":
                self.progress.configure(mode="indeterminate", value=0)
                self.progress.start(40)
            self.progress_label.configure(text=logic.progress_line(p))
        elif p.phase == "sending":
            if str(self.progress.cget("mode")) != "determinate":
                self.progress.stop()
                self.progress.configure(mode="determinate")
            self.progress.configure(value=logic.progress_fraction(p) * 1000)
            left = job.meter.seconds_left(p.bytes_total)
            self.progress_label.configure(text=logic.progress_line(p, job.meter.rate(), left))
            if p.path:
                shown = p.path if len(p.path) <= 70 else "\u2026" + p.path[-69:]
                self.file_label.configure(text=f"Sending {shown}")
        else:
            self.progress_label.configure(text=logic.progress_line(p))

    def _finish(self, job: logic.SendJob, ev: logic.Event) -> None:
        self.job = None
        if self.dialog is not None and isinstance(self.dialog, (HostKeyDialog, PasswordDialog)):
            self.dialog.close()
        self.progress.stop()
        self.progress.configure(mode="determinate")
        self.file_label.configure(text=" ")
        if ev.kind == "done":
            res = ev.value
            self.outcome = "sent"
            self.progress.configure(value=1000)
            self.progress_label.configure(text=f"{logic.format_size(res.bytes)} \u00b7 "
                                               f"{logic.plural(res.files, 'file')} \u00b7 done")
            self.message.configure(text=logic.success_message(res, job.resumed), style="Success.TLabel")
            self.advice.configure(text=" ".join(logic.result_notes(res)))
            self.detail.configure(text="")
            self.details = logic.details_text(self.what, "sent", notices=job.notices, res=res)
        elif ev.kind == "cancelled":
            self.outcome = "cancelled"
            self.progress_label.configure(text="Stopped.")
            self.message.configure(text=logic.CANCELLED, style="Neutral.TLabel")
            self.advice.configure(text="")
            self.details = logic.details_text(self.what, "cancelled", ev.value, notices=job.notices)
        else:
            self._show_failure(ev.value, ev.traceback, job.notices)
        self._set_inputs("normal")
        self.cancel_button.configure(state="disabled")
        self.copy_button.configure(state="normal")
        self.rescan()
        self.send_button.focus_set()    # enabled again once the folder is looked at anew

    def _show_failure(self, exc: BaseException, tb: str | None, notices: list[str] | None = None) -> None:
        fail = logic.explain_failure(exc)
        self.outcome = "failed"
        self.progress_label.configure(text="Not sent.")
        self.message.configure(text=fail.headline, style="Failure.TLabel")
        self.advice.configure(text=fail.advice)
        self.detail.configure(text=fail.detail)
        self.details = logic.details_text(getattr(self, "what", {}), "failed", exc, tb, notices)
        self.copy_button.configure(state="normal")

    def copy_details(self) -> None:
        if not self.details:
            return
        self.root.clipboard_clear()
        self.root.clipboard_append(self.details)
        self.progress_label.configure(text="The details are copied: paste them into an e-mail to your "
                                           "study runner.")

    # -- closing

    def close(self) -> None:
        if self.job is not None:
            if not messagebox.askyesno(
                    "eidetic", "A send is still running. Stop it and close the window?\n\nNothing reaches the "
                               "archive until a send is complete; the next Send continues where it stopped.",
                    parent=self.root):
                return
            self.job.cancel()
            thread = self.job.thread
            if thread is not None:
                thread.join(timeout=10)
        self._remember()
        self.destroy()

    def _remember(self) -> None:
        if self.dest is None:
            return
        self.choices.remember(self.dest.name, self.source_var.get().strip(), self.user_var.get().strip(),
                              self.selection, self.changed_only_var.get())
        logic.save_choices(self.home, self.choices)

    def destroy(self) -> None:
        self._closing = True
        if self._poll_after is not None:
            self.root.after_cancel(self._poll_after)
        if self.scan_job is not None:
            self.scan_job.stop()
        self.root.destroy()


def main(argv: list[str] | None = None) -> int:
    """The eidetic-gui program and ``eidetic gui``: open the window; returns
    the exit status (a message on stderr when no window can be opened)."""
    if tk is None:
        print("eidetic: the desktop app needs Tk (tkinter), which this Python lacks: on Windows and macOS "
              "install Python from python.org; on Debian or Ubuntu: apt install python3-tk", file=sys.stderr)
        return 3
    _dpi_aware()
    try:
        root = tk.Tk(className="eidetic")
    except tk.TclError as e:
        print(f"eidetic: cannot open a window ({e}): the desktop app needs a desktop session; "
              "'eidetic send' works without one", file=sys.stderr)
        return 3
    App(root)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
