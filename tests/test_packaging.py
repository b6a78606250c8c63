"""The wheel carries what the server needs to run from an install, not only from a source
tree: the schema's migrations (as ``service._migrations``), so ``ssad-tune migrate`` and the
API's start-up (which reads the head revision) work wherever the wheel is installed."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

from tests.helpers import ROOT, build_wheel

SHIPPED = {"service._migrations", "service._migrations.versions"}


def test_the_listed_packages_are_every_package_of_the_tree() -> None:
    """pyproject lists the packages (a mapped one cannot be found): a new subpackage must
    be added there, or the wheel would ship without it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {p for p in find_namespace_packages(
        where=str(ROOT), include=["ssad_common*", "service*", "worker*", "ssad_tune*"])
        if "__pycache__" not in p}
    assert listed - SHIPPED == found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's packages unpacked by pip into a folder of their own (the dependencies
    are this interpreter's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    names = zipfile.ZipFile(wheel).namelist()
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert "service/_migrations/env.py" in names
    assert "service/_migrations/script.py.mako" in names
    assert sorted(n.rsplit("/", 1)[1] for n in names
                  if n.startswith("service/_migrations/versions/")) == versions
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def test_migrate_from_the_installed_wheel_outside_any_checkout(installed: Path,
                                                               tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed),
           "SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    probe = ("import service, service.migrate as m; print(service.__file__); "
             "print(m.migrations_dir()); print(m.head_revision())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module, migrations, head = out.stdout.split()
    assert module.startswith(str(installed)) and migrations.startswith(str(installed))
    assert head == sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py")
                          )[-1].split("_", 1)[0]
    done = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "migrate"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"database at {head}"
    assert (tmp_path / "fresh.db").stat().st_size > 0
