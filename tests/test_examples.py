"""The README's path for a new user: start the service, run the curl example."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, wait_for, wait_http_ok
from tests.pg import free_port


@pytest.mark.parametrize("auth", ["default", "required"])
def test_embedded_service_and_curl_example(tmp_path: Path, auth: str) -> None:
    subprocess.run([sys.executable, "examples/make_digits.py", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    port = free_port()
    env = {**os.environ, "SSAD_DATABASE_URL": f"sqlite:///{tmp_path / 'ssad.db'}",
           "SSAD_PORT": str(port), "SSAD_CACHE_DIR": str(tmp_path / "cache"),
           "SSAD_POLL_SECONDS": "0.2", "PYTHONPATH": str(ROOT)}
    env.pop("SSAD_AUTH", None)
    # The clients find the server from SSAD_PORT alone, as `serve` does (no SSAD_URL).
    client_env = {k: v for k, v in env.items() if k != "SSAD_URL"}
    if auth == "required":
        env["SSAD_AUTH"] = "required"
        subprocess.run([sys.executable, "-m", "ssad_tune.cli", "migrate"], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        made = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "keys", "create",
                               "--tenant", "me"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True)
        client_env["SSAD_API_KEY"] = made.stdout.strip()
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/readyz")
        if auth == "required":
            assert httpx.get(f"{url}/v1/jobs").status_code == 401
        out = tmp_path / "scores.csv"
        p = subprocess.run(
            ["bash", str(ROOT / "examples/tune.sh"), str(tmp_path / "digits_train.npz"),
             str(tmp_path / "digits_test.npz"), str(out)],
            env={**client_env, "N_TRIALS": "2", "TRAIN_STEPS": "8", "POLL_SECONDS": "0.5"},
            capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "succeeded" in p.stdout
        rows = list(csv.DictReader(out.open()))
        assert len(rows) > 20 and [int(r["index"]) for r in rows] == list(range(len(rows)))
        if auth == "default":  # run again: a new job, not the first one replayed
            again = subprocess.run(p.args, env={**client_env, "N_TRIALS": "2",
                                                "TRAIN_STEPS": "8", "POLL_SECONDS": "0.5"},
                                   capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stdout + again.stderr
            jobs = [re.search(r"^job (\S+) queued", run.stdout, re.M) for run in (p, again)]
            assert all(jobs) and jobs[0].group(1) != jobs[1].group(1), p.stdout + again.stdout
        if auth == "required":  # the Python client example, against the same server
            work = tmp_path / "client"
            work.mkdir()
            py = subprocess.run(
                [sys.executable, str(ROOT / "examples/client.py"),
                 str(tmp_path / "digits_train.npz"), str(tmp_path / "digits_test.npz"),
                 str(tmp_path / "digits_test.npz")],
                cwd=work, env={**client_env, "N_TRIALS": "2", "TRAIN_STEPS": "8"},
                capture_output=True, text=True, timeout=300)
            assert py.returncode == 0, py.stdout + py.stderr
            assert f"scored {len(rows)} new images" in py.stdout
            assert "flagged against job" in py.stdout
            assert "succeeded: 5/5 trials" in py.stdout  # 4 families screened, 1 full
            assert "None" not in py.stdout  # no "0/None trials" for a scoring job
            assert re.search(r"flagged by the \w+ rule \(\d+\):", py.stdout), py.stdout
            assert "4 families screened, then 1 full-length trial\n" in py.stdout
            assert "never tried: flip, crop, blur, noise, mask, invert" in py.stdout
            assert (work / "top.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert len((work / "scores.csv").read_text().splitlines()) == len(rows) + 1
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = (tmp_path / "service.log").read_text(errors="replace")
    assert "/docs" in text and "embedded worker started" in text
    # Embedded mode says at start-up whether it authenticates.
    assert ("authentication OFF" if auth == "default" else "authentication required") in text
    # Stopping the server stops its embedded worker: nothing is left running.
    found = re.search(r"embedded worker started \(pid (\d+)\)", text)
    assert found is not None
    wait_for(lambda: not running(int(found.group(1))), timeout=30)


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("command", [["bash", "examples/tune.sh"],
                                     [sys.executable, "examples/client.py"]])
def test_examples_say_how_to_point_them_at_the_server(command: list[str]) -> None:
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "SSAD_URL"}
    p = subprocess.run([*command, "train.npz", "test.npz"], cwd=ROOT,
                       env={**env, "SSAD_PORT": str(port)}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert f"cannot reach the server at http://127.0.0.1:{port}" in p.stderr
    assert "SSAD_URL" in p.stderr and "SSAD_PORT" in p.stderr


def test_tune_sh_says_why_a_job_was_cancelled(pg_url: str, tmp_path: Path) -> None:
    import numpy as np

    from tests.helpers import claim_and_cancel, npz, start_api

    for name in ("train.npz", "test.npz"):
        (tmp_path / name).write_bytes(npz(np.zeros((4, 8, 8), np.uint8)))
    api, url = start_api(pg_url, tmp_path)
    # A re-run: the train file is stored already, so its upload answers 200 (the existing
    # dataset), which the script must take as it takes a 201.
    assert httpx.post(f"{url}/v1/datasets", files={
        "file": ("train.npz", (tmp_path / "train.npz").read_bytes())}).status_code == 201
    script = subprocess.Popen(["bash", str(ROOT / "examples/tune.sh"), "train.npz", "test.npz"],
                              cwd=tmp_path, env={**os.environ, "SSAD_URL": url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = claim_and_cancel(pg_url, url, script, api, timeout=60)
    assert script.returncode == 1
    assert "job cancelled: last event: cancelled while running" in stderr
