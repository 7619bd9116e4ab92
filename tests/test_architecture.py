"""The packages import each other in one direction only.

    configs <- tryon_data <- i2am <- models <- losses <- train <- tryon_eval <- apps

A package may import the ones to its left, never those to its right; imports inside
functions count too (they are cycles all the same, only hidden). Parsed from the
source with `ast`, so the test needs no package to import cleanly.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["common", "configs", "tryon_data", "i2am", "models", "losses", "train", "tryon_eval", "apps"]
# `python -m i2am` forwards to the CLI application; it is an entry point, not library code.
EXEMPT = {Path("i2am/__main__.py")}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in ORDER}
    return found


def violations() -> list[str]:
    bad = []
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel in EXEMPT:
                continue
            for target in project_imports(path):
                if ORDER.index(target) > ORDER.index(package):
                    bad.append(f"{rel} imports {target} ({package} may only import {ORDER[:ORDER.index(package)]})")
    return bad


def test_every_package_is_in_the_order():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == set(ORDER)


def test_imports_point_one_way():
    assert violations() == []


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    # The test must be able to fail: a library module that imports an application
    # inside a function is a violation.
    (tmp_path / "i2am").mkdir()
    (tmp_path / "i2am" / "x.py").write_text("def f():\n    from apps.cli import main\n    import train.trainer\n")
    assert project_imports(tmp_path / "i2am" / "x.py") == {"apps", "train"}
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(violations()) == 2


@pytest.mark.parametrize("module", ["losses.stability", "i2am"])
def test_library_and_loss_load_without_matplotlib(module):
    # Loading the stability loss (or the monitor library) must not pull in the plotting stack.
    code = f"import sys, {module}; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
