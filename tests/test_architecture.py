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
OWNERS = {"blake3": "objects.py", "lmdb": "index.py", "yaml": "config.py", "watchdog": "watch.py",
          "paramiko": "transport.py", "sdnotify": "daemon.py"}

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


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
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
    assert "blake3" in imported_top_levels(LIB / "objects.py")
    assert "lmdb" in imported_top_levels(LIB / "index.py")
    assert "yaml" in imported_top_levels(LIB / "config.py")


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
    path = LIB / "layout.py"
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
