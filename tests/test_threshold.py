"""Label-free thresholds: the rules on known distributions, and the endpoint."""

from __future__ import annotations

import numpy as np
import pytest

from service.jobs.threshold import contamination_threshold, mad_threshold, thresholds
from tests.helpers import assert_error, client, finish_job_with_scores, npz, tiny_job, upload


def test_mad_rule_finds_clear_outliers_and_ignores_the_bulk() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(10, 1, 950)
    outliers = rng.normal(25, 1, 50)
    t = mad_threshold(np.r_[normal, outliers])
    assert 12 < t.threshold < 15  # ≈ 10 + 3.5 σ, barely moved by 5% outliers
    assert 48 <= t.n_flagged <= 53
    # No outliers at all: almost nothing is flagged (a contamination rule would flag 10%).
    assert mad_threshold(normal).n_flagged <= 3


def test_contamination_rule_flags_exactly_its_fraction() -> None:
    scores = np.arange(200, dtype=float)
    t = contamination_threshold(scores, 0.1)
    assert t.n_flagged == 20 and 179 < t.threshold < 180
    assert contamination_threshold(scores[:3], 0.01).n_flagged == 1  # at least one
    assert contamination_threshold(np.array([5.0]), 0.5).n_flagged == 0  # one score: nothing above


def test_constant_scores_do_not_divide_by_zero() -> None:
    t = thresholds(np.full(10, 3.0), 0.1)
    assert t["mad"].n_flagged == 0 and np.isfinite(t["mad"].threshold)
    with pytest.raises(ValueError):
        thresholds(np.array([]), 0.1)


def test_threshold_endpoint(db_url: str) -> None:
    scores = [float(v) for v in np.r_[np.linspace(1.0, 2.0, 18), [9.0, 12.0]]]
    with client(db_url) as api:
        ds = upload(api, npz(np.zeros((20, 8, 8), np.uint8)), "d.npz").json()["id"]
        job = api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.05)).json()["id"]
        assert_error(api.get(f"/v1/jobs/{job}/threshold"), 409, "Conflict", "succeeded")
        finish_job_with_scores(db_url, job, [("rotate", {"angle": 90.0}, -0.5, scores)])
        body = api.get(f"/v1/jobs/{job}/threshold").json()
        assert body["suggested_rule"] == body["rule"] == "mad"
        rules = {r["rule"]: r for r in body["rules"]}
        assert rules["mad"]["n_flagged"] == 2 and rules["contamination"]["n_flagged"] == 1
        assert [f["index"] for f in body["flagged"]] == [19, 18]  # most anomalous first
        by_fraction = api.get(f"/v1/jobs/{job}/threshold", params={"rule": "contamination"})
        assert [f["index"] for f in by_fraction.json()["flagged"]] == [19]
        assert_error(api.get(f"/v1/jobs/{job}/threshold", params={"rule": "otsu"}), 422,
                     "ValidationError")


def _keep_a_detector(db_url: str, job_id: str) -> None:
    """What a worker stores when a tuning job succeeds, and scoring needs: the detector."""
    from ssad_common.db import make_engine, session_scope
    from ssad_common.models import MODEL_ARTIFACT, JobArtifact

    engine = make_engine(db_url)
    with session_scope(engine) as s:
        s.add(JobArtifact(job_id=job_id, name=MODEL_ARTIFACT, content_type="x", data=b"w",
                          meta={}))
    engine.dispose()


def _forget_reference(db_url: str, job_id: str) -> None:
    """Make a scoring job look like one queued before references were kept in its spec."""
    from ssad_common.db import make_engine, session_scope
    from ssad_common.models import Job

    engine = make_engine(db_url)
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.spec = {k: v for k, v in job.spec.items() if k != "threshold_reference"}
    engine.dispose()


def test_a_scoring_job_is_judged_by_its_tuning_jobs_threshold(db_url: str) -> None:
    """Scoring two new images, one ordinary and one extreme, flags the extreme one: the
    threshold comes from the tuning job's test set. The batch alone (two scores) has no
    bulk to set a threshold, so the old batch-only rule flags nothing."""
    reference = [float(v) for v in np.r_[np.linspace(1.0, 2.0, 18), [9.0, 12.0]]]
    with client(db_url) as api:
        ds = upload(api, npz(np.zeros((20, 8, 8), np.uint8)), "d.npz").json()["id"]
        new = upload(api, npz(np.zeros((2, 8, 8), np.uint8)), "new.npz").json()["id"]
        tune = api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.05)).json()["id"]
        finish_job_with_scores(db_url, tune, [("rotate", {"angle": 90.0}, -0.5, reference)])
        _keep_a_detector(db_url, tune)
        tuned = api.get(f"/v1/jobs/{tune}/threshold").json()
        assert tuned["reference"] == "tuning" and tuned["reference_job_id"] == tune

        score = api.post(f"/v1/jobs/{tune}/score", json={"dataset_id": new}).json()["id"]
        finish_job_with_scores(db_url, score, [("rotate", {"angle": 90.0}, -0.5,
                                                [1.5, 1184.0])])
        body = api.get(f"/v1/jobs/{score}/threshold").json()
        assert body["reference"] == "tuning" and body["reference_job_id"] == tune
        assert [f["index"] for f in body["flagged"]] == [1]
        same = {r["rule"]: r["threshold"] for r in tuned["rules"]}
        assert {r["rule"]: r["threshold"] for r in body["rules"]} == same
        assert {r["rule"]: r["n_flagged"] for r in body["rules"]} == {"mad": 1,
                                                                     "contamination": 1}
        assert f"job {tune}'s test set" in body["rules"][0]["description"]
        batch = api.get(f"/v1/jobs/{score}/threshold", params={"reference": "batch"}).json()
        assert batch["reference"] == "batch" and batch["reference_job_id"] == score
        assert batch["flagged"] == []  # what every small batch used to get
        assert_error(api.get(f"/v1/jobs/{score}/threshold", params={"reference": "x"}), 422,
                     "ValidationError", "reference")

        # The reference was kept with the scoring job: it outlives the tuning job.
        assert api.delete(f"/v1/jobs/{tune}").status_code == 204
        assert api.get(f"/v1/jobs/{score}/threshold").json()["flagged"] == body["flagged"]


def test_a_scoring_job_without_a_kept_reference_reads_its_tuning_job(db_url: str) -> None:
    reference = [float(v) for v in np.r_[np.linspace(1.0, 2.0, 18), [9.0, 12.0]]]
    with client(db_url) as api:
        ds = upload(api, npz(np.zeros((20, 8, 8), np.uint8)), "d.npz").json()["id"]
        tune = api.post("/v1/jobs", json=tiny_job(ds, ds)).json()["id"]
        finish_job_with_scores(db_url, tune, [("rotate", {"angle": 90.0}, -0.5, reference)])
        _keep_a_detector(db_url, tune)
        score = api.post(f"/v1/jobs/{tune}/score", json={"dataset_id": ds}).json()["id"]
        finish_job_with_scores(db_url, score, [("rotate", {}, -0.5, [1.0] * 19 + [80.0])])
        _forget_reference(db_url, score)
        body = api.get(f"/v1/jobs/{score}/threshold").json()
        assert body["reference_job_id"] == tune and [f["index"] for f in body["flagged"]] == [19]
        assert api.delete(f"/v1/jobs/{tune}").status_code == 204
        assert_error(api.get(f"/v1/jobs/{score}/threshold"), 409, "Conflict",
                     "reference=batch")
        assert api.get(f"/v1/jobs/{score}/threshold",
                       params={"reference": "batch"}).status_code == 200
