"""The import rules of docs/design.md, read from its table and checked on the source of every module."""

import ast
import re
from pathlib import Path

import pytest

import sclref

ROOT = Path(sclref.__file__).parent
DESIGN = ROOT.parent / "docs" / "design.md"


def rules() -> list[tuple[list[str], set[str] | None]]:
    """(path patterns, allowed sclref modules or None for everything) per row of the design's import table."""
    text = DESIGN.read_text()
    table = text[text.index("| module | may import of sclref |"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        patterns = re.findall(r"`([^`]+)`", cells[0])
        allowed = None if cells[1] == "everything" else set(re.findall(r"`([^`]+)`", cells[1]))
        rows.append((patterns, allowed))
    return rows


RULES = rules()


def row_of(rel: str):
    """The first row whose pattern matches module `rel` (a path under sclref/), or None."""
    for patterns, allowed in RULES:
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in patterns):
            return patterns, allowed
    return None


def imports_of(path: Path) -> set[str]:
    names = set()
    package = ".".join(("sclref",) + path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(rel: str, found: set[str]) -> list[str]:
    """The imports in `found` that module `rel` (path under sclref/) may not make."""
    bad = []
    if not rel.startswith("kernels/"):
        bad += [n for n in found if n == "numba" or n.startswith("numba.")]
    _, allowed = row_of(rel)
    if allowed is None:
        return bad
    own = rel.split("/")[0] if "/" in rel else None
    for name in found:
        parts = name.split(".")
        if parts[0] != "sclref" or len(parts) == 1:
            continue
        if parts[1] not in allowed and parts[1] != own:
            bad.append(name)
    return sorted(set(bad))


MODULES = sorted(ROOT.rglob("*.py"))


def test_the_table_is_read():
    assert len(RULES) > 10 and row_of("kernels/conv.py") == (["kernels/"], set())
    assert row_of("sparse/network.py")[0] == ["sparse/network.py"]  # the first matching row wins
    assert row_of("sparse/format.py")[0] == ["sparse/"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_has_a_row_and_respects_it(path):
    rel = str(path.relative_to(ROOT))
    assert row_of(rel) is not None, f"{rel} is in no row of the import table of docs/design.md"
    assert not violations(rel, imports_of(path)), f"{rel} imports what docs/design.md does not allow"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_states_its_job(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(ROOT)} has no module docstring"


def test_the_checker_sees_violations():
    layers = imports_of(ROOT / "nn" / "layers.py")
    assert "sclref.ops" in layers  # the parser reads real imports
    assert violations("nn/layers.py", layers | {"sclref.kernels.conv2d_fwd"}) == ["sclref.kernels.conv2d_fwd"]
    assert violations("ops.py", {"numba"}) == ["numba"]
    assert violations("kernels/conv.py", {"numba", "sclref.kernels._jit"}) == []
    assert violations("sparse/format.py", {"sclref.sparse.network", "sclref.train"}) == ["sclref.train"]
    assert violations("cli.py", {"sclref.kernels", "sclref.train"}) == []
