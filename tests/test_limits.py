"""What a job may cost is bounded when it is created (issue 9 item 9): |Y| (set by the
contamination), the batch versus the train set, and n_trials × train_steps × batch_size
against the tenant's compute quota. Each refusal is a clear 4xx and stores nothing."""

from __future__ import annotations

import numpy as np

from service import tenants
from ssad_common.db import make_engine, session_scope
from ssad_common.models import Job, JobEvent
from ssad_common.search_space import augmented_count
from tests.helpers import assert_error, client, count, npz, tiny_job, upload


def _dataset(api, n: int) -> str:  # type: ignore[no-untyped-def]
    r = upload(api, npz(np.zeros((n, 8, 8), np.uint8)), "a.npz")
    assert r.status_code in (200, 201), r.text  # 200: the same content was uploaded before
    return str(r.json()["id"])


def test_contamination_whose_augmented_set_is_too_large_is_refused(db_url: str) -> None:
    """r = 0.999 on 120 images made |Y| = 119,880 augmented images per trial (7 minutes,
    1.7 GB for a 3-step trial). The answer names |Y|, the limit and the largest r that fits."""
    with client(db_url) as api:
        ds = _dataset(api, 120)
        r = api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.999))
        assert_error(r, 422, "InvalidRequest", "|Y| = 119880")
        assert "SSAD_MAX_AUGMENTED_IMAGES" in r.json()["detail"]
        assert "contamination <= 0.943" in r.json()["detail"]
        assert_error(api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.95)), 422,
                     "InvalidRequest", "|Y| = 2280")
        assert count(db_url, Job) == 0
        assert augmented_count(120, 0.943) <= 2000  # the suggested bound does fit
        assert api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.943)
                        ).status_code == 202
    with client(db_url, max_augmented_images=50) as api:  # the limit is a setting
        ds = _dataset(api, 120)
        assert_error(api.post("/v1/jobs", json=tiny_job(ds, ds, contamination=0.5)), 422,
                     "InvalidRequest", "over the limit of 50")


def test_a_batch_larger_than_the_train_set_is_clamped_and_said_so(db_url: str) -> None:
    """batch_size 4096 on 2 images took 6.7 GB and ended in a NaN: the batch is clamped to
    the train set's size, and the job's spec and first event say so."""
    with client(db_url) as api:
        ds = _dataset(api, 2)
        r = api.post("/v1/jobs", json=tiny_job(ds, ds, batch_size=4096))
        assert r.status_code == 202, r.text
        spec = r.json()["spec"]
        assert (spec["batch_size"], spec["requested_batch_size"]) == (2, 4096)
        events = api.get(f"/v1/jobs/{r.json()['id']}/events").json()["events"]
        assert "batch_size 4096 clamped to 2" in events[0]["message"]
        fits = api.post("/v1/jobs", json=tiny_job(ds, ds, batch_size=2)).json()["spec"]
        assert fits["batch_size"] == 2 and "requested_batch_size" not in fits


def test_compute_over_the_tenants_quota_is_refused_and_a_tenant_may_get_more(
        db_url: str) -> None:
    with client(db_url, max_compute_per_job=1000) as api:
        ds = _dataset(api, 4)
        assert api.post("/v1/jobs", json=tiny_job(ds, ds)).status_code == 202  # 3×6×4 = 72
        big = tiny_job(ds, ds, train_steps=100, batch_size=4096)  # batch clamped to 4
        r = api.post("/v1/jobs", json=big)
        assert_error(r, 403, "ComputeQuotaExceeded", "3 × 100 × 4 = 1,200 images")
        assert "quota of 1,000 per job" in r.json()["detail"]
        assert (count(db_url, Job), count(db_url, JobEvent)) == (1, 1)
        engine = make_engine(db_url)
        try:
            with session_scope(engine) as s:  # the operator raises this tenant's quota
                tenants.set_quotas(s, "default", max_compute_per_job=5000)
        finally:
            engine.dispose()
        assert api.post("/v1/jobs", json=big).status_code == 202


def test_the_detector_choice_is_checked_and_its_compute_counted(db_url: str) -> None:
    """ResNet-18 at 128 px costs about 46 small-detector images per image: the quota counts
    it, its working size must be 128-256, and the job's spec keeps the choice."""
    with client(db_url, max_compute_per_job=1000) as api:
        ds = _dataset(api, 4)  # 3 trials × 6 steps × 4 images = 72 images
        r = api.post("/v1/jobs", json=tiny_job(ds, ds, detector="resnet18"))
        assert_error(r, 403, "ComputeQuotaExceeded", "the resnet18 detector's cost")
        assert "72 images × 46.2" in r.json()["detail"]
        r = api.post("/v1/jobs", json=tiny_job(ds, ds, detector="resnet18", image_size=64))
        assert_error(r, 422, "InvalidRequest", "image_size must be in [128, 256]")
        assert count(db_url, Job) == 0
        ok = api.post("/v1/jobs", json=tiny_job(ds, ds, train_steps=2, batch_size=2,
                                                detector="resnet18", image_size=128))
        assert ok.status_code == 202, ok.text  # 3 × 2 × 2 × 46.2 = 555
        spec = ok.json()["spec"]
        assert (spec["detector"], spec["image_size"], spec["images"]["working_size"]) == (
            "resnet18", 128, 128)
        small = api.post("/v1/jobs", json=tiny_job(ds, ds, image_size=48)).json()["spec"]
        assert (small["detector"], small["images"]["working_size"]) == ("small", 48)
