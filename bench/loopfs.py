"""A file system of its own for a benchmark: a sparse image under the work
directory, made with mkfs, loop-mounted, and unmounted and removed after.

Why: the measurement then starts on a file system with nothing deleted in
it.  On ext4 *without a journal* (the root file system of these benchmark
machines: /sys/fs/ext4/<dev>/journal_task says "<none>"), creating a file
walks past every inode freed in the last minute (six while its
inode-table block is not yet written: ext4's recently_deleted(), seen with perf as 55 % of an ingest's samples), so a
run that follows a mass delete creates files 10-30x slower.  A journaled
ext4, as on every production server, never makes that check.
"""

from __future__ import annotations

import os
import shutil
import subprocess

MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],   # reflink: XFS clones (zero-copy ingest)
        "ext4": ["mkfs.ext4", "-q", "-F"]}                       # mkfs.ext4's defaults: with its journal
PACKAGE = {"xfs": "xfsprogs", "ext4": "e2fsprogs"}


def prepare(fs: str, label: str, eidetic: str | None, work: str, gib: int, need_gib: int) -> tuple | None:
    """Everything a variant needs before its runs: (image, mount point), or
    None after one "<label> variant skipped: <why>" line (not root, no
    tools, no *eidetic* executable, less than *need_gib* free under *work*
    for what the runs write below the sparse image: a loop file system whose
    file cannot grow aborts its journal, or no mount)."""
    reason = why_not(fs)
    if reason is None and not eidetic:
        reason = "no eidetic executable (--eidetic PATH)"
    if reason is None:
        os.makedirs(work, exist_ok=True)
        st = os.statvfs(work)
        free = st.f_bavail * st.f_frsize >> 30
        if free < need_gib:
            reason = f"it needs about {need_gib} GiB free under {work}, which has {free} GiB"
    if reason is None:
        try:
            return make(fs, work, gib)
        except RuntimeError as e:
            reason = str(e)
        except subprocess.CalledProcessError as e:
            reason = e.stderr.decode(errors="replace").strip()
    print(f"{label} variant skipped: {reason}")
    return None


def why_not(fs: str) -> str | None:
    """Why a loop image of *fs* cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root (mounting a loop image needs root)"
    for tool in (MKFS[fs][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {PACKAGE[fs]})"
    return None


def make(fs: str, work: str, gib: int) -> tuple[str, str]:
    """A sparse image of *gib* GiB under *work* with a new *fs*, mounted; (image, mount point).
    Raises RuntimeError or CalledProcessError where it cannot be (nothing is left behind)."""
    img, mnt = os.path.join(work, f"{fs}.img"), os.path.join(work, f"{fs}-mnt")
    os.makedirs(mnt, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(gib << 30)
    try:
        subprocess.run([*MKFS[fs], img], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", img, mnt], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot mount a loop image here: {r.stderr.strip()}")
    except BaseException:
        os.unlink(img)
        raise
    return img, mnt


def remove(img: str, mnt: str) -> None:
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    try:
        os.unlink(img)
    except FileNotFoundError:
        pass


def journal_of(path: str) -> str | None:
    """For a path on ext4: whether its file system has a journal ("yes"/"no"), else None.
    The device comes from the path's st_dev (/sys/dev/block), so no mount table is parsed."""
    try:
        dev = os.stat(path).st_dev
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
        with open(f"/sys/fs/ext4/{name}/journal_task") as f:     # only an ext4 is there
            return "no" if f.read().strip() == "<none>" else "yes"
    except OSError:
        return None
