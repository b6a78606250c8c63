"""Docker cannot run here: keep the compose file and Dockerfile honest by reading them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from common.settings import Settings, optuna_storage_url
from tests.helpers import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (COMPOSE["services"][service].get("environment") or {}).items()}


def test_services_are_the_documented_ones() -> None:
    assert set(COMPOSE["services"]) == {"postgres", "migrate", "api", "worker",
                                        "optuna-dashboard"}


def test_commands_match_the_code() -> None:
    services = COMPOSE["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    api = services["api"]["command"]
    assert api[:3] == ["uvicorn", "service.app:create_app", "--factory"]
    from service import app as app_module
    assert callable(app_module.create_app)
    worker = services["worker"]["command"]
    assert worker[:3] == ["python", "-m", "worker"]
    from worker.__main__ import main  # the entry point exists
    assert callable(main)
    assert worker[worker.index("--device") + 1] in ("auto", "cpu", "cuda")


def test_environment_names_are_settings_and_the_url_is_shared() -> None:
    fields = {f"SSAD_{name.upper()}" for name in Settings.model_fields}
    urls = set()
    for name in ("migrate", "api", "worker"):
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


def test_dockerfile_targets() -> None:
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", DOCKERFILE,
                             flags=re.S | re.M))
    assert {"base", "api", "worker"} <= set(stages)
    api_steps = [ln for ln in stages["api"].splitlines() if not ln.startswith("#")]
    assert not any("torch" in ln for ln in api_steps)  # the API image never installs torch
    assert "torch==2.13.0" in stages["worker"] and ".[worker]" in stages["worker"]
    cmd = re.search(r'^CMD (\[.*\])', stages["worker"], flags=re.M)
    assert cmd and "worker" in cmd.group(1)


def test_dashboard_reads_the_optuna_schema() -> None:
    cmd = COMPOSE["services"]["optuna-dashboard"]["command"]
    assert len(cmd) == 1 and "options=-csearch_path%3Doptuna" in cmd[0]
    expected = optuna_storage_url("postgresql+psycopg://ssad:pw@postgres:5432/ssad")
    assert "options=-csearch_path%3Doptuna" in expected


def test_embedded_mode_keeps_optuna_in_its_own_file(tmp_path: Path) -> None:
    assert optuna_storage_url(f"sqlite:///{tmp_path}/ssad.db") == \
        f"sqlite:///{tmp_path}/ssad-optuna.db"


def test_the_deployment_requires_api_keys_and_can_make_them() -> None:
    assert _env("api")["SSAD_AUTH"] == "required"
    assert Settings.model_fields["auth"].default == "required"  # also without the line
    from ssad_tune.cli import parser

    # The command the compose file's comment gives operators exists as written.
    args = parser().parse_args(["keys", "create", "--tenant", "acme"])
    assert args.tenant == "acme"
    assert "ssad-tune keys create --tenant NAME" in (ROOT / "docker-compose.yml").read_text()


def test_ssad_tune_worker_passes_its_options_to_the_worker() -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "worker", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--device" in p.stdout and "--max-jobs" in p.stdout
