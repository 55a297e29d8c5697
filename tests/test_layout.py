"""The package's layout rules (docs/architecture.md): no paper imports another, a module's imports
of the package sit at its top, and every command line runs under its module path."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "t2i_common"
PAPERS = ("implosion", "attribution", "unclip", "diffusion_itm", "info_decomp")
#: function-level imports of the package's own modules that are allowed, with the reason
LOCAL_IMPORTS = {("runner.py", "distributed"): "distributed imports torch; the runner's import stays without it"}


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return parts[:-1]                       # the package the module lives in


def _imported(path: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute dotted names an ``ImportFrom`` of the package refers to (module + each name)."""
    if node.level:
        base = _package_of(path)[:len(_package_of(path)) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" for a in node.names] if mod.startswith("t2i_common") else []


def _paper(dotted: str):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PAPERS else None


def test_every_paper_has_a_subpackage():
    for paper in PAPERS:
        assert (PKG / paper / "__init__.py").is_file(), paper


def test_no_paper_imports_another_paper():
    bad = []
    for path in _modules():
        own = _paper(".".join(_package_of(path) + ["x"]))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for name in _imported(path, node):
                    other = _paper(name)
                    if other and other != own:
                        bad.append(f"{path.relative_to(PKG)}:{node.lineno} imports {name}")
    assert not bad, "a paper imports another paper (move the shared piece to the shared layer):\n" + \
        "\n".join(bad)


def test_shared_layer_imports_no_paper():
    bad = []
    for path in _modules():
        if _paper(".".join(_package_of(path) + ["x"])):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                bad += [f"{path.relative_to(PKG)}:{node.lineno} imports {n}"
                        for n in _imported(path, node) if _paper(n)]
    assert not bad, "\n".join(bad)


def test_package_imports_sit_at_the_module_top():
    found = set()
    for path in _modules():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and _imported(path, node):
                    mod = (node.module or "").rpartition(".")[2] if node.level else node.module
                    found.add((str(path.relative_to(PKG)), mod, node.lineno))
    unexpected = sorted(f for f in found if f[:2] not in LOCAL_IMPORTS)
    assert not unexpected, f"function-level imports of the package (move them to the top): {unexpected}"
    assert {f[:2] for f in found} == set(LOCAL_IMPORTS), "a listed local import is gone: update LOCAL_IMPORTS"


@pytest.mark.parametrize("module", ["t2i_common.attribution", "t2i_common.implosion.alignment",
                                    "t2i_common.toyworld.training", "t2i_common.unclip.training",
                                    "t2i_common.runner"])
def test_command_lines_run_under_their_module_path(module):
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                       capture_output=True, text=True, cwd=PKG.parent, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
