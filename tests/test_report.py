"""The job report page: what it shows, that it loads nothing from elsewhere, that names are
escaped, and who may open it (API key, or a signed, expiring link to one job)."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service import links
from service.settings import ApiSettings
from ssad_common.db import make_engine, session_scope
from tests.helpers import (
    assert_error,
    client,
    finish_job_with_scores,
    make_key,
    npz,
    png_zip,
    tiny_job,
    upload,
)

HOSTILE = "<img src=x onerror=alert(1)>.png"


def _finished_job(api: TestClient, db_url: str, digits: Any) -> str:
    train, test, _ = digits
    names = [f"{i:02d}.png" for i in range(29)] + [HOSTILE]  # sorted: HOSTILE last
    tr = upload(api, npz(train[:40]), "train.npz").json()["id"]
    te = upload(api, png_zip(test[:30, 0], names), "test.zip").json()["id"]
    job = api.post("/v1/jobs", json=tiny_job(tr, te)).json()
    scores = list(np.linspace(0.0, 1.0, 30))  # the hostile name scores highest
    finish_job_with_scores(db_url, job["id"], [
        ("flip", {}, -0.2, scores[::-1]),
        ("rotate", {"angle": 90.0}, -0.6, scores)])
    return str(job["id"])


def test_report_shows_the_choice_and_loads_nothing_from_elsewhere(
        db_url: str, digits: Any) -> None:
    with client(db_url) as api:
        job_id = _finished_job(api, db_url, digits)
        r = api.get(f"/v1/jobs/{job_id}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert re.search(r'id="best" class="chosen"><b>rotate</b> \(angle=90\)', page)
    assert 'id="status" class="status succeeded"' in page
    # Every image is inlined; no script, style or image comes from another host.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count('src="data:image/png;base64,') >= 5
    for name in ("history", "slice", "trials", "scores", "top"):
        assert f'<figure id="plot-{name}"><img' in page, name
    assert 'id="plot-importances"' in page and "not available" in page  # two families
    # The top-k table names the images, escaped (a name is the uploader's text).
    assert HOSTILE not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert f'href="/v1/jobs/{job_id}/scores?format=csv"' in page


def test_report_of_a_queued_job_says_so_and_follows_it(db_url: str, digits: Any) -> None:
    train, test, _ = digits
    with client(db_url) as api:
        tr = upload(api, npz(train[:40]), "a.npz").json()["id"]
        te = upload(api, npz(test[:30]), "b.npz").json()["id"]
        job = api.post("/v1/jobs", json=tiny_job(tr, te)).json()
        page = api.get(f"/v1/jobs/{job['id']}/report").text
    assert 'class="status queued"' in page and "No trial has finished yet" in page
    assert f'"stream": "/v1/jobs/{job["id"]}/stream"' in page  # the live view's source
    assert "Not yet:" in page  # thresholds need a succeeded job


def test_with_keys_on_a_signed_link_reads_that_job_only(db_url: str, digits: Any) -> None:
    key = make_key(db_url, "alice")
    other = make_key(db_url, "bob")
    with client(db_url, auth="required") as api:
        api.headers["Authorization"] = f"Bearer {key}"
        job_id = _finished_job(api, db_url, digits)
        second = _finished_job(api, db_url, digits)
        link = api.post(f"/v1/jobs/{job_id}/report-link").json()
        assert link["url"].endswith(link["path"]) and "token=" in link["path"]
        token = link["path"].split("token=")[1]
        # The page opened with the key carries a token in its own links.
        assert "token=" in api.get(f"/v1/jobs/{job_id}/report").text
        api.headers.pop("Authorization")

        assert_error(api.get(f"/v1/jobs/{job_id}/report"), 401, "Unauthorized")
        page = api.get(link["path"])
        assert page.status_code == 200 and "rotate" in page.text
        assert f"scores?format=csv&amp;token={token}" in page.text
        for path in ("/scores?format=csv", "/trials", "/plots/scores.png", "/threshold",
                     "/stream", ""):
            sep = "&" if "?" in path else "?"
            r = api.get(f"/v1/jobs/{job_id}{path}{sep}token={token}")
            assert r.status_code == 200, (path, r.text)
        # Not another job, not a write, not the listing, not a tampered or expired token.
        assert_error(api.get(f"/v1/jobs/{second}/report?token={token}"), 401, "Unauthorized")
        # (A route a link cannot open does not take the parameter at all.)
        assert_error(api.post(f"/v1/jobs/{job_id}/cancel?token={token}"), 422,
                     "InvalidRequest", "token")
        assert_error(api.get(f"/v1/jobs?token={token}"), 422, "InvalidRequest", "token")
        assert_error(api.post(f"/v1/jobs/{job_id}/cancel"), 401, "Unauthorized")
        expiry, sig = token.split(".")
        forged = f"{int(expiry) + 3600}.{sig}"
        assert_error(api.get(f"/v1/jobs/{job_id}/report?token={forged}"), 401, "Unauthorized")
        settings = ApiSettings(database_url=db_url)
        engine = make_engine(db_url)
        try:
            with session_scope(engine) as s:
                tenant = links.tenant_for_token(s, settings, job_id, token)
                old, _ = links.make_token(s, settings, job_id, tenant or "",
                                          now=time.time() - 2 * settings.link_ttl_seconds)
        finally:
            engine.dispose()
        assert_error(api.get(f"/v1/jobs/{job_id}/report?token={old}"), 401, "Unauthorized",
                     "expired")
        # Bob's key does not open Alice's job, and Bob's link to it cannot be made.
        api.headers["Authorization"] = f"Bearer {other}"
        assert_error(api.get(f"/v1/jobs/{job_id}/report"), 404, "NotFound")
        assert_error(api.post(f"/v1/jobs/{job_id}/report-link"), 404, "NotFound")


def test_the_family_gap_unit_and_the_trust_verdict_for_new_and_old_jobs(db_url: str) -> None:
    """A selection stored by this version counts its family gap in rank points (the rank
    sum of the objective and MMD, as from 2026-12-01 to 02); one stored while the best was
    the lowest loss (2026-12-02 to 03) in the objective's loss; one stored before either,
    with no unit, in the loss: the API names each unit and the report page says it, rather
    than calling a loss a rank point or the reverse. The trust verdict is served for all:
    stored with the new, derived from the stored agreement for the old (the same
    threshold), and the page gives its advice."""
    sel = {"best_trial": 1, "best_family": "rotate", "runner_up_family": "flip",
           "runner_up_trial": 0, "family_gap_share": 0.5, "top_k": 2, "top_trials": [1, 0],
           "flagged_share": 0.1, "agreement_jaccard": 0.25, "agreement_spearman": -1.0,
           "candidates": 2}
    stored = {"new": {**sel, "family_gap": 1.0, "family_gap_unit": "rank points",
                      "trust": "uncertain"},
              "loss": {**sel, "family_gap": 0.4, "family_gap_unit": "loss",
                       "trust": "uncertain"},
              "old": {**sel, "family_gap": 0.04213, "agreement_jaccard": 0.75}}
    with client(db_url) as api:
        seen = {}
        for kind, selection in stored.items():
            tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), f"{kind}.npz").json()["id"]
            job_id = api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"]
            finish_job_with_scores(db_url, job_id, [("flip", {}, -0.2, [0.0, 1, 2, 3]),
                                                    ("rotate", {}, -0.6, [3.0, 2, 1, 0])],
                                   selection)
            seen[kind] = (api.get(f"/v1/jobs/{job_id}").json()["selection"],
                          api.get(f"/v1/jobs/{job_id}/report").text)
    assert seen["new"][0]["family_gap_unit"] == "rank points"
    assert "is 1 rank point behind" in seen["new"][1]
    assert seen["loss"][0]["family_gap_unit"] == "loss"
    assert "is 0.4 behind in the objective's loss" in seen["loss"][1]
    assert "rank point" not in seen["loss"][1]
    assert seen["old"][0]["family_gap"] == 0.04213
    assert seen["old"][0]["family_gap_unit"] == "loss"
    assert "is 0.0421 behind in the objective's loss" in seen["old"][1]
    assert "rank point" not in seen["old"][1]
    assert seen["new"][0]["trust"] == "uncertain" and seen["old"][0]["trust"] == "decisive"
    # the advice names as many configurations as the verdict compared (top_k 2 here)
    assert "The choice is uncertain" in seen["new"][1]
    assert "scores?ensemble=2)" in seen["new"][1]
    assert "The choice is decisive." in seen["old"][1]
    assert "uncertain" not in seen["old"][1] and "decisive" not in seen["new"][1]


def test_the_ensemble_starts_with_the_top_trials_the_jobs_selection_was_computed_on(
        db_url: str) -> None:
    """``?ensemble=k`` takes the trials the stored selection names first (a job chosen
    under another rule, here one stored while the best was the lowest loss, keeps its own
    best and top trials, not today's order), then the others by the selection rule (the
    rank sum of loss and MMD, which here orders them otherwise than the loss does)."""
    from sqlalchemy import update

    from ssad_common.models import Job

    trials = [("flip", {}, -0.2, [0.0, 1, 2, 3]), ("rotate", {}, -0.6, [3.0, 2, 1, 0]),
              ("invert", {}, -0.4, [0.0, 2, 1, 3])]
    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "t.npz").json()["id"]
        new, ranks = (api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"]
                      for _ in range(2))
        finish_job_with_scores(db_url, new, trials, {"top_trials": [1, 2, 0]})
        finish_job_with_scores(db_url, ranks, trials, {"top_trials": [0, 2, 1]})
        engine = make_engine(db_url)
        try:  # as an earlier release stored it: its best, trial 0, not today's
            with session_scope(engine) as s:
                s.execute(update(Job).where(Job.id == ranks).values(best_trial_number=0))
        finally:
            engine.dispose()
        got = {j: api.get(f"/v1/jobs/{j}/scores", params={"ensemble": k}).json()
               for j, k in ((new, 2), (ranks, 2))}
        assert (got[new]["trial_number"], got[new]["ensemble_trials"]) == (1, [1, 2])
        assert (got[ranks]["trial_number"], got[ranks]["ensemble_trials"]) == (0, [0, 2])
        # Beyond the stored top trials, the others by the rank sum: loss ranks rotate 1,
        # invert 2, flip 3; MMD ranks flip 1, rotate 2, invert 3; sums rotate 3, flip 4,
        # invert 5 (by loss alone invert would come before flip).
        finish_job_with_scores(db_url, (short := api.post(
            "/v1/jobs", json=tiny_job(tr, tr)).json()["id"]), trials, {"top_trials": [1]},
            mmd=[0.0, 0.5, 0.9])
        assert api.get(f"/v1/jobs/{short}/scores", params={"ensemble": 3}).json()[
            "ensemble_trials"] == [1, 0, 2]
