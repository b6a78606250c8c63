"""The report page in a real headless browser (Chromium, driven by Playwright), with keys
on: opened from a signed link while the job runs, it updates in place from the progress
stream, reloads once when the job ends, shows the chosen configuration and every plot, and
logs no console error or failed request. A full-page screenshot is kept (SSAD_REPORT_
SCREENSHOT=path copies it there: docs/img/report.png was made so, and looked at)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_database
from tests.helpers import chromium_path, make_key, npz, start_api, start_worker, tiny_job, wait_for

CHROMIUM = chromium_path()
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev extra")

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (.ci/run installs it)")

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        # No way out but loopback: anything from elsewhere would fail (and be reported).
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"]


def test_report_renders_updates_live_and_logs_no_error(
        request: pytest.FixtureRequest, tmp_path: Path, digits: Any) -> None:
    db_url = fresh_database("sqlite", request, tmp_path)
    key = make_key(db_url, "alice")
    api_proc, url = start_api(db_url, tmp_path, SSAD_AUTH="required")
    worker = None
    try:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                            timeout=60)
        train, test, _ = digits
        ids = [http.post("/v1/datasets", files={"file": (n, npz(a))}).json()["id"]
               for n, a in (("train.npz", train[:60]), ("test.npz", test[:40]))]
        job = http.post("/v1/jobs", json=tiny_job(*ids, n_trials=4, train_steps=60)).json()
        link = http.post(f"/v1/jobs/{job['id']}/report-link").json()["url"]
        problems: list[str] = []
        navigations: list[str] = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(
                f"failed request {r.url}: {r.failure}") if "/stream" not in r.url else None)
            page.on("framenavigated", lambda f: navigations.append(f.url)
                    if f == page.main_frame else None)
            page.goto(link)
            assert page.text_content("#status") == "queued"
            worker = start_worker(db_url, tmp_path)  # the job starts with the page open
            seen: set[str] = set()
            statuses: set[str] = set()
            deadline = time.monotonic() + 600
            while len(navigations) == 1 and time.monotonic() < deadline:
                statuses.add(page.text_content("#status") or "")
                seen.add(page.text_content("#progress") or "")
                page.wait_for_timeout(100)
            # Updated in place (no navigation) from the stream while it ran, then reloaded.
            assert "running" in statuses, statuses
            assert len(seen) >= 3, seen
            page.wait_for_load_state("load")
            wait_for(lambda: page.text_content("#status") == "succeeded", timeout=120)
            assert len(navigations) == 2, navigations
            best = http.get(f"/v1/jobs/{job['id']}").json()["best"]
            assert (page.text_content("#best") or "").startswith(best["augmentation"])
            for name in ("history", "slice", "trials", "scores", "top", "augmentation"):
                width = page.eval_on_selector(f"#plot-{name} img", "i => i.naturalWidth")
                assert width > 100, name
            rows = page.eval_on_selector_all("#trials tbody tr", "r => r.length")
            assert rows == len(http.get(f"/v1/jobs/{job['id']}/trials").json()["trials"])
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert problems == [], problems
        assert shot.stat().st_size > 50_000
        if os.environ.get("SSAD_REPORT_SCREENSHOT"):
            shutil.copy(shot, os.environ["SSAD_REPORT_SCREENSHOT"])
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        api_proc.terminate()
        api_proc.wait(timeout=60)
