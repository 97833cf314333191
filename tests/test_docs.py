"""The README's commands and map: CI runs its test line exactly as written, and its map of the
package is the package: every module named in its part, none that does not exist, and each part
importing only the parts drawn below it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "paws"


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_line():
    text = _readme()
    start = text.index("Run the tests")
    block = re.search(r"```bash\n(.+?)\n```", text[start:], re.S)
    assert block is not None
    line = block.group(1).strip()
    assert "pytest" in line and "pip install" in line  # installs what the tests need first
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert line in [c.strip() for c in ci]


def _map() -> list[tuple[str, list[str]]]:
    """The Development map's parts, top first: ``(part, modules)``, a part being a package
    (``"apply"``) or a top-level module (``"files"``)."""
    text = _readme()
    tree = text[text.index("## Development") :]
    tree = tree[tree.index("```") + 3 :]
    tree = tree[: tree.index("```")]
    parts: list[tuple[str, list[str]]] = []
    for line in tree.splitlines():
        head = re.match(r"  (\w+)(/|\.py)\s", line + " ")
        if head:  # a part starts at the map's first indentation
            modules = [] if head.group(2) == "/" else [head.group(1)]
            parts.append((head.group(1), modules))
            line = line[head.end() :]
        elif not line.startswith("   ") or not parts:
            continue
        if parts[-1][1] != [parts[-1][0]]:  # a package: the modules it names
            parts[-1][1].extend(re.findall(r"\b(\w+)\.py\b", line))
    return parts


def _modules() -> dict[str, set[str]]:
    """The package as it is: part -> module names (``__init__`` and ``__main__`` aside)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.name in ("__init__.py", "__main__.py"):
            if len(rel.parts) > 1:
                found.setdefault(rel.parts[0], set())
            continue
        part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        found.setdefault(part, set()).add(rel.stem)
    return found


def test_the_development_map_is_the_package():
    drawn = {part: set(modules) for part, modules in _map()}
    assert drawn == _modules(), "README's Development map and src/paws/ differ"


def _imported_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paws"):
            if node.module == "paws":
                names |= {f"paws.{a.name}" for a in node.names}
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("paws.")}
    return {n.split(".")[1] for n in names if n.count(".") >= 1 and n != "paws"}


def test_each_part_imports_only_the_parts_drawn_below_it():
    order = [part for part, _ in _map()]
    level = {part: len(order) - i for i, part in enumerate(order)}  # the bottom part is 1
    upward = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if len(rel.parts) == 1 and rel.stem in ("__init__", "__main__"):
            continue  # paws.load and python -m paws: the top, above every part
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for other in _imported_parts(path) - {me}:
            if level.get(other, 0) >= level[me]:
                upward.append(f"{rel} imports paws.{other}")
    assert not upward, upward


def _owner(f: ast.AST) -> str:
    """``torch`` for ``torch.save``, ``""`` for a bare name."""
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f.value.id
    return ""


def _writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that write a file directly: ``open(..., "w"/"wb"/"x")``, ``Path.write_text`` /
    ``write_bytes``, and ``torch.save`` / ``np.save`` / ``savefig`` given anything but the
    file object ``f`` (or ``buf``) that :func:`paws.files.write_with` hands them."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in ("write_text", "write_bytes"):
            found.append((node.lineno, name))
        elif name == "open" and len(node.args) > 1:
            mode = node.args[1]
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wxa"):
                found.append((node.lineno, f"open(..., {mode.value!r})"))
        elif name in ("save", "savefig") and _owner(f) in ("torch", "np", "fig", "plt"):
            into = [a for a in node.args[:2] if isinstance(a, ast.Name) and a.id in ("f", "buf")]
            if not into:
                found.append((node.lineno, f"{_owner(f)}.{name}"))
    return found


def test_every_file_is_written_through_write_with():
    """The README's promise: every file paws writes whole goes through paws.files.write_with
    (temporary file, fsync, rename); only the metric logs append rows (rundir/layout.py), and
    write_with itself writes a device in place."""
    allowed = {
        ("files.py", "open(..., 'wb')"),
        ("layout.py", "open(..., 'w')"),
        ("layout.py", "open(..., 'a')"),
    }
    direct = []
    for path in SRC.rglob("*.py"):
        for line, what in _writes(ast.parse(path.read_text())):
            if (path.name, what) not in allowed:
                direct.append(f"{path.relative_to(SRC)}:{line} {what}")
    assert not direct, direct
