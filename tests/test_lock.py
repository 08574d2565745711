"""The install is the committed lock, and the pyproject ranges admit it (README "Install")."""

from __future__ import annotations

import importlib.util
import os
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

LOCK = ROOT / "requirements" / "lock.txt"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "requirements" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_parser_normalises_names_and_rejects_loose_lines(tmp_path):
    check = _check_lock()
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nPyYAML==6.0.2\nzope.interface==7.1  # trailing\npsycopg[binary]==3.3.9\n")
    assert check.read_lock(lock) == {"pyyaml": "6.0.2", "zope-interface": "7.1", "psycopg": "3.3.9"}
    lock.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match=r"lock\.txt:1: not a 'name==version' pin"):
        check.read_lock(lock)


def test_drift_is_reported_per_package(tmp_path):
    """A lock that disagrees with this environment names each difference and exits 1."""
    check = _check_lock()
    import pytest as installed

    lock = tmp_path / "lock.txt"
    lock.write_text(f"pytest=={installed.__version__}\npytest-timeout==0.0.1\nno-such-package-xyz==1.0\n")
    assert check.differences(check.read_lock(lock)) == [
        "no-such-package-xyz: locked 1.0, not installed",
        f"pytest-timeout: locked 0.0.1, installed {_version('pytest-timeout')}",
    ]
    assert check.main(["check_lock.py", str(lock)]) == 1
    assert check.main(["check_lock.py", str(tmp_path / "missing.txt")]) == 2


def test_a_shadowed_copy_later_on_sys_path_is_not_the_installed_version(tmp_path, monkeypatch):
    """setuptools appends setuptools/_vendor (its own older packaging, wheel, ...) to sys.path when
    imported; the version that counts is the one import resolves: the first on sys.path."""
    check = _check_lock()
    vendor = tmp_path / "_vendor"
    (vendor / "pytest_timeout-0.0.1.dist-info").mkdir(parents=True)
    (vendor / "pytest_timeout-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pytest-timeout\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(vendor))  # first on sys.path: now it is what import would resolve
    lock = tmp_path / "lock.txt"
    lock.write_text("pytest-timeout==0.0.1\n")
    assert check.differences(check.read_lock(lock)) == []
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p != str(vendor)] + [str(vendor)])
    assert check.differences(check.read_lock(lock)) == [f"pytest-timeout: locked 0.0.1, installed {_version('pytest-timeout')}"]


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


@pytest.mark.skipif(os.environ.get("SPECTRA_UNLOCKED") == "1", reason="make test-latest runs on the newest releases")
def test_this_environment_is_the_committed_lock():
    check = _check_lock()
    assert check.differences(check.read_lock(LOCK)) == []


def test_pyproject_ranges_admit_every_locked_version():
    """The ranges say what was tested: the lock (what the suite passes on) lies inside them, and
    nothing the project depends on is left out of the lock (torch is pinned by the Makefile)."""
    check = _check_lock()
    pins = check.read_lock(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in requirements:
        name = check.canonical(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is a dependency but not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req.specifier}"
    assert "torch" not in pins
    assert "TORCH_VERSION ?= 2.13.0" in (ROOT / "Makefile").read_text()
