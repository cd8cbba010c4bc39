"""The import rules of docs/design.md, checked on the source of every module."""

import ast
from pathlib import Path

import pytest

import sclref

ROOT = Path(sclref.__file__).parent

# module path prefix -> sclref modules it must not import
FORBIDDEN = {
    "autograd.py": ["sclref.kernels", "sclref.nn", "sclref.optim"],
    "ops.py": ["sclref.nn", "sclref.optim"],
    "nn/": ["sclref.kernels"],
    "optim.py": ["sclref.ops", "sclref.autograd"],
    "testing/": ["sclref.kernels"],
    "oracle/": ["sclref.kernels", "sclref.train", "sclref.cli"],
    "oracle_cli.py": ["sclref.kernels"],
    "ste.py": ["sclref.ops", "sclref.kernels", "sclref.nn"],
    "scl.py": ["sclref.ops", "sclref.kernels"],
    "data/": ["sclref.autograd", "sclref.ops", "sclref.kernels", "sclref.nn"],
    "io.py": ["sclref.autograd", "sclref.ops", "sclref.kernels", "sclref.nn"],
    "train.py": ["sclref.kernels"],
    "kernels/": ["sclref.autograd", "sclref.ops", "sclref.nn", "sclref.optim", "sclref.testing"],
    "theory/": ["sclref.kernels", "sclref.ops", "sclref.train", "sclref.cli"],
    "sparse/": ["sclref.autograd", "sclref.ops", "sclref.optim", "sclref.cli"],
    "pruning.py": ["sclref.kernels", "sclref.ops", "sclref.cli", "sclref.train"],
    "reproduce.py": ["sclref.kernels", "sclref.ops", "sclref.cli"],
}


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
    for prefix, banned in FORBIDDEN.items():
        if rel.startswith(prefix):
            bad += [n for n in found for b in banned if n == b or n.startswith(b + ".")]
    return bad


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_the_import_rules(path):
    rel = str(path.relative_to(ROOT))
    assert not violations(rel, imports_of(path)), f"{rel} breaks the import rules"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_states_its_job(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(ROOT)} has no module docstring"


def test_the_checker_sees_violations():
    layers = imports_of(ROOT / "nn" / "layers.py")
    assert "sclref.ops" in layers  # the parser reads real imports
    assert violations("nn/layers.py", layers | {"sclref.kernels.conv2d_fwd"}) == ["sclref.kernels.conv2d_fwd"]
    assert violations("ops.py", {"numba"}) == ["numba"]
    assert violations("kernels/conv.py", {"numba"}) == []
