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
