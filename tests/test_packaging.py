"""The wheel holds every subpackage: pyproject's explicit ``packages`` list against the folders.

A subpackage left off the list still imports from a checkout or an editable install,
so only a built wheel (``pip install .``) would miss it; this catches it without a build.
"""

from __future__ import annotations

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    cfg = _config()
    dirs = {name: ROOT / path for name, path in cfg["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    assert found == set(cfg["packages"]), f"pyproject packages {sorted(cfg['packages'])}, folders {sorted(found)}"


def test_package_data_exists():
    for pkg, files in _config().get("package-data", {}).items():
        top, _, rest = pkg.partition(".")
        folder = ROOT / _config()["package-dir"][top] / rest.replace(".", "/")
        for f in files:
            assert (folder / f).is_file(), f"package-data {pkg}: {f} missing under {folder}"
