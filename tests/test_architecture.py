"""The house's boundaries (docs/architecture.md), checked on the source: the import
contracts in pyproject.toml ([tool.importlinter]), no import cycle between any two files,
and torch never loaded by the API or the client."""

from __future__ import annotations

import graphlib
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssad_common", "service", "worker", "ssad_tune", "bench")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _module_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


def test_no_file_imports_itself_back() -> None:
    graph = _module_graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check above can fail: a two-file cycle in a graph of the same shape is found."""
    graph = _module_graph()
    graph["ssad_common.db"] = graph["ssad_common.db"] | {"ssad_common.settings"}
    graph["ssad_common.settings"] = graph["ssad_common.settings"] | {"ssad_common.db"}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(graph).static_order())


@pytest.mark.parametrize("entry", [
    "import service.app; service.app.create_app()",
    "import ssad_tune.client, ssad_tune.cli",
    "import ssad_common.models, ssad_common.images, ssad_common.search_space, ssad_common.blobs",
])
def test_torch_never_reaches_the_api(entry: str, tmp_path: Path) -> None:
    """Nor do the plotting and search libraries at start: the API loads matplotlib and
    Optuna with the first plot asked for, so that each API process starts quickly."""
    heavy = ("torch", "kornia", "sklearn", "matplotlib", "optuna", "scipy")
    code = f"import sys; {entry}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {"SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_supervisor_of_cpu_workers_loads_no_engine(tmp_path: Path) -> None:
    """``python -m worker --concurrency N --device cpu`` only starts and watches its N
    worker processes: it loads neither torch, scikit-learn nor Optuna, which only the
    workers use (about 350 MB and 8 s of start-up on this machine)."""
    code = ("import sys; from worker.__main__ import child_devices; "
            "print(child_devices('cpu', 3), sorted(m for m in ('torch', 'kornia', 'sklearn', "
            "'optuna') if m in sys.modules))")
    env = {"SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['cpu', 'cpu', 'cpu'] []"
