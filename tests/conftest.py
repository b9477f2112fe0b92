"""Shared fixtures and helpers for eidetic's end-to-end tests.

* ``layout`` - a fresh, initialised configuration in ``tmp_path``: a shared
  inbox and two studies ``s1`` and ``s2`` (``make_layout`` builds variants).
* ``drop(inbox, name, files)`` - uploads an entry the way a client does:
  everything is written under ``.name`` and renamed to ``name`` at the end.
* ``run_cli(...)`` - the ``eidetic`` console script as a real subprocess.
* ``check_store(layout, study)`` - an independent consistency audit of a
  store and its tree (objects re-hashed, manifest chain, HEAD, index, tree
  inodes), plus ``eidetic fsck``.
* ``nonroot_venv`` / ``world_tmp`` / ``run_as`` - for tests that must run as
  uids other than root (root reads everything, so permission tests need
  real unprivileged processes).  docs/design.md, "Test peers": a venv built from a Python under
  root's home cannot be run by other uids, so a session-scoped fixture builds
  one from the system python in a world-readable place.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

import eidetic.server.config
import eidetic.server.deploy
import eidetic.store.index
from eidetic.core import layout as L

# The S3 peer's fixtures (tests/s3_peer.py) for every module: moto keeps its
# state in module globals, so there must be ONE session-scoped server; a test
# module that imported the fixtures itself would define and start a second.
pytest_plugins = ("s3_peer",)

# One hypothesis profile for every property test: derandomized (a CI run
# tries the same examples as the run before it), no deadline (CI machines
# are slow and shared); tests that need fewer examples say so themselves.
settings.register_profile("eidetic", derandomize=True, deadline=None, max_examples=300)
settings.load_profile("eidetic")

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
DAEMON_UID = 61001          # throwaway uids: no /etc/passwd entry is needed
UPLOADER_UID = 61002


def fs(p) -> bytes:
    """Any path-like (str, bytes, Path) as bytes."""
    return os.fsencode(p)


# ------------------------------------------------------------------ layout

@dataclass
class Layout:
    root: Path
    config_path: Path
    cfg: eidetic.server.config.Config

    @property
    def inbox(self) -> Path:
        assert self.cfg.inbox is not None
        return Path(self.cfg.inbox)

    @property
    def state(self) -> Path:
        return Path(self.cfg.state)

    def study_inbox(self, study: str) -> Path:
        inbox = self.cfg.study(study).inbox
        assert inbox is not None
        return Path(inbox)

    def tree(self, study: str = "s1") -> Path:
        return Path(self.cfg.study(study).tree)

    def store(self, study: str = "s1") -> Path:
        return Path(self.cfg.study(study).store)

    def open_store(self, study: str = "s1"):
        from eidetic.store.store import Store
        return Store.open(*self.cfg.study(study).store_args())

    def ingest(self, study: str | None = None, settle_seconds: float | None = 0, **kw):
        from eidetic.server.ingest import Ingester
        return Ingester(self.cfg, **kw).run_once(study=study, settle_seconds=settle_seconds)

    def cli(self, *args, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, config=self.config_path, **kw)

    def records(self, kind: str) -> list[dict]:
        d = self.state / kind
        return [json.loads((d / n).read_bytes()) for n in sorted(os.listdir(d)) if n.endswith(".json")]

    def manifests(self, study: str = "s1") -> list[Path]:
        d = self.store(study) / "manifests"
        return sorted(d / n for n in os.listdir(d) if L.parse_manifest_name(n) is not None)

    def object_files(self, study: str = "s1") -> list[Path]:
        out = []
        for dirpath, _dirs, files in os.walk(self.store(study) / "objects"):
            out.extend(Path(dirpath) / f for f in files)
        return sorted(out)


def make_layout(root: Path, studies: Iterable[str] = ("s1", "s2"), own_inbox: Iterable[str] = (),
                shared_inbox: bool = True, settle_seconds: float = 0, init: bool = True) -> Layout:
    """Write a config file under *root*, parse it and (by default) ``init`` it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    own = set(own_inbox)
    doc: dict = {"state": str(root / "state"), "settle_seconds": settle_seconds, "studies": {}}
    if shared_inbox:
        doc["inbox"] = str(root / "inbox")
    for s in studies:
        body = {"tree": str(root / "trees" / s), "store": str(root / "stores" / s)}
        if s in own:
            body["inbox"] = str(root / f"inbox-{s}")
        doc["studies"][s] = body
    config_path = root / "eidetic.yaml"
    config_path.write_text(json.dumps(doc, indent=1) + "\n")   # JSON is YAML
    cfg = eidetic.server.config.load(str(config_path))
    if init:
        eidetic.server.deploy.init(cfg)
    return Layout(root, config_path, cfg)


@pytest.fixture
def layout(tmp_path) -> Layout:
    return make_layout(tmp_path)


@pytest.fixture(autouse=True)
def _close_lmdb_environments():
    """The library keeps one LMDB environment per index for the life of the
    process (each maps 1 TiB of address space): close them after each test so
    a long session does not run out of address space or file descriptors."""
    yield
    close_indexes()


def close_indexes() -> None:
    with eidetic.store.index._envs_lock:
        envs = list(eidetic.store.index._envs.values())
        eidetic.store.index._envs.clear()
    for env in envs:
        env.close()


# -------------------------------------------------------------------- drop

def drop(inbox, name, files: dict, prepare: Callable[[bytes], None] | None = None,
         mtime_ns: int | None = None) -> bytes:
    """Upload an entry like a client: write everything under ``.<name>``,
    then rename it to *name*.  *files* maps relative paths (bytes or str,
    '/'-separated) to contents; *prepare(partial_dir)* may add links, FIFOs
    etc. before the final rename.  Returns the entry's final path (bytes)."""
    inbox_b = fs(inbox)
    name_b = fs(name)
    partial = inbox_b + b"/." + name_b
    os.mkdir(partial)
    for rel, data in files.items():
        p = partial + b"/" + fs(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        if mtime_ns is not None:
            os.utime(p, ns=(mtime_ns, mtime_ns))
    if prepare is not None:
        prepare(partial)
    final = inbox_b + b"/" + name_b
    os.rename(partial, final)
    return final


# --------------------------------------------------------------------- CLI

def eidetic_argv(python: str | None = None) -> list[str]:
    if python is None:
        script = Path(sys.executable).parent / "eidetic"
        if script.exists():
            return [str(script)]
        python = sys.executable
    return [python, "-m", "eidetic_cli.main"]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EIDETIC_") and k not in ("XDG_DATA_HOME",)}
    env.setdefault("LC_ALL", "C.UTF-8")
    env.update(extra)
    return env


def run_cli(*args, config=None, env: dict | None = None, timeout: float = 120, cwd=None,
            argv0: list[str] | None = None, prefix: list[str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``eidetic [--config FILE] ARGS...`` as a subprocess.  stdout and
    stderr come back as str (undecodable bytes as surrogate escapes)."""
    argv = list(prefix or []) + list(argv0 or eidetic_argv())
    if config is not None:
        argv += ["--config", os.fsdecode(fs(config))]
    argv += [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(argv, capture_output=True, text=True, errors="surrogateescape",
                          env=env if env is not None else clean_env(), timeout=timeout,
                          cwd=cwd, input=input)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command; asserts there is no traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


# ---------------------------------------------------------- consistency

def tree_files(tree) -> dict[bytes, bytes]:
    """Every regular file in a tree (relative bytes path -> content)."""
    out = {}
    root = fs(tree)
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = dirpath + b"/" + f
            out[p[len(root) + 1:]] = Path(os.fsdecode(p)).read_bytes()
    return out


def plain_files(tree) -> dict[bytes, bytes]:
    """The plain (latest) names of a tree only, version names left out."""
    return {k: v for k, v in tree_files(tree).items() if not L.is_version_name(k.rpartition(b"/")[2])}


def check_store(lay: Layout, study: str = "s1") -> None:
    """Audit a store and its tree independently of ``ingest``:

    objects hash to their names and are read-only; manifests 1..N exist, each
    names the BLAKE3 of the previous one, HEAD names the last; the index has
    applied them all; every version has its version name in the tree, a
    hardlink of its object, and every plain name is the latest version;
    tmp/ is empty.  Then ``eidetic fsck``."""
    from eidetic.store.manifest import FileRecord, read_all
    from eidetic.core.hashing import hash_bytes

    store_dir = lay.store(study)
    tree_dir = fs(lay.tree(study))
    assert os.listdir(store_dir / "tmp") == [], "tmp/ not empty after a finished run"
    objects: dict[str, os.stat_result] = {}
    for p in lay.object_files(study):
        oid = p.parent.name + p.name
        assert L.valid_object_id(oid), p
        assert hash_bytes(p.read_bytes()) == oid, f"object {p} does not hash to its name"
        st = p.lstat()
        assert stat.S_IMODE(st.st_mode) & 0o222 == 0, f"object {p} is writable"
        objects[oid] = st
    manifests = lay.manifests(study)
    assert [L.parse_manifest_name(p.name) for p in manifests] == list(range(1, len(manifests) + 1))
    prev = None
    uploads = set()
    for p in manifests:
        header, recs, info = read_all(p)
        assert header.prev == prev, f"manifest {p.name}: chain broken"
        assert header.upload not in uploads, f"upload {header.upload} committed twice"
        uploads.add(header.upload)
        for r in recs:
            if isinstance(r, FileRecord):
                assert r.blake3 in objects, f"{p.name}: object {r.blake3} missing"
        prev = info.digest
    head = (store_dir / "HEAD").read_text().split() if (store_dir / "HEAD").exists() else ["0", "None"]
    assert int(head[0]) == len(manifests)
    if manifests:
        assert head[1] == prev
    st = lay.open_store(study)
    assert st.index.applied()[0] == len(manifests)
    paths: dict[bytes, list] = {}
    for v in st.index.iter_versions(b""):
        paths.setdefault(v.path, []).append(v)
    for path, versions in paths.items():
        assert [v.n for v in versions] == list(range(1, len(versions) + 1))
        for a, b in zip(versions, versions[1:]):
            assert a.blake3 != b.blake3, f"{path!r}: two consecutive versions with the same content"
        for v in versions:
            vst = os.lstat(tree_dir + b"/" + L.version_relpath(v.path, v.n, v.stamp))
            ost = objects[v.blake3]
            assert (vst.st_dev, vst.st_ino) == (ost.st_dev, ost.st_ino), f"{path!r} v{v.n}"
        pst = os.lstat(tree_dir + b"/" + L.tree_relpath(path))
        if not stat.S_ISDIR(pst.st_mode):
            ost = objects[versions[-1].blake3]
            assert (pst.st_dev, pst.st_ino) == (ost.st_dev, ost.st_ino), f"{path!r}: plain name not latest"
    assert fsck_errors(lay, study) == []


def fsck_errors(lay: Layout, study: str = "s1") -> list:
    """Error findings of eidetic.fsck.check."""
    from eidetic import fsck
    findings = fsck.check(lay.open_store(study))
    return [(f.code, str(f)) for f in findings if f.severity == "error"]


# ---------------------------------------------------------- other uids

def run_as(uid: int, argv: list, **kw) -> subprocess.CompletedProcess:
    """Run *argv* as *uid*:*uid* with no supplementary groups."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("errors", "surrogateescape")
    kw.setdefault("timeout", 120)
    kw.setdefault("env", clean_env(HOME="/nonexistent", PATH="/usr/bin:/bin"))
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv], **kw)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run processes as throwaway uids")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")


@pytest.fixture(scope="session")
def nonroot_venv(tmp_path_factory) -> Path:
    """A venv other uids can run: the system python, eidetic installed from
    this working tree (copied first so the build leaves nothing behind)."""
    _need_root()
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing: cannot build a venv other uids can run")
    base = Path(tempfile.mkdtemp(prefix="eidetic-test-venv-", dir="/tmp"))
    try:
        src = base / "src"
        src.mkdir()
        for item in ("pyproject.toml", "README.md", "LICENSE", "eidetic", "cli"):
            p = REPO / item
            if p.is_dir():
                shutil.copytree(p, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif p.exists():
                shutil.copy2(p, src / item)
        venv = base / "venv"
        try:
            subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True,
                           timeout=120)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                            f"{src}[server]"], check=True, capture_output=True, timeout=240, cwd=str(base))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            out = getattr(e, "stderr", b"") or b""
            pytest.skip("could not build a venv from the system python for the other-uid tests: "
                        + out.decode(errors="replace")[-300:])
        for dirpath, dirs, files in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)
        os.chmod(base, 0o755)
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def world_tmp():
    """A directory any uid can traverse (pytest's tmp_path is root-only)."""
    _need_root()
    d = Path(tempfile.mkdtemp(prefix="eidetic-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def chown_tree(path, uid: int) -> None:
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(path)], check=True)
