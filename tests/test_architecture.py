"""The layering rules of STYLE.md, checked on the source (AST), not by importing."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "eidetic"
CLI_PACKAGES = {"click", "eidetic_cli", "cli"}

# Each third-party library belongs to exactly one module.
OWNERS = {"blake3": "core/hashing.py", "lmdb": "store/index.py", "yaml": "core/yamlfile.py",
          "watchdog": "server/watch.py", "paramiko": "client/transport.py", "sdnotify": "server/daemon.py",
          "boto3": "replica/s3.py", "botocore": "replica/s3.py"}

# Which packages of the library each package may import: the arrows point
# one way, down.  core knows no store; store knows no server and no config;
# the client (a lab PC's uploader) knows only core; fsck checks stores.
MAY_IMPORT = {
    "core": {"core"},
    "store": {"core", "store"},
    "client": {"core", "client"},
    "fsck": {"core", "store", "fsck", "replica"},
    "server": {"core", "store", "server", "replica"},
    "replica": {"core", "store", "replica"},
}

# os functions that are pure string/number work (everything else on os does I/O).
PURE_OS = {"fsencode", "fsdecode", "sep", "altsep", "extsep", "curdir", "pardir", "fspath"}
PURE_OS_PATH = {"join", "split", "splitext", "basename", "dirname", "normpath", "isabs", "commonpath",
                "commonprefix"}
IO_MODULES = {"io", "pathlib", "shutil", "tempfile", "subprocess", "socket", "glob", "fcntl", "mmap",
              "sqlite3", "lmdb", "ctypes", "select", "signal", "threading", "multiprocessing", "builtins"}
IO_BUILTINS = {"open", "exec", "eval", "compile", "__import__", "input", "print"}


def modules() -> list[Path]:
    found = sorted(LIB.rglob("*.py"))
    assert found, "no library modules found"
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_top_levels(path: Path) -> set[str]:
    """Top-level names of every module *path* imports (anywhere, also inside
    functions); relative imports that stay inside ``eidetic`` come out as
    ``eidetic``, ones that climb out of it as the package they reach."""
    depth = len(path.relative_to(ROOT).parts) - 1       # eidetic/x.py -> 1
    out: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add((node.module or "").split(".")[0])
            elif node.level <= depth:
                out.add("eidetic")
            else:  # "from .. import cli" from eidetic/x.py reaches the repository root
                out.update([(node.module or "").split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Call) and _call_name(node) in ("importlib.import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.add(node.args[0].value.split(".")[0])
    return out


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def third_party(names: set[str]) -> set[str]:
    return {n for n in names if n and n not in sys.stdlib_module_names and n != "eidetic"}


def package_of(path: Path) -> str:
    """'core', 'store', ... for a module of the library; '' for eidetic/__init__.py."""
    parts = path.relative_to(LIB).parts
    return parts[0] if len(parts) > 1 else ""


def eidetic_imports(path: Path, lib: Path = LIB) -> set[str]:
    """Dotted names under ``eidetic`` that *path* imports (relative imports resolved),
    e.g. {'eidetic.core.layout', 'eidetic.store'}."""
    pkg_parts = ["eidetic", *path.relative_to(lib).parts[:-1]]   # '.' in an __init__ is its own package
    out: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "eidetic" or mod.startswith("eidetic."):
                if node.module is None or mod.count(".") < 2:   # "from .. import x": x may be a module
                    out.update(f"{mod}.{a.name}" for a in node.names)
                else:
                    out.add(mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("eidetic"))
    return out


def test_the_library_has_the_packages_of_the_architecture():
    found = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(MAY_IMPORT), found
    flat = sorted(p.name for p in LIB.glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside the packages: {flat}"


@pytest.mark.parametrize("path", [p for p in modules() if package_of(p)],
                         ids=lambda p: str(p.relative_to(LIB)))
def test_each_package_imports_only_the_layers_below_it(path):
    pkg = package_of(path)
    reached = set()
    for name in eidetic_imports(path):
        parts = name.split(".")
        if len(parts) >= 2 and parts[1] in MAY_IMPORT:
            reached.add(parts[1])
        elif name != "eidetic.__version__":
            reached.add(name)
    assert reached <= MAY_IMPORT[pkg], f"{path.relative_to(LIB)} imports {sorted(reached - MAY_IMPORT[pkg])}"


def test_the_layer_check_sees_a_wrong_arrow(tmp_path):
    (tmp_path / "store").mkdir()
    bad = tmp_path / "store" / "probe.py"
    bad.write_text("from ..server.config import Config\nfrom ..core import layout\nfrom . import tree\n")
    assert eidetic_imports(bad, tmp_path) == {"eidetic.server.config", "eidetic.core.layout", "eidetic.store.tree"}


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(LIB)))
def test_the_library_never_imports_the_cli_or_click(path):
    assert not imported_top_levels(path) & CLI_PACKAGES


def test_nothing_in_the_library_reaches_into_cli_by_path():
    for path in modules():
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith(("eidetic_cli", "cli.")), (path.name, node.value)


def test_each_third_party_library_is_imported_by_one_module():
    users: dict[str, set[str]] = {}
    for path in modules():
        for name in third_party(imported_top_levels(path)):
            users.setdefault(name, set()).add(str(path.relative_to(LIB)))
    for name, who in users.items():
        assert len(who) == 1, f"{name} is imported by {sorted(who)}"
    for name, owner in OWNERS.items():
        if (LIB / owner).exists() or name in users:
            assert users.get(name) == {owner}, f"{name} must be imported by {owner} only, not {users.get(name)}"


def test_the_known_libraries_are_where_style_md_puts_them():
    for name, owner in OWNERS.items():
        assert name in imported_top_levels(LIB / owner), (name, owner)


def test_cli_imports_the_library_not_the_other_way_round():
    cli = ROOT / "cli"
    uses_library = any("eidetic" in imported_top_levels(p) for p in cli.rglob("*.py"))
    assert uses_library


def io_findings(tree: ast.Module) -> list[str]:
    """Every call or name in *tree* that can do I/O."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in IO_BUILTINS:
                found.append(f"calls {name}() at line {node.lineno}")
            elif name.startswith("os.path.") and name.split(".")[2] not in PURE_OS_PATH:
                found.append(f"calls {name}() at line {node.lineno}")
            elif name.startswith("os.") and not name.startswith("os.path.") and name.split(".")[1] not in PURE_OS:
                found.append(f"calls {name}() at line {node.lineno}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr not in PURE_OS | {"path"}:
            found.append(f"uses os.{node.attr} at line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id in IO_BUILTINS:
            found.append(f"refers to {node.id} at line {node.lineno}")
    return found


LAYOUT_MAY_IMPORT = {"__future__", "re", "datetime", "hashlib", "typing", "dataclasses", "struct", "string",
                     "base64", "binascii", "enum", "functools", "itertools", "os"}


def test_layout_does_not_touch_the_file_system():
    path = LIB / "core" / "layout.py"
    imports = imported_top_levels(path)
    assert not imports & IO_MODULES, imports & IO_MODULES
    assert imports <= LAYOUT_MAY_IMPORT, imports - LAYOUT_MAY_IMPORT
    assert io_findings(parse(path)) == []


@pytest.mark.parametrize("source", [
    "import os\ndef f(p):\n    return os.stat(p)\n",
    "def f(p):\n    return open(p).read()\n",
    "import os\ndef f(p):\n    return os.path.exists(p)\n",
    "import os\nlisting = os.listdir\n",
    "def f(p, opener=open):\n    return opener(p)\n",
])
def test_the_io_check_catches_file_system_access(source):
    assert io_findings(ast.parse(source))


def test_the_io_check_allows_pure_path_arithmetic():
    assert io_findings(ast.parse("import os\nx = os.path.join(os.fsencode('a'), b'b')\n")) == []
