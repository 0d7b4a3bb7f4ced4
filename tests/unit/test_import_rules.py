"""The two packages' one import rule: the operator never imports torch, the worker never kopf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_roots(package_dir: Path) -> set[str]:
    roots: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    ("package_dir", "forbidden"),
    [
        (ROOT / "operator" / "llmos_operator", {"torch", "transformers", "llmos_worker"}),
        (ROOT / "worker" / "llmos_worker", {"kopf", "kubernetes", "llmos_operator"}),
    ],
)
def test_package_does_not_import(package_dir: Path, forbidden: set[str]) -> None:
    assert package_dir.is_dir()
    assert imported_roots(package_dir) & forbidden == set()


def test_no_operator_init_shadowing_stdlib() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
