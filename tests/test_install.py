"""The install is reproducible: every dependency pyproject.toml names (extras included) is pinned in
constraints.txt, which `make` installs with, and make's venv holds exactly those pins. A
dependency added without a pin, or a pin moved without reinstalling, fails here rather than in a later CI run
that picked up a new release."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")


def declared() -> set[str]:
    """The canonical names of pyproject.toml's dependencies and of every extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(Requirement(line).name) for line in lines}


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}; any line that is not `name==version` is an error."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(match[1])
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = match[2]
    return out


def test_every_dependency_is_pinned_exactly():
    missing = declared() - set(pins())
    assert not missing, f"pyproject.toml names {sorted(missing)}, constraints.txt does not pin them: add name==version"


def test_the_venv_holds_the_pinned_versions():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():  # README: "Install into your own environment"
        pytest.skip("not make's .venv: an environment of your own keeps the versions you installed")
    wrong = {}
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != version.split("+")[0]:
            wrong[name] = (version, installed)
    assert not wrong, f"pinned vs installed: {wrong}; run `make install` (the stamp follows constraints.txt)"
