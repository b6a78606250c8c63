"""The client as a library: the project's wheel, built from this checkout and installed by
a plain ``pip install`` into a new virtual environment, brings the typed client and the
``ssad-tune`` command and nothing of the server (no torch, no FastAPI, no SQLAlchemy), and
works against a live server (API and worker processes, keys required): upload (a folder of
images laid out as MVTec AD is, and an array), create_job, wait with a progress callback,
scores as numpy, the report URL a browser opens, thresholds; and the folder example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import fresh_database
from tests.helpers import ROOT, build_wheel, make_key, start_api, start_worker

SERVER_PACKAGES = ("torch", "fastapi", "sqlalchemy", "alembic", "optuna", "kornia",
                   "sklearn", "pydantic", "uvicorn", "matplotlib")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding only the wheel (and what it depends on, pinned by constraints)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c",
                    str(ROOT / "constraints.txt"), str(wheel)], check=True,
                   capture_output=True, timeout=900)
    return venv


def test_the_wheel_holds_the_client_and_nothing_of_the_server(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    probe = ("import importlib.util, json, sys; print(json.dumps({m: importlib.util."
             f"find_spec(m) is not None for m in {list(SERVER_PACKAGES)!r}}}))")
    found = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                      check=True).stdout)
    assert not any(found.values()), found
    ok = subprocess.run([python, "-c", "from ssad_tune import Client, verify; print('ok')"],
                        capture_output=True, text=True)
    assert ok.stdout.strip() == "ok", ok.stderr
    serve = subprocess.run([str(client_venv / "bin" / "ssad-tune"), "serve"],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    assert "pip install 'ssad-tune[server]'" in serve.stderr, serve.stderr


def _folders(root: Path, digits: Any) -> tuple[Path, Path]:
    """train/good and test/mixed, as make_digits.py --folders writes them."""
    from PIL import Image

    train, test, _ = digits
    for folder, images in (("train/good", train[:60, 0]), ("test/mixed", test[:40, 0])):
        (root / folder).mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / folder / f"{i:03d}.png")
    return root / "train" / "good", root / "test" / "mixed"


def test_the_installed_client_against_a_live_server(
        client_venv: Path, request: pytest.FixtureRequest, tmp_path: Path,
        digits: Any) -> None:
    db_url = fresh_database("sqlite", request, tmp_path)
    key = make_key(db_url, "lib-user")
    train_dir, test_dir = _folders(tmp_path / "data", digits)
    np.save(tmp_path / "extra.npy", digits[1][:5, 0])
    api, url = start_api(db_url, tmp_path, SSAD_AUTH="required")
    worker = start_worker(db_url, tmp_path)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from ssad_tune import Client
        with Client() as c:  # SSAD_URL, SSAD_API_KEY
            train = c.upload({str(train_dir)!r})
            test = c.upload({str(test_dir)!r})
            arr = c.upload(np.load({str(tmp_path / "extra.npy")!r}), name="five.npy")
            job = c.create_job(train, test, n_trials=3, train_steps=10, batch_size=8,
                               search_space={{"augmentations": ["invert", "flip", "rotate"]}})
            seen = []
            job = c.wait(job["id"], progress=lambda j: seen.append(
                j["progress"]["trials_completed"]))
            scores = c.scores(job["id"])
            report = c.report_url(job["id"])
            thr = c.threshold(job["id"])
            records = c.scores(job["id"], format="records")
        print(json.dumps({{"status": job["status"], "seen": seen, "train": train,
                          "test": test, "arr": arr, "dtype": str(scores.dtype),
                          "n": len(scores), "report": report, "rule": thr["rule"],
                          "names": [r["name"] for r in records],
                          "best": job["best"]["augmentation"], "job": job["id"]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SSAD_URL=url, SSAD_API_KEY=key)
    try:
        p = subprocess.run([str(client_venv / "bin" / "python"), "-c", script], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        example = subprocess.run(
            [str(client_venv / "bin" / "python"), str(ROOT / "examples" / "tune_folder.py"),
             str(train_dir), str(test_dir), "--n-trials", "3", "--train-steps", "8",
             "--out", str(tmp_path / "scores.csv")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        import httpx

        page = httpx.get(out["report"], timeout=60)  # a browser's request: no key
        keyless = httpx.get(f"{url}/v1/jobs/{out['job']}/report", timeout=60)
        from ssad_tune import Client

        with Client(url, key) as c:
            frame = c.scores(out["job"], format="pandas")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        api.terminate()
        api.wait(timeout=60)
    assert out["status"] == "succeeded"
    assert out["seen"] and out["seen"][-1] == max(out["seen"]) >= 3  # called as it ran
    assert (out["train"]["n_samples"], out["test"]["n_samples"], out["arr"]["n_samples"]) \
        == (60, 40, 5)
    assert out["dtype"] == "float64" and out["n"] == 40
    assert out["names"][:2] == ["000.png", "001.png"]  # named by their path in the folder
    assert "token=" in out["report"] and page.status_code == 200
    assert out["best"] in page.text
    assert keyless.status_code == 401
    assert list(frame.columns) == ["index", "name", "score"] and len(frame) == 40
    assert example.returncode == 0, example.stderr
    assert "report: http" in example.stdout and "threshold (mad)" in example.stdout
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "name,score,flagged" and len(lines) == 41
