"""``ssad-tune tune`` against a real server (uvicorn + a worker process on Postgres, keys
required), the live progress stream it follows, and its progress line."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import EventSource

from service.tenants import create_key
from ssad_common.db import make_engine, session_scope
from ssad_tune.client import Client, Progress, default_url, fmt_duration
from tests.helpers import (
    ROOT,
    claim_and_cancel,
    finish_job_with_scores,
    npz,
    start_api,
    start_worker,
    tiny_job,
    upload_pair,
    wait_for,
)
from tests.pg import free_port


def make_key(db_url: str) -> str:
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            return create_key(s, "cli-user")[1]
    finally:
        engine.dispose()


def queued_job(lines: list[str]) -> str:
    """The job id from the CLI's `job ID queued: URL` line."""
    return next(line.split()[1] for line in lines
                if line.startswith("job ") and " queued: " in line)


def test_tune_command_end_to_end(pg_url: str, tmp_path: Path, digits: Any) -> None:
    train, test, _ = digits
    (tmp_path / "train.npz").write_bytes(npz(train[:60, 0]))
    (tmp_path / "test.npz").write_bytes(npz(test[:40, 0]))
    key = make_key(pg_url)
    api, url = start_api(pg_url, tmp_path, SSAD_AUTH="required")
    worker = start_worker(pg_url, tmp_path)
    try:
        env = {**os.environ, "SSAD_URL": url, "SSAD_API_KEY": key, "PYTHONPATH": str(ROOT)}
        out = tmp_path / "scores.csv"
        p = subprocess.run(
            [sys.executable, "-m", "ssad_tune.cli", "tune", str(tmp_path / "train.npz"),
             str(tmp_path / "test.npz"), "-o", str(out), "--n-trials", "3",
             "--train-steps", "30", "--batch-size", "16", "--augmentations", "invert,flip,rotate"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        lines = p.stderr.splitlines()
        bars = [line for line in lines if line.startswith("[")]
        # 3 trial-equivalents: the 3 families screened, then 2 full-length trials.
        assert bars[-1].startswith("[" + "#" * 20 + "] 5/5 trials  best ")
        assert any(line.startswith("budget: 3 full-length trials = 90 training steps "
                                   "(staged: screen 3 families × 10 steps, then 2 trials × "
                                   "30 steps)") for line in p.stdout.splitlines() + lines)
        assert any(line.startswith("selection: ") for line in p.stdout.splitlines() + lines)
        assert "succeeded" in bars[-1]
        assert any("running" in b and "ETA" in b for b in bars)  # followed live
        assert any(line.startswith("best: ") for line in lines)
        assert any(line.startswith("suggested threshold (mad)") for line in lines)
        rows = list(csv.DictReader(out.open()))
        assert [int(r["index"]) for r in rows] == list(range(40))
        # `follow` reattaches to the job (here: already ended) and writes the same CSV.
        job_id = queued_job(lines)
        again = tmp_path / "again.csv"
        f = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "follow", job_id, "-o",
                            str(again)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert f.returncode == 0, f.stderr
        assert f.stderr.startswith(f"job {job_id} succeeded: 5 of 5 trials finished\n")
        assert again.read_bytes() == out.read_bytes()
        assert "suggested threshold (mad)" in f.stderr and "of 40 test images" in f.stderr
        with Client(url, key) as c:  # the library reads what the CLI printed
            assert len(c.trials(job_id)) == 5
            assert [e["status"] for e in c.events(job_id)][-1] == "succeeded"
            with pytest.raises(ValueError, match="format='csv'"):
                c.scores(job_id, format="csv")  # type: ignore[arg-type]
        # Without the key, the same command is refused with the server's reason.
        env.pop("SSAD_API_KEY")
        refused = subprocess.run(
            [sys.executable, "-m", "ssad_tune.cli", "tune", str(tmp_path / "train.npz"),
             str(tmp_path / "test.npz")], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60)
        assert refused.returncode == 1 and "401 Unauthorized" in refused.stderr
    finally:
        for proc in (worker, api):
            proc.kill()
            proc.wait()


def test_stream_sends_progress_until_the_end(pg_url: str, tmp_path: Path, digits: Any) -> None:
    train, test, _ = digits
    api, url = start_api(pg_url, tmp_path)
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            tr, te = upload_pair(c, npz(train[:60, 0]), npz(test[:40, 0]))
            job = c.post("/v1/jobs", json=tiny_job(tr, te, train_steps=30)).json()["id"]
            worker = start_worker(pg_url, tmp_path)
            events = []
            with c.stream("GET", f"/v1/jobs/{job}/stream", timeout=120) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [(e.event, e.data) for e in EventSource(r).iter_sse()]
            assert c.get("/v1/jobs/00000000-0000-0000-0000-000000000000/stream"
                         ).status_code == 404
        kinds = [e for e, _ in events]
        assert kinds[-1] == "end" and set(kinds[:-1]) == {"progress"}
        seen = [json.loads(d) for e, d in events if e == "progress"]
        assert seen[0]["status"] in ("queued", "running")
        assert seen[-1]["status"] == "succeeded"
        done = [j["progress"]["trials_completed"] for j in seen]
        assert done == sorted(done) and done[-1] == 5 and len(set(done)) >= 3  # live steps
    finally:
        for proc in (worker, api):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_progress_line_and_eta() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0])

    def job(status: str, done: int, best: float | None = None) -> dict[str, Any]:
        return {"status": status, "progress": {"n_trials": 4, "trials_completed": done},
                "best": None if best is None else {"validation_loss": best,
                                                    "augmentation": "rotate"}}

    bar.update(job("queued", 0))
    bar.update(job("running", 0))
    now[0] = 130.0
    bar.update(job("running", 1, -0.25))
    text = out.getvalue().splitlines()
    assert text[0] == "[--------------------] 0/4 trials  best -  queued  elapsed 0s  ETA -"
    assert text[-1] == ("[#####---------------] 1/4 trials  best -0.2500 (rotate)  running  "
                        "elapsed 30s  ETA 1m30s")
    assert fmt_duration(3725) == "1h02m05s"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_in_place_and_keeps_ticking() -> None:
    now = [0.0]
    out = FakeTerminal()
    bar = Progress(out, clock=lambda: now[0], tick_seconds=0.01)
    bar.update({"status": "running", "progress": {"n_trials": 4, "trials_completed": 0},
                "best": None})
    now[0] = 65.0  # no event from the server: the ticker still moves the clock
    # The ticker thread redraws every 0.01 s; a loaded machine may starve it for a while.
    wait_for(lambda: "elapsed 1m05s" in out.getvalue(), timeout=60, every=0.01)
    bar.finish()
    text = out.getvalue()
    assert "elapsed 1m05s" in text
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    assert "\r\x1b[2K[" in text


def test_the_server_address_comes_from_the_variables_serve_reads() -> None:
    assert default_url({}) == "http://127.0.0.1:8000"
    assert default_url({"SSAD_PORT": "8123"}) == "http://127.0.0.1:8123"
    assert default_url({"SSAD_HOST": "gpu-box", "SSAD_PORT": "9000"}) == "http://gpu-box:9000"
    assert default_url({"SSAD_HOST": "0.0.0.0", "SSAD_PORT": "9000"}) == (
        "http://127.0.0.1:9000")  # a wildcard bind address: this machine
    assert default_url({"SSAD_HOST": "::1"}) == "http://[::1]:8000"
    assert default_url({"SSAD_URL": "https://ssad.example", "SSAD_PORT": "1"}) == (
        "https://ssad.example")


def test_an_unreachable_server_is_reported_at_once_with_how_to_point_elsewhere(
        tmp_path: Path) -> None:
    (tmp_path / "a.npz").write_bytes(npz(np.zeros((4, 8, 8), np.uint8)))
    port = free_port()  # nothing listens there
    env = {**os.environ, "SSAD_PORT": str(port), "PYTHONPATH": str(ROOT)}
    env.pop("SSAD_URL", None)
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ssad_tune.cli", "tune", "a.npz", "a.npz"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert f"cannot reach the server at http://127.0.0.1:{port}" in p.stderr  # SSAD_PORT
    assert "--url" in p.stderr and "SSAD_URL" in p.stderr
    # No minute of retries against an address where nothing ever answered.
    assert time.monotonic() - started < 60


def test_tune_ensemble_writes_the_top_configurations_mean_z_score(
        pg_url: str, tmp_path: Path) -> None:
    """`tune --ensemble K` writes the top-K configurations' z-scored mean (what
    `?ensemble=K` serves), prints the trust line that calls for it, and prints no suggested
    threshold (that is set on the best trial's scores, another scale)."""
    (tmp_path / "train.npz").write_bytes(npz(np.zeros((6, 8, 8), np.uint8)))
    (tmp_path / "test.npz").write_bytes(npz(np.zeros((4, 8, 8), np.uint8)))
    api, url = start_api(pg_url, tmp_path)
    out = tmp_path / "scores.csv"
    try:
        cli = subprocess.Popen(
            [sys.executable, "-m", "ssad_tune.cli", "tune", "train.npz", "test.npz", "-o",
             str(out), "--n-trials", "2", "--ensemble", "2", "--url", url], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            jobs = wait_for(lambda: httpx.get(f"{url}/v1/jobs").json()["items"], timeout=120)
            # Play the worker: two full-length trials that rank the images in opposite
            # orders, and a selection that says the choice is uncertain.
            best, other = [0.0, 1.0, 2.0, 10.0], [3.0, 2.0, 1.0, 0.0]
            finish_job_with_scores(pg_url, jobs[0]["id"], [
                ("rotate", {"angle": 90.0}, -0.5, best), ("flip", {}, -0.2, other)],
                {"best_trial": 0, "best_family": "rotate", "runner_up_family": "flip",
                 "runner_up_trial": 1, "family_gap": 1.0, "family_gap_unit": "rank points",
                 "family_gap_share": 1.0, "top_k": 2, "top_trials": [0, 1],
                 "flagged_share": 0.25, "agreement_jaccard": 0.0, "agreement_spearman": -1.0,
                 "candidates": 2, "trust": "uncertain"})
            _, stderr = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
    finally:
        api.kill()
        api.wait()
    assert cli.returncode == 0, stderr
    assert "trust: uncertain: the tuned detector may be no better" in stderr
    assert "the mean z-score of the top 2 full-length configurations" in stderr
    assert "suggested threshold (" not in stderr
    written = [float(r["score"]) for r in csv.DictReader(out.open())]
    z = [(np.array(s) - np.mean(s)) / np.std(s) for s in (best, other)]
    assert written == pytest.approx(list((z[0] + z[1]) / 2))
    assert written != pytest.approx(best)


def test_a_cancelled_run_says_why_and_saves_the_best_finished_trial(
        pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "train.npz").write_bytes(npz(np.zeros((6, 8, 8), np.uint8)))
    (tmp_path / "test.npz").write_bytes(npz(np.zeros((4, 8, 8), np.uint8)))
    api, url = start_api(pg_url, tmp_path)
    out = tmp_path / "scores.csv"
    cli = subprocess.Popen(
        [sys.executable, "-m", "ssad_tune.cli", "tune", "train.npz", "test.npz", "-o", str(out),
         "--n-trials", "5", "--url", url], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    # Play the worker: claim the CLI's job, finish two trials, then a cancel arrives.
    stderr = claim_and_cancel(pg_url, url, cli, api, [
        (loss, [float(number + i) for i in range(4)]) for number, loss in enumerate((0.5, 0.2))])
    assert cli.returncode == 1, stderr
    assert "job cancelled: cancelled while running (a cancel was requested" in stderr
    assert "the job was cancelled after 2 of 11 trials" in stderr  # 5 trial-equivalents: 8 + 3
    assert "best trial that finished (trial 1: rotate" in stderr
    rows = list(csv.DictReader(out.open()))
    assert [float(r["score"]) for r in rows] == [1.0, 2.0, 3.0, 4.0]  # trial 1's scores

    # `follow` on the ended job says the same and saves the same; an unknown id is an error.
    job_id = queued_job(stderr.splitlines())
    api, url = start_api(pg_url, tmp_path)
    try:
        def follow(job: str, to: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ssad_tune.cli", "follow", job, "-o", str(to), "--url",
                 url], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)})

        ended = follow(job_id, tmp_path / "again.csv")
        assert ended.returncode == 1, ended.stderr
        assert "job cancelled: cancelled while running" in ended.stderr
        assert (tmp_path / "again.csv").read_bytes() == out.read_bytes()
        unknown = follow("00000000-0000-0000-0000-000000000000", tmp_path / "none.csv")
        assert unknown.returncode == 1 and "error: 404" in unknown.stderr, unknown.stderr
        assert not (tmp_path / "none.csv").exists()
    finally:
        api.kill()
        api.wait()


def test_counts_below_one_are_refused_before_anything_is_uploaded(
        capsys: pytest.CaptureFixture[str]) -> None:
    from ssad_tune.cli import parser

    for option in ("--n-trials", "--train-steps", "--batch-size", "--parallelism"):
        with pytest.raises(SystemExit) as exit_:
            parser().parse_args(["tune", "no-such-train.npz", "no-such-test.npz", option, "0"])
        assert exit_.value.code == 2
        assert f"argument {option}: 0: must be at least 1" in capsys.readouterr().err
    assert parser().parse_args(["tune", "a", "b", "--n-trials", "3"]).n_trials == 3


def test_ctrl_c_stops_following_and_says_how_to_follow_again(pg_url: str,
                                                             tmp_path: Path) -> None:
    """Ctrl-C while following: exit 130, the job goes on, and the hint to follow it again
    names the server and the output file given (pasted, it must find both)."""
    import signal

    (tmp_path / "train.npz").write_bytes(npz(np.zeros((6, 8, 8), np.uint8)))
    (tmp_path / "test.npz").write_bytes(npz(np.zeros((4, 8, 8), np.uint8)))
    api, url = start_api(pg_url, tmp_path)  # no worker: the job stays queued
    try:
        cli = subprocess.Popen(
            [sys.executable, "-m", "ssad_tune.cli", "tune", "train.npz", "test.npz", "-o",
             "mine.csv", "--n-trials", "2", "--url", url], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert cli.stderr is not None
            seen = []
            for line in cli.stderr:  # until the bar's first line: the follow loop runs
                seen.append(line)
                if line.startswith("["):
                    break
            cli.send_signal(signal.SIGINT)
            rest = cli.communicate(timeout=60)[1]
        finally:
            if cli.poll() is None:
                cli.kill()
        assert cli.returncode == 130, "".join(seen) + rest
        job_id = queued_job(seen)
        assert (f"follow it again: ssad-tune follow {job_id} --url {url} -o mine.csv; "
                f"cancel it: POST {url}/v1/jobs/{job_id}/cancel") in rest, rest
        assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "queued"
    finally:
        api.kill()
        api.wait()


def test_a_folder_is_zipped_with_its_png_and_jpeg_and_refused_with_other_images(
        tmp_path: Path) -> None:
    """The server decodes PNG and JPEG only: a folder holding a BMP was zipped whole and the
    BMP silently dropped by the server (a fresh-eyes review). Now the client refuses it,
    naming the file, before anything is sent."""
    import zipfile

    from PIL import Image

    from ssad_tune.client import ClientError, _encode

    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    for i, where in enumerate(["a.png", "sub/b.jpg", "c.JPEG"]):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
            folder / where, format="JPEG" if "jp" in where.lower() else "PNG")
    (folder / "notes.txt").write_text("not an image")
    name, data = _encode(folder, None)
    assert name == "good.zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["a.png", "c.JPEG",
                                                                     "sub/b.jpg"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "sub" / "d.bmp", format="BMP")
    with pytest.raises(ClientError, match=r"1 image\(s\) the server cannot read \(sub/d.bmp\)"):
        _encode(folder, None)
