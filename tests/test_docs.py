"""The README's commands: CI runs its test line exactly as written, and its map of the package
names every module that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def test_the_development_map_names_every_module():
    text = _readme()
    tree = text[text.index("## Development") :]
    tree = tree[: tree.index("```", tree.index("```") + 3)]
    src = ROOT / "src" / "paws"
    for path in sorted(src.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        name = path.stem + ".py"
        assert name in tree, f"README's Development map does not mention {path.relative_to(src)}"
