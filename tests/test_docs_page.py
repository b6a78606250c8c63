"""The /docs page renders in headless Chromium with no internet (assets served locally)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, chromium_path, wait_http_ok
from tests.pg import free_port

CHROMIUM = chromium_path()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_swagger_ui_renders_offline(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}",
           "PYTHONPATH": str(ROOT)}
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:create_app",
                            "--factory", "--port", str(port), "--log-level", "warning"],
                           cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz")
        shot = tmp_path / "docs.png"
        common = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic",
                  f"--user-data-dir={tmp_path / 'profile'}",
                  # No way out but loopback: a CDN asset would fail to load.
                  "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
                  "--virtual-time-budget=8000"]
        dom = subprocess.run([*common, "--dump-dom", f"{url}/docs"], capture_output=True,
                             text=True, timeout=120).stdout
        subprocess.run([*common, "--window-size=1280,1600", f"--screenshot={shot}",
                        f"{url}/docs"], capture_output=True, timeout=120)
    finally:
        api.terminate()
        api.wait(timeout=30)
    assert "swagger-ui" in dom
    # Rendered by the JavaScript, not present in the served HTML: operations and paths.
    assert "opblock" in dom and "/v1/jobs/{job_id}/scores" in dom, dom[:2000]
    assert shot.exists() and shot.stat().st_size > 10_000
