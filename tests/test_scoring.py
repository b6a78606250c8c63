"""Scoring new data with a finished job's stored detector, by a real worker; the stored
format; the augmentation sample the worker renders."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.tenants import create_key
from ssad_common.db import make_engine, session_scope
from ssad_common.models import MODEL_ARTIFACT, JobArtifact
from tests.helpers import (
    assert_error,
    client,
    job_status,
    npz,
    start_worker,
    tiny_job,
    upload,
    upload_pair,
    wait_for,
)
from worker.core.detector import Detector, DetectorConfig
from worker.core.export import ScoringModel


def test_score_new_data_with_the_best_trials_detector(pg_url: str, tmp_path: Path,
                                                 digits: Any) -> None:
    train, test, _ = digits
    key = ""
    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        key = create_key(s, "acme")[1]
        other = create_key(s, "globex")[1]
    with client(pg_url, auth="required") as api:
        a = {"Authorization": f"Bearer {key}"}
        b = {"Authorization": f"Bearer {other}"}
        api.headers.update(a)
        tr, te = upload_pair(api, npz(train[:60, 0]), npz(test[:40, 0]))
        fresh = upload(api, npz(test[40:, 0]), "new.npz").json()["id"]
        noise = np.random.default_rng(0).integers(0, 256, (1, 8, 8), dtype=np.uint8)
        odd = upload(api, npz(noise), "noise.npz").json()["id"]
        job = api.post("/v1/jobs", json=tiny_job(tr, te)).json()["id"]
        assert_error(api.post(f"/v1/jobs/{job}/score", json={"dataset_id": fresh}), 409,
                     "Conflict", "once it has succeeded")
        worker = start_worker(pg_url, tmp_path)
        try:
            wait_for(lambda: job_status(api, job)["status"] == "succeeded", timeout=240)
            tuned = api.get(f"/v1/jobs/{job}/scores").json()

            # The worker rendered what the best trial's augmentation does.
            pic = api.get(f"/v1/jobs/{job}/plots/augmentation.png")
            assert pic.status_code == 200 and pic.headers["content-type"] == "image/png"
            img = Image.open(io.BytesIO(pic.content))
            assert img.width == 8 * 100 - 4 and img.height == 22 + 2 * 100 - 4

            # Scoring the job's own test set again reproduces its scores exactly.
            again = api.post(f"/v1/jobs/{job}/score", json={"dataset_id": te})
            assert again.status_code == 202 and again.json()["kind"] == "score"
            new = api.post(f"/v1/jobs/{job}/score", json={"dataset_id": fresh},
                           headers={"Idempotency-Key": "score-1"}).json()
            replay = api.post(f"/v1/jobs/{job}/score", json={"dataset_id": fresh},
                              headers={"Idempotency-Key": "score-1"})
            assert replay.json()["id"] == new["id"]
            # One image of pure noise, scored alone: flagged by the tuning job's threshold
            # (the batch-only rule has no bulk to judge a single score against).
            alone = api.post(f"/v1/jobs/{job}/score", json={"dataset_id": odd}).json()["id"]
            for j in (again.json()["id"], new["id"], alone):
                wait_for(lambda j=j: job_status(api, j)["status"] == "succeeded", timeout=120)
            judged = api.get(f"/v1/jobs/{alone}/threshold").json()
            assert judged["reference_job_id"] == job
            assert [f["name"] for f in judged["flagged"]] == ["0"], judged
            assert api.get(f"/v1/jobs/{alone}/threshold",
                           params={"reference": "batch"}).json()["flagged"] == []
            rescored = api.get(f"/v1/jobs/{again.json()['id']}/scores").json()["scores"]
            np.testing.assert_allclose([r["score"] for r in rescored],
                                       [r["score"] for r in tuned["scores"]], rtol=1e-6)
            new_scores = api.get(f"/v1/jobs/{new['id']}/scores").json()["scores"]
            assert len(new_scores) == len(test) - 40
            assert all(np.isfinite(r["score"]) for r in new_scores)
            done = job_status(api, new["id"])
            assert done["best"]["augmentation"] == job_status(api, job)["best"]["augmentation"]
            # Its events name the detector's trial in the tuning job (its own is trial 0),
            # and say when the images were resized to the detector's working size.
            source = api.get(f"/v1/jobs/{job}").json()
            events = [e["message"] for e in
                      api.get(f"/v1/jobs/{new['id']}/events").json()["events"]]
            assert events[-1].startswith(
                f"scored {len(test) - 40} images with job {job}'s detector (its trial "
                f"{source['best']['trial_number']}: {source['best']['augmentation']}, loss ")
            size = source["spec"]["images"]["working_size"]
            assert ("images resized to the detector's working size" in events[0]) == (size != 8)
            other_size = np.zeros((2, size + 4, size + 4), np.uint8)
            bigger = api.post(f"/v1/jobs/{job}/score", json={"dataset_id": upload(
                api, npz(other_size), "bigger.npz").json()["id"]}).json()["id"]
            queued = api.get(f"/v1/jobs/{bigger}/events").json()["events"][0]["message"]
            assert queued.endswith(f"; images resized to the detector's working size "
                                   f"{size}x{size} (dataset {size + 4}x{size + 4})"), queued
            api.post(f"/v1/jobs/{bigger}/cancel")
            assert api.get(f"/v1/jobs/{new['id']}/threshold").status_code == 200
        finally:
            worker.kill()
            worker.wait()

        # Refusals: another tenant, a scoring job as source, a colour mismatch.
        assert_error(api.post(f"/v1/jobs/{job}/score", json={"dataset_id": fresh},
                              headers=b), 404, "NotFound")
        assert_error(api.post(f"/v1/jobs/{new['id']}/score", json={"dataset_id": fresh}),
                     422, "InvalidRequest", "scoring job")
        rgb = upload(api, npz(np.zeros((3, 8, 8, 3), np.uint8)), "rgb.npz").json()["id"]
        assert_error(api.post(f"/v1/jobs/{job}/score", json={"dataset_id": rgb}), 422,
                     "IncompatibleDatasets", "grey")
        assert_error(api.post(f"/v1/jobs/{job}/score", json={"dataset_id": "nope"}), 404,
                     "NotFound", "dataset nope")
    with session_scope(engine) as s:  # one stored detector: the best trial's
        arts = s.query(JobArtifact).filter_by(job_id=job, name=MODEL_ARTIFACT).all()
        assert len(arts) == 1
        assert arts[0].meta["trial_number"] == job_status_number(pg_url, job)
    engine.dispose()


def job_status_number(db_url: str, job_id: str) -> int:
    with client(db_url) as api:  # auth off: the default tenant cannot see it
        assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        from ssad_common.models import Job

        job = s.get(Job, job_id)
        assert job is not None and job.best_trial_number is not None
        number = job.best_trial_number
    engine.dispose()
    return number


def test_stored_detector_round_trip_and_refuses_other_files() -> None:
    model = Detector(DetectorConfig(1, 32, width=4))
    rng = np.random.default_rng(0)
    dim = model.embed(torch.zeros(1, 1, 32, 32)).shape[1]
    loc, prec = rng.normal(size=dim), np.eye(dim)
    stored = ScoringModel.capture(model, "mahalanobis", loc, prec)
    back = ScoringModel.from_bytes(stored.to_bytes())
    assert back.config == model.config and back.scorer == "mahalanobis"
    images = rng.integers(0, 256, (5, 1, 20, 20), dtype=np.uint8)
    np.testing.assert_allclose(back.score(images, torch.device("cpu")),
                               stored.score(images, torch.device("cpu")))
    with pytest.raises(ValueError, match="must be"):
        back.score(np.zeros((2, 3, 8, 8), np.uint8), torch.device("cpu"))
    buf = io.BytesIO()
    torch.save({"format": 99}, buf)
    with pytest.raises(ValueError, match="unknown format"):
        ScoringModel.from_bytes(buf.getvalue())

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"format": 1, "x": Evil()}, buf)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        ScoringModel.from_bytes(buf.getvalue())  # never unpickled
