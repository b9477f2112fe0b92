#!/usr/bin/env python3
"""eidetic benchmark: a send from the desktop app vs ``eidetic send``, side by side.

    python3 bench/gui_send.py [--size GIB] [--repeat N] [--out results.json] [--keep] ...

Issue 10's target: "A send from the app moves data within 10 % of
``eidetic send`` on the same data; the window redraws at least 5 times a
second during a 2 GB send."  On the same ~2 GiB study folder (``eprime/``
many small files, ``eyetracker/`` medium files, ``biopac/`` a few large
ones; generated here, seeded), each repetition runs, in alternating order:

1. the CLI: ``eidetic send SOURCE --study bench --to INBOX --location labA``
   (a subprocess, into a fresh inbox folder and a fresh client folder);
2. the app: the real window (``eidetic.client.gui.App`` in ``tk.Tk``, its
   own ``mainloop``) in a subprocess on a virtual display (an Xvfb started
   here), driven the way tests/test_gui.py drives it: the saved destination
   is chosen in the list, real X key events from xdotool give the study
   folder (Alt+F, the path typed, Enter), the window looks at the folder,
   then Alt+S presses Send.  Timed from just before xdotool presses Send to
   the end message being set (the app's ``_finish``), into a fresh inbox
   and client folder.

The CLI's time includes its process start, the app's does not (it starts at
Send, the folder already looked at): the fixed cost of the CLI (``eidetic
send`` of an empty folder, median of 5) is measured apart and a ratio with
it taken off is printed for information.

``sync`` is counted the same way for both: one before each send (not timed,
as every harness here does) and one right after it, timed and added to the
send's time.  A screen sampler (``--screen-hz``, a separate process reading
the progress area's pixels from the virtual screen over Xlib) runs during
both sends alike.

The window's redraws are counted inside the app process by an ``after``
sampler (every ``--sample-ms``, default 20 ms): each tick reads the progress
bar's value and mode and the two progress lines; a change schedules an
``after_idle`` callback, which Tk runs after the widgets' own idle redisplay,
and its time is one redraw that reached the screen.  Reported: redraws in
each full second from pressing Send to the end message (the target: >= 5 in
every one), the minimum over any sliding 1-second window, the mean, the
longest gap, and how late the sampler's ticks came (the event loop's
responsiveness).  The screen sampler counts changes of the pixels, as a
cross-check (it sees at most --screen-hz per second).

PASS/FAIL: app/CLI wall-time ratio (median of the per-repetition ratios)
<= 1.10, and redraws >= 5 in every full second of every app send.

Rules kept (docs/design.md, "Measuring here"): fresh destinations for every
send, nothing deleted before the end, only ratios measured side by side are
compared.  Helpers (timing, rusage, bytecode cache, machine notes) come from
bench/run.py and bench/daemon_send.py.  The window runs under the Python of
the eidetic executable (its ``#!`` line), which must have tkinter; Xvfb,
xdotool and libX11 must be installed.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import queue
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20
GiB = 1 << 30
STUDY = "bench"
LOCATION = "labA"
DEST = "bench-inbox"
SEED = 20261205
RATIO_LIMIT = 1.10
REDRAW_MIN = 5


# ------------------------------------------------------------ statistics

def redraw_stats(stamps: list[float], t0: float, t1: float) -> dict:
    """Redraws between *t0* (Send pressed) and *t1* (the end message)."""
    s = sorted(x for x in stamps if t0 <= x <= t1)
    dur = t1 - t0
    full = int(dur)
    per_second = [bisect.bisect_left(s, t0 + i + 1) - bisect.bisect_left(s, t0 + i) for i in range(full)]
    sliding = None
    if dur >= 1:
        # The window [a, a+1] holding the fewest redraws starts at t0, at
        # t1 - 1, or just after a redraw (then the redraw itself is outside it).
        def closed(a):
            return bisect.bisect_right(s, a + 1) - bisect.bisect_left(s, a)

        def after(x):
            return bisect.bisect_right(s, x + 1) - bisect.bisect_right(s, x)
        sliding = min([closed(t0), closed(t1 - 1)] + [after(x) for x in s if x <= t1 - 1])
    edges = [t0] + s + [t1]
    return {"seconds": dur, "redraws": len(s), "mean_per_s": len(s) / dur if dur > 0 else None,
            "full_seconds": full, "per_full_second": per_second,
            "min_full_second": min(per_second) if per_second else None,
            "min_sliding_1s": sliding,
            "max_gap_s": max(b - a for a, b in zip(edges, edges[1:])) if len(edges) > 1 else None}


# ------------------------------------------------------------------ data

def make_data(data: str, size_gib: float) -> dict:
    """A study folder of about *size_gib* GiB: ``eprime/`` 10,000 small files
    per GiB (1 B-16 KiB, in folders of 100, half text-like), ``eyetracker/``
    40 files of 1-8 MiB per GiB, ``biopac/`` 4 large files holding the rest,
    and one file directly in the folder.  Incompressible where binary; seeded."""
    import gen_data
    t0 = time.monotonic()
    rng = random.Random(SEED)
    os.makedirs(data)
    target = int(size_gib * GiB)
    n_small = max(10, round(10_000 * size_gib))
    n_medium = max(2, round(40 * size_gib))
    s = {"size_gib": size_gib, "seed": SEED, "files": 0, "bytes": 0, "parts": {}}

    def wrote(part: str, n: int) -> None:
        s["files"] += 1
        s["bytes"] += n
        p = s["parts"].setdefault(part, {"files": 0, "bytes": 0})
        p["files"] += 1
        p["bytes"] += n

    medium_sizes = [rng.randint(1 * MiB, 8 * MiB) for _ in range(n_medium)]
    small_sizes = [gen_data._small_size(rng) for _ in range(n_small)]
    large_total = max(4, target - sum(medium_sizes) - sum(small_sizes) - 1024)
    os.makedirs(os.path.join(data, "biopac"))
    for i in range(4):
        n = large_total // 4 + (large_total % 4 if i == 3 else 0)
        gen_data.write_large(os.path.join(data, "biopac", f"sub-{i + 1:03d}_ses-1_physio.acq"), n, rng)
        wrote("biopac", n)
    os.makedirs(os.path.join(data, "eyetracker"))
    for i, n in enumerate(medium_sizes):
        gen_data.write_large(os.path.join(data, "eyetracker", f"sub-{i + 1:03d}_ses-1.edf"), n, rng)
        wrote("eyetracker", n)
    for i, n in enumerate(small_sizes):
        d = os.path.join(data, "eprime", f"sub-{i // 100 + 1:03d}")
        if i % 100 == 0:
            os.makedirs(d)
        body = gen_data._text_bytes(rng, n) if rng.random() < 0.5 else rng.randbytes(n)
        with open(os.path.join(d, f"run-{rng.randint(1, 6)}-{i % 100:03d}.txt"), "wb") as f:
            f.write(body)
        wrote("eprime", n)
    with open(os.path.join(data, "notes.txt"), "wb") as f:
        f.write(b"session notes\n" * 64)
    wrote("", 14 * 64)
    s["seconds"] = round(time.monotonic() - t0, 1)
    return s


# -------------------------------------------------------------- helpers

def python_of(exe: str) -> str:
    """The interpreter of a console script (its #! line), else this one."""
    try:
        with open(exe, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
        if first.startswith("#!"):
            py = first[2:].split()[0]
            if os.access(py, os.X_OK):
                return py
    except OSError:
        pass
    return sys.executable


def default_eidetic() -> str | None:
    for p in ("/work/venv/bin/eidetic", os.path.join(REPO, ".venv", "bin", "eidetic")):
        if os.access(p, os.X_OK):
            return p
    return shutil.which("eidetic")


class Xvfb:
    """A virtual X display (the number chosen by Xvfb itself, -displayfd), as
    tests/test_gui.py starts it."""

    def __init__(self, preexec) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24",
                                      "-nolisten", "tcp"], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)
        os.close(w)
        try:
            number = b""
            deadline = time.monotonic() + 20
            while not number.endswith(b"\n"):
                ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(r, 16) if ready else b""
                if not chunk:
                    raise RuntimeError(f"Xvfb did not start (exit status {self.proc.poll()})")
                number += chunk
            self.display = f":{int(number)}"
        finally:
            os.close(r)

    def cpu_seconds(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        from daemon_send import terminate
        terminate(self.proc, 10)


def proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return float("nan")
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Lines:
    """A child's stdout lines, read by a thread, handed out with a timeout."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def expect(self, word: str, timeout: float, proc: subprocess.Popen, log: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or (not line and time.monotonic() > deadline):
                with open(log, "rb") as f:
                    tail = f.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"the app driver: no {word} (exit {proc.poll()}); its log {log}:\n{tail}")
            if line.startswith(word + " "):
                return json.loads(line[len(word) + 1:])


class ScreenSampler:
    """A child grabbing a region of the virtual screen --screen-hz times a
    second (counting pixel changes); run during both sends alike."""

    def __init__(self, py: str, display: str, bbox: list[int], hz: float, out: str) -> None:
        self.out = out
        self.proc = None
        if hz > 0:
            self.proc = subprocess.Popen(
                [py, os.path.abspath(__file__), "_screen", "--display", display, "--bbox",
                 ",".join(map(str, bbox)), "--hz", str(hz), "--out", out],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.stdin.close()            # EOF: write the result and exit
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            with open(self.out) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def timed_sync() -> float:
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the sends

def client_env(home: str, display: str | None) -> dict:
    from run import EIDETIC
    env = dict(EIDETIC["env"], EIDETIC_CLIENT_HOME=home,
               EIDETIC_CLIENT_MACHINE_SETTINGS=os.path.join(home, "no-machine-settings.yaml"))
    if display:
        env["DISPLAY"] = display
    env.pop("SSH_AUTH_SOCK", None)
    return env


def write_client_settings(home: str, inbox: str | None) -> None:
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "eidetic-client.yaml"), "w") as f:
        f.write(f"location: {LOCATION}\n")
        if inbox:
            f.write(f"destinations:\n  {DEST}:\n    study: {STUDY}\n    to: {inbox}\n")


def cli_send(b, eidetic: str, src: str, summary: dict, rep: str, xv: Xvfb, ctx: dict) -> dict:
    from daemon_send import check_tree, only_entry
    from run import cpu_busy_seconds
    inbox, home = os.path.join(rep, "cli-inbox"), os.path.join(rep, "cli-client")
    os.makedirs(inbox)
    write_client_settings(home, None)
    screen = ScreenSampler(ctx["py"], xv.display, ctx["bbox"], b.a.screen_hz, os.path.join(rep, "cli-screen.json"))
    busy0, x0 = cpu_busy_seconds(), xv.cpu_seconds()
    r = b.timed("send", "eidetic send (CLI)",
                [eidetic, "send", src, "--study", STUDY, "--to", inbox, "--location", LOCATION],
                env=client_env(home, None))
    sync_s = timed_sync()
    busy1, x1 = cpu_busy_seconds(), xv.cpu_seconds()
    scr = screen.stop()
    if r.ok:
        check_tree(b, r, only_entry(inbox), summary)
    r.extra.update(sync_s=sync_s, total_s=r.seconds + sync_s, machine_busy_cores=(busy1 - busy0) / (r.seconds + sync_s),
                   xvfb_cpu_s=x1 - x0, screen=scr)
    b.say(f"  {'':13} {'+ sync':<22} {sync_s:8.2f} s  -> {r.seconds + sync_s:.2f} s")
    return {"tool": "cli", "ok": r.ok, "send_s": r.seconds, "sync_s": sync_s, "total_s": r.seconds + sync_s,
            "cpu_s": r.user_s + r.sys_s, "rss_mib": r.tree_rss_mib, "private_mib": r.tree_anon_mib,
            "maxrss_mib": r.maxrss_mib, "others_cores": r.other_cores,
            "machine_busy_cores": r.extra["machine_busy_cores"], "xvfb_cpu_s": x1 - x0,
            "screen": screen_summary(scr, None, None), "note": r.note}


def app_send(b, src: str, summary: dict, rep: str, xv: Xvfb, ctx: dict) -> dict:
    from daemon_send import check_tree, only_entry
    from run import Result, TreeRssSampler, cpu_busy_seconds, priority_preexec
    inbox, home = os.path.join(rep, "app-inbox"), os.path.join(rep, "app-client")
    os.makedirs(inbox)
    write_client_settings(home, inbox)
    log = os.path.join(b.logdir, f"{len(b.results):02d}-send-app.log")
    result_path = os.path.join(rep, "app-driver.json")
    env = client_env(home, xv.display)
    cmd = [ctx["py"], os.path.abspath(__file__), "_drive", "--home", home, "--source", src,
           "--sample-ms", str(b.a.sample_ms), "--result", result_path]
    r = Result("send", "desktop app (window)", cmd)
    with open(log, "wb") as logf:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, env=env, text=True,
                             preexec_fn=priority_preexec(b.a.nice))
        lines = Lines(p.stdout)
        try:
            ready = lines.expect("READY", 120, p, log)
            screen = ScreenSampler(ctx["py"], xv.display, ctx["bbox"], b.a.screen_hz,
                                   os.path.join(rep, "app-screen.json"))
            busy0, x0 = cpu_busy_seconds(), xv.cpu_seconds()
            b.settle()
            r.load_before = os.getloadavg()[0]
            rss = TreeRssSampler(p.pid)      # as Bench.timed samples the CLI's (the same /proc reading)
            rss.start()
            p.stdin.write("GO\n")
            p.stdin.flush()
            end = lines.expect("END", b.a.timeout, p, log)
            rss.stop()
            sync_s = timed_sync()
            busy1, x1 = cpu_busy_seconds(), xv.cpu_seconds()
            scr = screen.stop()
            p.stdin.close()
            p.wait(60)
        except BaseException:
            if p.poll() is None:
                p.kill()
                p.wait()
            raise
    with open(result_path) as f:
        drv = json.load(f)
    t_press, t_end = drv["t_press"], drv["t_end"]
    r.seconds = t_end - t_press
    r.user_s, r.sys_s = drv["cpu_user_s"], drv["cpu_sys_s"]
    r.rc = p.returncode
    r.tree_rss_mib, r.tree_anon_mib = rss.peak / MiB, rss.peak_anon / MiB
    r.ok = p.returncode == 0 and drv.get("outcome") == "sent"
    r.note = "" if r.ok else f"exit {p.returncode}, outcome {drv.get('outcome')}: {drv.get('message')}"
    r.extra.update(log=log, ready=ready, end=end, sync_s=sync_s, total_s=r.seconds + sync_s,
                   machine_busy_cores=(busy1 - busy0) / (r.seconds + sync_s), xvfb_cpu_s=x1 - x0, screen=scr,
                   driver={k: v for k, v in drv.items() if k not in ("ticks", "changes", "drawn")})
    b.results.append(r)
    if r.ok:
        check_tree(b, r, only_entry(inbox), summary)
    redraw = redraw_stats(drv["drawn"], t_press, t_end)
    ticks = [t for t in drv["ticks"] if t_press <= t <= t_end]
    tick_gaps = [y - x for x, y in zip(ticks, ticks[1:])]
    loop = {"ticks": len(ticks), "max_tick_gap_s": max(tick_gaps) if tick_gaps else None,
            "p99_tick_gap_s": sorted(tick_gaps)[int(0.99 * (len(tick_gaps) - 1))] if tick_gaps else None,
            "sample_ms": b.a.sample_ms}
    out = {"tool": "app", "ok": r.ok, "send_s": r.seconds, "sync_s": sync_s, "total_s": r.seconds + sync_s,
           "cpu_s": r.user_s + r.sys_s, "machine_busy_cores": r.extra["machine_busy_cores"],
           "rss_mib": r.tree_rss_mib, "private_mib": r.tree_anon_mib, "xvfb_cpu_s": x1 - x0,
           "redraw": redraw, "event_loop": loop, "screen": screen_summary(scr, t_press, t_end),
           "progress_updates": drv["progress_calls"], "key_to_send_s": drv.get("key_to_send_s"),
           "phases_s_after_press": {k: v - t_press for k, v in (drv.get("phases") or {}).items()},
           "message": drv.get("message"), "note": r.note}
    if r.ok:
        b.say(f"  {'send':<13} {'desktop app (window)':<22} {r.seconds:8.2f} s  cpu {r.user_s + r.sys_s:7.2f} s  "
              f"redraws/s min {redraw['min_full_second']} (sliding {redraw['min_sliding_1s']}) mean "
              f"{redraw['mean_per_s']:.1f}, longest gap {redraw['max_gap_s']:.3f} s")
        b.say(f"  {'':13} {'+ sync':<22} {sync_s:8.2f} s  -> {r.seconds + sync_s:.2f} s")
    else:
        b.say(f"  !! desktop app send failed: {r.note}; log {log}")
    return out


def screen_summary(scr: dict | None, t0: float | None, t1: float | None) -> dict | None:
    if not scr:
        return None
    out = {"grabs": len(scr["grabs"]), "errors": len(scr.get("errors", ())), "cpu_s": scr.get("cpu_s"),
           "hz": scr.get("hz")}
    if t0 is not None:
        st = redraw_stats(scr["changes"], t0, t1)
        out.update(changes=st["redraws"], mean_per_s=st["mean_per_s"], min_full_second=st["min_full_second"],
                   max_gap_s=st["max_gap_s"])
    return out


# -------------------------------------------------------------- reporting

def report(pairs: list[dict], summary: dict, meta: dict) -> tuple[str, dict]:
    ratios = [p["app"]["total_s"] / p["cli"]["total_s"] for p in pairs if p["app"]["ok"] and p["cli"]["ok"]]
    ratios_send = [p["app"]["send_s"] / p["cli"]["send_s"] for p in pairs if p["app"]["ok"] and p["cli"]["ok"]]
    apps = [p["app"] for p in pairs if p["app"]["ok"]]
    mins = [a["redraw"]["min_full_second"] for a in apps if a["redraw"]["min_full_second"] is not None]
    means = [a["redraw"]["mean_per_s"] for a in apps]
    ok_all = len(ratios) == len(pairs) and len(apps) == len(pairs)
    med = statistics.median(ratios) if ratios else None
    v_ratio = "PASS" if ok_all and med is not None and med <= RATIO_LIMIT else "FAIL"
    v_redraw = "PASS" if ok_all and mins and min(mins) >= REDRAW_MIN else \
        "n/a (no send lasted a full second)" if ok_all and not mins else "FAIL"
    mib = summary["bytes"] / MiB
    lines = [f"Date {meta['date']}, eidetic commit {meta['commit']}, {meta['machine']}; study folder "
             f"{summary['files']:,} files, {mib:,.0f} MiB; {len(pairs)} repetitions, order alternating.", "",
             "| target | measured | limit | verdict |", "| --- | --- | --- | --- |",
             f"| app / CLI wall time incl. `sync`, median of pairs | "
             + (f"**{med:.3f}x** ({', '.join(f'{x:.3f}' for x in ratios)})" if med is not None else "n/a")
             + f" | <= {RATIO_LIMIT:.2f}x | {v_ratio} |",
             f"| window redraws per second, every full second of every app send: min (each send) | "
             + (f"**{min(mins)}** ({', '.join(map(str, mins))}); mean {', '.join(f'{m:.1f}' for m in means)}"
                if mins else "n/a") + f" | >= {REDRAW_MIN} | {v_redraw} |"]
    if meta.get("cli_startup_s") is not None and ratios:
        st = meta["cli_startup_s"]
        no_start = [p["app"]["total_s"] / (p["cli"]["total_s"] - st) for p in pairs
                    if p["app"]["ok"] and p["cli"]["ok"]]
        lines.append(f"| (information) app / CLI with the CLI's fixed cost ({st:.3f} s: `eidetic send` of an "
                     f"empty folder, median of 5) taken off | {statistics.median(no_start):.3f}x "
                     f"({', '.join(f'{x:.3f}' for x in no_start)}) | | |")
    lines += ["",
             "| rep | order | CLI send s | + sync s | app send s | + sync s | app / CLI | app / CLI without sync "
             "| redraws/s: min full s, min sliding 1 s, mean | longest gap s | loop tick gap max s "
             "| screen changes/s mean (min full s) | CPU s CLI / app | RSS MiB CLI / app | Xvfb CPU s during app |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- | ---: |"]
    for i, p in enumerate(pairs):
        c, a = p["cli"], p["app"]
        if not (c["ok"] and a["ok"]):
            lines.append(f"| {i + 1} | {p['order']} | failed: {c['note'] or a['note']} |")
            continue
        rd, scr = a["redraw"], a.get("screen")
        shown = f"{scr['mean_per_s']:.1f} ({scr['min_full_second']})" if scr and "mean_per_s" in scr else "--"
        lines.append(
            f"| {i + 1} | {p['order']} | {c['send_s']:.2f} | {c['sync_s']:.2f} | {a['send_s']:.2f} | {a['sync_s']:.2f} "
            f"| {a['total_s'] / c['total_s']:.3f} | {a['send_s'] / c['send_s']:.3f} "
            f"| {rd['min_full_second']}, {rd['min_sliding_1s']}, {rd['mean_per_s']:.1f} | {rd['max_gap_s']:.3f} "
            f"| {a['event_loop']['max_tick_gap_s']:.3f} "
            f"| {shown} "
            f"| {c['cpu_s']:.1f} / {a['cpu_s']:.1f} | {c['rss_mib']:.0f} / {a['rss_mib']:.0f} "
            f"| {a['xvfb_cpu_s']:.2f} |")
    verdicts = {"ratio": {"value": med, "per_pair": ratios, "per_pair_without_sync": ratios_send,
                          "limit": RATIO_LIMIT, "verdict": v_ratio},
                "redraw": {"min_full_second": min(mins) if mins else None, "per_send_min": mins,
                           "per_send_mean": means, "limit": REDRAW_MIN, "verdict": v_redraw}}
    return "\n".join(lines), verdicts


# ------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=2.0, help="study folder size in GiB (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (pairs), order alternating")
    ap.add_argument("--work", default="/work/bench-work",
                    help="scratch directory, outside the repository (default %(default)s)")
    ap.add_argument("--eidetic", default=None, help="eidetic executable (default /work/venv/bin/eidetic, "
                                                    "else the repository's .venv, else PATH)")
    ap.add_argument("--python", default=None, help="Python for the window (default: the eidetic executable's)")
    ap.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0,
                    help="CPU priority of both sends, the window and Xvfb (default -15 as root)")
    ap.add_argument("--sample-ms", type=int, default=20, help="the redraw sampler's period in the window")
    ap.add_argument("--screen-hz", type=float, default=20.0,
                    help="screen grabs per second during both sends (0: no screen sampler)")
    ap.add_argument("--timeout", type=float, default=1800, help="longest a send may take")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated study folder for the next run")
    ap.add_argument("--out", default=None, help="JSON results (default bench/out/gui-send-<time>.json)")
    a = ap.parse_args(argv)
    a.drop_caches = False           # Bench.settle reads it
    a.eidetic = a.eidetic or default_eidetic()
    work = os.path.abspath(a.work)
    if os.path.commonpath([work, REPO]) == REPO:
        ap.error("--work must be outside the repository")
    if not a.eidetic or not os.access(a.eidetic, os.X_OK):
        ap.error("no eidetic executable (--eidetic)")
    for tool in ("Xvfb", "xdotool"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install xvfb xdotool)")
    py = a.python or python_of(a.eidetic)

    sys.path.insert(0, HERE)
    from run import Bench, cached_data, machine_info, priority_preexec, setup_eidetic_env, tool_versions
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.join(work, f"gui-send-{stamp}")
    os.makedirs(run_dir)
    b = Bench(a)
    b.logdir = os.path.join(run_dir, "logs")
    os.makedirs(b.logdir)
    setup_eidetic_env(a.eidetic, os.path.join(run_dir, "pycache"))
    from run import EIDETIC
    subprocess.run([py, "-c", "import eidetic.client.gui, eidetic.client.send, eidetic.client.app, tkinter"],
                   env=EIDETIC["env"], check=True)      # the window's bytecode, cached too
    b.say(f"work directory: {run_dir}; eidetic {a.eidetic}; window Python {py}")
    versions = tool_versions({})
    started = time.monotonic()
    data, summary = cached_data(b, os.path.join(work, f"gui-data-{a.size:g}"), lambda d: make_data(d, a.size))
    xv = Xvfb(priority_preexec(a.nice))
    b.say(f"Xvfb on display {xv.display}")
    pairs = []
    startup = None
    try:
        # Where the progress area is on the screen (for the screen sampler): a window that only says so.
        probe = subprocess.run([py, os.path.abspath(__file__), "_drive", "--probe",
                                "--home", os.path.join(run_dir, "probe"), "--source", data],
                               env=client_env(os.path.join(run_dir, "probe"), xv.display),
                               capture_output=True, text=True, timeout=60)
        ctx = {"py": py, "bbox": json.loads(probe.stdout.split("READY ", 1)[1].splitlines()[0])["bbox"]}
        # The CLI's time includes its process start; the app's starts at Send.  Measured apart, for
        # reading: `eidetic send` of an empty folder (start-up, settings, send state, "nothing to send").
        empty, sink = os.path.join(run_dir, "empty"), os.path.join(run_dir, "empty-inbox")
        os.makedirs(empty)
        os.makedirs(sink)
        write_client_settings(os.path.join(run_dir, "empty-client"), None)
        starts = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([a.eidetic, "send", empty, "--study", STUDY, "--to", sink, "--location", LOCATION],
                           env=client_env(os.path.join(run_dir, "empty-client"), None), check=True,
                           capture_output=True, preexec_fn=priority_preexec(a.nice))
            starts.append(time.perf_counter() - t0)
        startup = statistics.median(starts)
        b.say(f"CLI fixed cost (eidetic send of an empty folder), median of 5: {startup:.3f} s")
        for k in range(a.repeat):
            rep = os.path.join(run_dir, f"rep{k + 1}")
            os.makedirs(rep)
            b.say(f"repetition {k + 1}/{a.repeat}")
            order = ["cli", "app"] if k % 2 == 0 else ["app", "cli"]
            pair = {"order": " then ".join(order)}
            for tool in order:
                pair[tool] = cli_send(b, a.eidetic, data, summary, rep, xv, ctx) if tool == "cli" \
                    else app_send(b, data, summary, rep, xv, ctx)
            if pair["cli"]["ok"] and pair["app"]["ok"]:
                b.say(f"  app / CLI: {pair['app']['total_s'] / pair['cli']['total_s']:.3f}x with sync, "
                      f"{pair['app']['send_s'] / pair['cli']['send_s']:.3f}x without")
            pairs.append(pair)
    finally:
        xv.stop()
        if not a.keep:
            b.say("cleaning up the work directory ...")
            shutil.rmtree(run_dir, ignore_errors=True)
            if not a.keep_data:
                shutil.rmtree(data, ignore_errors=True)
                try:
                    os.unlink(data + ".json")
                except FileNotFoundError:
                    pass
        else:
            b.say(f"kept {run_dir}")
    mi = machine_info(work)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": (versions.get("eidetic_commit") or "?").split()[0]
            + (f" (+{versions['eidetic_uncommitted_changes']} uncommitted files)"
               if versions.get("eidetic_uncommitted_changes") else ""),
            "machine": f"{mi.get('nproc')} CPU {mi.get('cpu', '')}, Python {mi.get('python')}",
            "cli_startup_s": startup}
    table, verdicts = report(pairs, summary, meta)
    print()
    print(table)
    doc = {"date": meta["date"], "machine": mi, "versions": versions, "args": vars(a), "data": summary,
           "cli_startup_s": startup, "screen_bbox": ctx.get("bbox") if "ctx" in locals() else None,
           "total_seconds": round(time.monotonic() - started, 1), "pairs": pairs, "verdicts": verdicts,
           "results": [asdict(r) for r in b.results], "markdown": table}
    path = a.out or os.path.join(HERE, "out", f"gui-send-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nresults: {path}")
    return 0 if verdicts["ratio"]["verdict"] == verdicts["redraw"]["verdict"] == "PASS" else 1


# ------------------------------------------- inside the window's process

def drive(argv) -> int:
    """The app's real window under its own mainloop, driven with xdotool.

    stdout: ``READY {...}`` once the folder is looked at and Send is
    possible; then it waits for ``GO`` on stdin, presses Send (Alt+S) and
    prints ``END {...}`` once the end message is set; the full record
    (sampler ticks, changes, redraw times) goes to --result."""
    ap = argparse.ArgumentParser(prog="gui_send.py _drive")
    ap.add_argument("--home", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--sample-ms", type=int, default=20)
    ap.add_argument("--result", default=None)
    ap.add_argument("--probe", action="store_true", help="only print where the progress area is")
    a = ap.parse_args(argv)
    import tkinter as tk
    from eidetic.client import gui

    if a.probe:
        write_client_settings(a.home, a.home)
    mono = time.monotonic
    go = threading.Event()

    def stdin_reader():
        for line in sys.stdin:
            if line.strip() == "GO":
                go.set()
    threading.Thread(target=stdin_reader, daemon=True).start()

    def emit(word: str, obj) -> None:
        sys.stdout.write(f"{word} {json.dumps(obj)}\n")
        sys.stdout.flush()

    def fail(why: str) -> None:
        print(f"driver: {why}", file=sys.stderr)
        os._exit(3)

    def xdo(*args: str) -> None:
        subprocess.run(["xdotool", *args], check=True, timeout=30)

    root = tk.Tk(className="eidetic")
    app = gui.App(root, home=a.home, machine_settings=os.path.join(a.home, "no-machine-settings.yaml"))
    root.geometry("+20+20")
    rec: dict = {"progress_calls": 0, "ticks": [], "changes": [], "drawn": [], "phases": {}}

    # Instrumentation only: count the progress updates the window applies,
    # and stamp the end message.
    show_progress = app._show_progress

    def counted_show_progress(p, job):
        rec["progress_calls"] += 1
        rec["phases"].setdefault(p.phase, mono())
        show_progress(p, job)
    app._show_progress = counted_show_progress
    finish = app._finish

    def stamped_finish(job, ev):
        finish(job, ev)
        rec["t_end"] = mono()
        t = os.times()
        rec["cpu_user_s"], rec["cpu_sys_s"] = t.user - rec["cpu0"][0], t.system - rec["cpu0"][1]
        rec["outcome"] = app.outcome
        rec["message"] = str(app.message.cget("text"))
        root.after_idle(ended)
    app._finish = stamped_finish

    job_start = gui.logic.SendJob.start

    def stamped_start(job):
        rec.setdefault("t_job_start", mono())
        return job_start(job)
    gui.logic.SendJob.start = stamped_start

    def state():
        return (str(app.progress.cget("value")), str(app.progress.cget("mode")),
                str(app.progress_label.cget("text")), str(app.file_label.cget("text")))
    last = [None]

    def drawn():
        rec["drawn"].append(mono())

    def tick():
        now = mono()
        rec["ticks"].append(now)
        s = state()
        if s != last[0]:
            last[0] = s
            rec["changes"].append(now)
            root.after_idle(drawn)
        if "t_end" not in rec:
            root.after(a.sample_ms, tick)

    def step_focus():
        root.focus_force()
        root.after(200, step_destination)

    def step_destination():
        names = list(app.dest_combo.cget("values"))
        if DEST not in names:
            fail(f"destination {DEST} not offered: {names}")
        app.dest_combo.current(names.index(DEST))
        app.dest_combo.event_generate("<<ComboboxSelected>>")
        if a.probe:
            root.after(300, step_probe)
            return
        root.after(200, step_folder)

    def step_probe():
        x0, y0 = app.progress.winfo_rootx(), app.progress.winfo_rooty()
        x1 = x0 + app.frame.winfo_width()
        y1 = app.file_label.winfo_rooty() + app.file_label.winfo_height()
        emit("READY", {"bbox": [x0, y0, x1, y1]})
        root.destroy()

    def step_folder():
        xdo("key", "--clearmodifiers", "alt+f")          # Alt+F: the study folder field
        root.after(200, step_type)

    def step_type():
        if root.focus_get() is not app.source_entry:
            fail(f"Alt+F did not reach the folder field (focus {root.focus_get()})")
        xdo("type", "--delay", "2", a.source)
        root.after(200, step_enter)

    def step_enter():
        if app.source_var.get() != a.source:
            fail(f"the folder field holds {app.source_var.get()!r}")
        xdo("key", "--clearmodifiers", "Return")          # Enter in the folder field: look at it now
        rec["t_scan"] = mono()
        root.after(50, wait_scan)

    def wait_scan():
        s = app.scan
        if app.scan_job is None and app._rescan_after is None and s is not None and s.source == a.source:
            if str(app.send_button.cget("state")) == "disabled":
                fail(f"Send is not possible: {app.summary.cget('text')}")
            rec["scan_s"] = mono() - rec["t_scan"]
            emit("READY", {"summary": str(app.summary.cget("text")), "scan_s": rec["scan_s"],
                           "files": s.total.files, "bytes": s.total.bytes})
            root.after(5, wait_go)
            return
        root.after(20, wait_scan)

    def wait_go():
        if not go.is_set():
            root.after(5, wait_go)
            return
        last[0] = state()
        t = os.times()
        rec["cpu0"] = (t.user, t.system)
        rec["t_press"] = mono()
        rec["xdotool"] = subprocess.Popen(["xdotool", "key", "--clearmodifiers", "alt+s"])   # Send
        tick()

    def ended():
        rec["t_end_drawn"] = mono()
        emit("END", {"t_end": rec["t_end"], "outcome": rec["outcome"]})
        root.after(200, wrap_up)

    def wrap_up():
        rec["xdotool"].wait()
        rec["xdotool"] = None
        rec["key_to_send_s"] = rec["t_job_start"] - rec["t_press"] if "t_job_start" in rec else None
        with open(a.result, "w") as f:
            json.dump(rec, f)
        app.destroy()

    root.after(100, step_focus)
    root.mainloop()
    return 0


def x11_grabber(display: str, x0: int, y0: int, x1: int, y1: int):
    """A function returning the pixels of that rectangle of the screen, over
    one Xlib connection kept open (ctypes).  Only the rectangle is fetched:
    Pillow's ImageGrab fetches the whole screen every time, which cost Xvfb
    ~15 ms of CPU per grab and so slowed whatever was being measured."""
    import ctypes

    class XImage(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int) for n in ("width", "height", "xoffset", "format")] + \
            [("data", ctypes.c_void_p)] + \
            [(n, ctypes.c_int) for n in ("byte_order", "bitmap_unit", "bitmap_bit_order", "bitmap_pad", "depth",
                                         "bytes_per_line", "bits_per_pixel")]
    x = ctypes.CDLL("libX11.so.6")
    x.XOpenDisplay.restype = ctypes.c_void_p
    x.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x.XDefaultRootWindow.restype = ctypes.c_ulong
    x.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
    x.XGetImage.restype = ctypes.POINTER(XImage)
    x.XGetImage.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                            ctypes.c_uint, ctypes.c_ulong, ctypes.c_int]
    x.XDestroyImage.argtypes = [ctypes.POINTER(XImage)]
    handler_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    x.XSetErrorHandler.argtypes = [handler_t]
    keep = handler_t(lambda d, e: 0)        # an X error makes XGetImage return NULL instead of exiting
    x.XSetErrorHandler(keep)
    dpy = x.XOpenDisplay(display.encode())
    if not dpy:
        raise OSError(f"cannot open display {display}")
    root = x.XDefaultRootWindow(dpy)

    def grab(_keep=keep) -> bytes:
        img = x.XGetImage(dpy, root, x0, y0, x1 - x0, y1 - y0, 0xFFFFFFFF, 2)   # AllPlanes, ZPixmap
        if not img:
            raise OSError("XGetImage failed")
        try:
            return ctypes.string_at(img.contents.data, img.contents.bytes_per_line * img.contents.height)
        finally:
            x.XDestroyImage(img)
    return grab


def screen(argv) -> int:
    """Grab --bbox of the screen --hz times a second until stdin closes;
    write the grab times and the times the pixels changed to --out."""
    ap = argparse.ArgumentParser(prog="gui_send.py _screen")
    ap.add_argument("--display", required=True)
    ap.add_argument("--bbox", required=True)
    ap.add_argument("--hz", type=float, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    grab = x11_grabber(a.display, *(int(x) for x in a.bbox.split(",")))
    bbox = a.bbox
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()
    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    grabs, changes, last, errors = [], [], None, []
    period = 1.0 / a.hz
    nxt = time.monotonic()
    while not stop.is_set():
        t = time.monotonic()
        try:
            img = grab()
        except OSError as e:        # counted, and the next grab tries again
            errors.append(f"{t:.3f}: {e}")
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))
            continue
        grabs.append(t)
        h = hash(img)
        if h != last:
            if last is not None:
                changes.append(t)
            last = h
        nxt += period
        stop.wait(max(0.0, nxt - time.monotonic()))
    c = os.times()
    with open(a.out, "w") as f:
        json.dump({"hz": a.hz, "bbox": bbox, "grabs": grabs, "changes": changes, "errors": errors,
                   "cpu_s": c.user + c.system}, f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_drive":
        sys.path.insert(0, HERE)
        sys.exit(drive(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_screen":
        sys.exit(screen(sys.argv[2:]))
    sys.path.insert(0, HERE)
    sys.exit(main())
