"""Docker cannot run here: keep the compose file and Dockerfile honest by reading them."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from service.settings import ApiSettings, get_settings
from ssad_common.settings import CommonSettings, optuna_storage_url
from tests.helpers import ROOT
from worker.settings import WorkerSettings

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (COMPOSE["services"][service].get("environment") or {}).items()}


def test_services_are_the_documented_ones() -> None:
    assert set(COMPOSE["services"]) == {"postgres", "migrate", "api", "worker",
                                        "optuna-dashboard"}


def test_commands_match_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = COMPOSE["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    api = services["api"]["command"]
    assert api[:3] == ["uvicorn", "service.app:create_app", "--factory"]
    # The factory uvicorn calls builds the API the api service's environment describes.
    for name, value in _env("api").items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        module, _, factory = api[1].partition(":")
        app = getattr(importlib.import_module(module), factory)()
    finally:
        get_settings.cache_clear()
    assert isinstance(app, FastAPI)
    assert (app.state.settings.auth, app.state.settings.log_format) == ("required", "json")
    # The worker's command starts a worker that takes the environment's settings (here:
    # JSON logs) and stops at once (--max-jobs 0, so no database is needed).
    worker = services["worker"]["command"]
    assert worker[:3] == ["python", "-m", "worker"]
    assert worker[worker.index("--device") + 1] in ("auto", "cpu", "cuda")
    env = {**_env("worker"), "SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
           "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *worker[1:], "--max-jobs", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(ln) for ln in (done.stdout + done.stderr).splitlines()
             if ln.startswith("{")]  # a library's plain warning is not ours to parse
    assert any(ln["message"].startswith("worker ") for ln in lines), lines


def test_environment_names_are_settings_and_the_url_is_shared() -> None:
    """Each service sets only variables its own process reads."""
    reads = {"migrate": CommonSettings, "api": ApiSettings, "worker": WorkerSettings}
    urls = set()
    for name, settings in reads.items():
        fields = {f"SSAD_{field.upper()}" for field in settings.model_fields}
        env = _env(name)
        assert set(env) <= fields, set(env) - fields
        urls.add(env["SSAD_DATABASE_URL"])
    assert len(urls) == 1
    url = urls.pop()
    assert url.startswith("postgresql+psycopg://ssad:") and url.endswith("@postgres:5432/ssad")
    pg = _env("postgres")
    assert pg["POSTGRES_USER"] == "ssad" and pg["POSTGRES_DB"] == "ssad"


def test_dependencies_order_the_start() -> None:
    s = COMPOSE["services"]
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "optuna-dashboard"):
        assert s[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"


def test_worker_reserves_a_gpu_and_builds_the_torch_image() -> None:
    worker = COMPOSE["services"]["worker"]
    dev = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert worker["build"]["target"] == "worker"
    assert COMPOSE["services"]["api"]["build"]["target"] == "api"


def test_the_worker_scales_to_n_replicas() -> None:
    """`docker compose up --scale worker=N` (docs/deploy.md): nothing in the worker's service
    may be unique to one container (a fixed name, a published port, a host path), and
    workers share only the database (the URL) and a named cache volume."""
    worker = COMPOSE["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert all(not str(v).startswith(("/", ".")) for v in worker.get("volumes", []))
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert "--scale worker=N" in (ROOT / "docker-compose.yml").read_text()


def test_dockerfile_targets() -> None:
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", DOCKERFILE,
                             flags=re.S | re.M))
    assert {"base", "api", "worker"} <= set(stages)
    api_steps = [ln for ln in stages["api"].splitlines() if not ln.startswith("#")]
    assert not any("torch" in ln for ln in api_steps)  # the API image never installs torch
    assert ".[server]" in stages["api"]  # the plain wheel is the client only
    assert "torch==2.13.0" in stages["worker"] and ".[worker]" in stages["worker"]
    cmd = re.search(r'^CMD (\[.*\])', stages["worker"], flags=re.M)
    assert cmd and "worker" in cmd.group(1)


def test_the_images_copy_every_package_the_wheel_holds() -> None:
    """pip installs the packages pyproject lists (from their folders, a mapped one from its
    own); a folder the Dockerfile does not COPY is silently missing from both images."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setup.get("package-dir", {})
    own = [p for p in setup["packages"] if not any(p == m or p.startswith(m + ".")
                                                   for m in mapped)]
    packages = {p.split(".")[0] for p in own} | set(mapped.values())
    assert {"service", "worker", "ssad_common", "ssad_tune", "migrations"} <= packages
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE, re.M))
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"


def test_dashboard_reads_the_optuna_schema() -> None:
    cmd = COMPOSE["services"]["optuna-dashboard"]["command"]
    assert len(cmd) == 1 and "options=-csearch_path%3Doptuna" in cmd[0]
    expected = optuna_storage_url("postgresql+psycopg://ssad:pw@postgres:5432/ssad")
    assert "options=-csearch_path%3Doptuna" in expected


def test_embedded_mode_keeps_optuna_in_its_own_file(tmp_path: Path) -> None:
    assert optuna_storage_url(f"sqlite:///{tmp_path}/ssad.db") == \
        f"sqlite:///{tmp_path}/ssad-optuna.db"


def test_the_deployment_requires_api_keys_and_can_make_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert _env("api")["SSAD_AUTH"] == "required"
    monkeypatch.delenv("SSAD_AUTH", raising=False)  # also without the line
    assert ApiSettings(database_url=_env("api")["SSAD_DATABASE_URL"]).auth == "required"
    from ssad_tune.cli import parser

    # The command the compose file's comment gives operators exists as written.
    args = parser().parse_args(["keys", "create", "--tenant", "acme"])
    assert args.tenant == "acme"
    assert "ssad-tune keys create --tenant NAME" in (ROOT / "docker-compose.yml").read_text()


def test_ssad_tune_worker_passes_its_options_to_the_worker() -> None:
    p = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "worker", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--device" in p.stdout and "--max-jobs" in p.stdout


def test_auth_is_off_only_in_the_embedded_mode_unless_set(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """`python -m service` on an SQLite file (single user, one machine) needs no keys; any
    other way of building the app (uvicorn's factory, the images, even on SQLite) and a
    shared database require them; SSAD_AUTH always wins."""
    monkeypatch.delenv("SSAD_AUTH", raising=False)
    sqlite = f"sqlite:///{tmp_path / 'ssad.db'}"
    postgres = "postgresql+psycopg://ssad:pw@postgres:5432/ssad"
    assert ApiSettings(database_url=sqlite).auth == "required"
    assert ApiSettings(database_url=sqlite).for_embedded_mode().auth == "off"
    assert ApiSettings(database_url=postgres).for_embedded_mode().auth == "required"
    monkeypatch.setenv("SSAD_AUTH", "required")
    assert ApiSettings(database_url=sqlite).for_embedded_mode().auth == "required"
    monkeypatch.setenv("SSAD_AUTH", "off")
    assert ApiSettings(database_url=postgres).auth == "off"


def test_the_worker_image_owns_its_cache_folder() -> None:
    """A named volume mounted on a path the image lacks is created root-owned: the image
    makes SSAD_CACHE_DIR itself, owned by the user it runs as."""
    worker = DOCKERFILE.split("FROM base AS worker", 1)[1]
    cache = re.search(r"^ENV SSAD_CACHE_DIR=(\S+)$", worker, re.M)
    user = re.search(r"^USER (\d+)$", worker, re.M)
    assert cache and user
    assert re.search(rf"mkdir -p {re.escape(cache[1])} && chown {user[1]}:{user[1]} "
                     rf"{re.escape(cache[1])}", worker)
    mounts = COMPOSE["services"]["worker"].get("volumes", [])
    assert any(str(m).endswith(":" + cache[1]) for m in mounts), mounts
