"""Every endpoint and its errors, through HTTP, on a real Postgres and on SQLite."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ssad_common.models import (
    MODEL_ARTIFACT,
    Blob,
    Dataset,
    Job,
    JobArtifact,
    JobEvent,
    JobTrial,
    TrialScore,
)
from tests.helpers import (
    ROOT,
    assert_error,
    client,
    count,
    finish_job_with_scores,
    npz,
    png_zip,
    row_counts,
    tiny_job,
    upload,
)

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (20, 8, 8), dtype=np.uint8)
RGB = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with client(db_url, max_upload_bytes=200_000) as c:
        yield c


def test_upload_get_list_delete(api: TestClient, db_url: str) -> None:
    r = upload(api, npz(GREY), "train.npz")
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["name"], d["n_samples"], d["channels"], d["height"], d["width"]) == (
        "train.npz", 20, 1, 8, 8)
    assert len(d["sha256"]) == 64 and d["size_bytes"] > 20 * 64
    assert api.get(f"/v1/datasets/{d['id']}").json() == d
    again = upload(api, npz(GREY), "copy.npz", name="same pixels").json()
    assert again["sha256"] == d["sha256"] and again["id"] != d["id"]
    assert count(db_url, Blob) == 1  # content-addressed: stored once
    listing = api.get("/v1/datasets").json()
    assert listing["total"] == 2 and {x["id"] for x in listing["items"]} == {d["id"], again["id"]}
    assert api.delete(f"/v1/datasets/{d['id']}").status_code == 204
    assert count(db_url, Blob) == 1  # still used by the copy
    assert api.delete(f"/v1/datasets/{again['id']}").status_code == 204
    assert count(db_url, Blob) == 0
    assert_error(api.get(f"/v1/datasets/{d['id']}"), 404, "NotFound")
    assert_error(api.delete(f"/v1/datasets/{d['id']}"), 404, "NotFound")


def test_zip_upload_keeps_names_sorted(api: TestClient) -> None:
    r = upload(api, png_zip(GREY[:3], ["c.png", "a.png", "b.png"]), "parts.zip")
    assert r.status_code == 201, r.text
    assert r.json()["n_samples"] == 3


@pytest.mark.parametrize("data, filename, status, error, contains", [
    (b"garbage", "x.npz", 422, "InvalidDataset", "not a valid .npz"),
    (b"garbage", "x.txt", 422, "InvalidDataset", "unsupported file type"),
    (npz(np.zeros((0, 8, 8), np.uint8)), "x.npz", 422, "InvalidDataset", "empty"),
    (npz(np.full((2, 8, 8), np.nan, np.float32)), "x.npz", 422, "InvalidDataset", "NaN"),
    (b"\x00" * 300_000, "big.npy", 413, "PayloadTooLarge", "limit"),
])
def test_bad_uploads_are_refused_and_store_nothing(
    api: TestClient, db_url: str, data: bytes, filename: str, status: int, error: str,
    contains: str,
) -> None:
    assert_error(upload(api, data, filename), status, error, contains)
    assert count(db_url, Dataset) == 0 and count(db_url, Blob) == 0


def test_upload_needs_a_file_and_a_sane_name(api: TestClient) -> None:
    assert_error(api.post("/v1/datasets"), 422, "ValidationError", "file")
    assert_error(upload(api, npz(GREY), "a.npz", name="../../etc/passwd"), 422,
                 "InvalidRequest", "name")
    assert_error(upload(api, npz(GREY), "a.npz", name="x" * 300), 422, "ValidationError")


@pytest.fixture
def pair(api: TestClient) -> tuple[str, str]:
    train = upload(api, npz(GREY[:12]), "train.npz").json()["id"]
    test = upload(api, npz(GREY[12:]), "test.npz").json()["id"]
    return train, test


def test_create_get_list_and_cancel_a_queued_job(api: TestClient, pair: tuple[str, str],
                                                 db_url: str) -> None:
    r = api.post("/v1/jobs", json=tiny_job(*pair, objective="st-ssad", contamination=0.2))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["best"] is None and job["error"] is None
    assert job["progress"] == {"n_trials": 3, "trials_completed": 0, "current_trial": None,
                               "trials_planned": 5, "train_steps_done": 0,
                               "train_steps_planned": 18, "estimated_remaining_s": None}
    # The default strategy's plan, stated at creation: 3 families screened at 2 steps (one
    # trial-equivalent), then 2 full-length trials of 6 steps: the budget 3 × 6, exactly.
    assert job["plan"] == {
        "strategy": "staged", "budget_trial_equivalents": 3, "budget_train_steps": 18,
        "planned_train_steps": 18,
        "screen": {"trials": 3, "train_steps_each": 2,
                   "families": ["invert", "flip", "rotate"], "extra": []},
        "refine": {"trials": 2, "train_steps_each": 6}, "skipped_families": []}
    assert job["spec"]["strategy"] == "staged" and job["selection"] is None
    assert job["spec"]["objective"] == "st-ssad"
    assert job["spec"]["search_space"] == {"augmentations": ["invert", "flip", "rotate"]}
    assert api.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert api.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 1
    assert api.get("/v1/jobs", params={"status": "running"}).json()["total"] == 0
    assert_error(api.get(f"/v1/jobs/{job['id']}/scores"), 409, "Conflict", "queued")
    assert_error(api.get(f"/v1/jobs/{job['id']}/scores", params={"ensemble": 3}), 409,
                 "Conflict", "queued")
    assert_error(api.get(f"/v1/jobs/{job['id']}/scores", params={"ensemble": 1}), 422,
                 "ValidationError", "ensemble")
    assert_error(api.get(f"/v1/jobs/{job['id']}/trials/0/scores"), 404, "NotFound")
    assert api.get(f"/v1/jobs/{job['id']}/trials").json() == {"job_id": job["id"], "trials": []}
    # A dataset a job uses cannot be deleted; nor can a queued job.
    assert_error(api.delete(f"/v1/datasets/{pair[0]}"), 409, "Conflict", "used by a job")
    assert_error(api.delete(f"/v1/jobs/{job['id']}"), 409, "Conflict", "cancel it first")
    c1 = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert c1.status_code == 200 and c1.json()["status"] == "cancelled"
    c2 = api.post(f"/v1/jobs/{job['id']}/cancel")  # idempotent
    assert c2.status_code == 200 and c2.json()["status"] == "cancelled"
    # An ended job's 409 does not promise a result that will never come.
    assert_error(api.get(f"/v1/jobs/{job['id']}/scores"), 409, "Conflict",
                 "is cancelled and has no result; the scores of each trial that finished, if "
                 f"any, are at /v1/jobs/{job['id']}/trials/{{number}}/scores")
    events = api.get(f"/v1/jobs/{job['id']}/events").json()["events"]
    assert [e["status"] for e in events] == ["queued", "cancelled"]
    # The 409 said what to do: delete the (ended) job, then the dataset goes.
    assert_error(api.delete(f"/v1/datasets/{pair[0]}"), 409, "Conflict",
                 "DELETE /v1/jobs/{id}")
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert_error(api.get(f"/v1/jobs/{job['id']}"), 404, "NotFound")
    assert_error(api.delete(f"/v1/jobs/{job['id']}"), 404, "NotFound")
    assert count(db_url, JobEvent) == 0
    assert api.delete(f"/v1/datasets/{pair[0]}").status_code == 204
    assert api.delete(f"/v1/datasets/{pair[1]}").status_code == 204


def test_deleting_a_finished_job_removes_all_it_stored(api: TestClient, pair: tuple[str, str],
                                                       db_url: str) -> None:
    keep = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    gone = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    api.post(f"/v1/jobs/{keep}/cancel")
    finish_job_with_scores(db_url, gone, [("invert", {}, 0.5, [1.0] * 8),
                                          ("flip", {}, 0.2, [2.0] * 8)])
    from ssad_common.db import make_engine, session_scope

    engine = make_engine(db_url)
    with session_scope(engine) as s:  # what a worker stores beside trials: the detector
        s.add(JobArtifact(job_id=gone, name=MODEL_ARTIFACT, content_type="x", data=b"w",
                          meta={}))
    engine.dispose()
    tables = (JobTrial, TrialScore, JobEvent, JobArtifact)
    before = row_counts(db_url, *tables)
    assert before == {"job_trials": 2, "trial_scores": 16, "job_events": 5,
                      "job_artifacts": 1}, before
    assert api.get(f"/v1/jobs/{gone}/scores?format=csv").status_code == 200
    r = api.delete(f"/v1/jobs/{gone}")
    assert r.status_code == 204 and r.content == b""
    assert_error(api.delete(f"/v1/jobs/{gone}"), 404, "NotFound")  # again: already gone
    assert row_counts(db_url, *tables) == {"job_trials": 0, "trial_scores": 0,
                                           "job_events": 2, "job_artifacts": 0}
    for path in ("", "/scores", "/trials", "/events", "/threshold"):
        assert_error(api.get(f"/v1/jobs/{gone}{path}"), 404, "NotFound")
    assert [j["id"] for j in api.get("/v1/jobs").json()["items"]] == [keep]
    assert_error(api.delete(f"/v1/datasets/{pair[0]}"), 409, "Conflict", keep)


@pytest.mark.parametrize("change, status, error, contains", [
    ({"train_dataset_id": "nope"}, 404, "NotFound", "train dataset"),
    ({"n_trials": 0}, 422, "ValidationError", "n_trials"),
    ({"n_trials": 10**9}, 403, "QuotaExceeded", "trials per job"),
    ({"train_dataset_id": "\u0000"}, 422, "ValidationError", "train_dataset_id"),
    ({"test_dataset_id": "x" * 65}, 422, "ValidationError", "test_dataset_id"),
    ({"train_steps": 10**9}, 422, "ValidationError", "train_steps"),
    ({"objective": "auroc"}, 422, "ValidationError", "objective"),
    ({"contamination": 1.0}, 422, "ValidationError", "contamination"),
    ({"search_space": {"augmentations": ["teleport"]}}, 422, "InvalidRequest", "unknown"),
    ({"search_space": {"augmentations": []}}, 422, "ValidationError", "augmentations"),
    ({"search_space": {"patch_size": [0.3, 0.1]}}, 422, "InvalidRequest", "min <= max"),
    ({"search_space": {"patch_size": [0.5, 2.0]}}, 422, "InvalidRequest", "patch_size"),
    ({"search_space": {"augmentations": ["cutout"], "colour": 1}}, 422, "ValidationError",
     "colour"),
    ({"labels": [0, 1]}, 422, "ValidationError", "labels"),
])
def test_bad_job_requests(api: TestClient, pair: tuple[str, str], db_url: str,
                          change: dict[str, object], status: int, error: str,
                          contains: str) -> None:
    assert_error(api.post("/v1/jobs", json={**tiny_job(*pair), **change}), status, error,
                 contains)
    assert count(db_url, Job) == 0


def test_a_body_that_is_not_json_or_is_missing_is_said_so(api: TestClient,
                                                         db_url: str) -> None:
    json_type = {"content-type": "application/json"}
    cut = '{"train_dataset_id": "a", "te'
    assert_error(api.post("/v1/jobs", content=cut, headers=json_type), 422, "ValidationError",
                 "the body is not valid JSON: Unterminated string starting at character 26")
    assert_error(api.post("/v1/jobs", content="", headers=json_type), 422,
                 "ValidationError", "the request needs a JSON body")
    assert_error(api.post("/v1/jobs"), 422, "ValidationError", "the request needs a JSON body")
    for body, headers in (('{"n_trials": 3}', {}), ("[]", json_type), ("null", json_type)):
        assert_error(api.post("/v1/jobs", content=body, headers=headers), 422,
                     "ValidationError", "the body must be a JSON object, sent with "
                     "content-type: application/json")
    assert count(db_url, Job) == 0


def test_channel_mismatch_is_refused_at_creation(api: TestClient) -> None:
    grey = upload(api, npz(GREY), "g.npz").json()["id"]
    rgb = upload(api, npz(RGB), "c.npz").json()["id"]
    assert_error(api.post("/v1/jobs", json=tiny_job(grey, rgb)), 422, "IncompatibleDatasets",
                 "channel")


def test_unknown_routes_and_methods_use_the_error_shape(api: TestClient) -> None:
    assert_error(api.get("/v1/jobs/nope"), 404, "NotFound", "nope")
    assert_error(api.get("/v1/nothing"), 404, "NotFound")
    r = api.put("/v1/jobs")
    assert_error(r, 405, "MethodNotAllowed")
    assert r.headers["allow"] == "GET, POST"
    assert api.put("/v1/datasets/x").headers["allow"] == "DELETE, GET"
    assert api.patch("/v1/jobs/x").headers["allow"] == "DELETE, GET"
    assert api.get("/v1/jobs/x/cancel").headers["allow"] == "POST"
    assert_error(api.post("/v1/jobs", content=b"{not json",
                          headers={"content-type": "application/json"}), 422,
                 "ValidationError")
    assert_error(api.post("/v1/jobs/nope/cancel"), 404, "NotFound")


@pytest.mark.parametrize("method, path, where", [
    # Postgres refuses a NUL in text, and bigint (or int4) cannot hold these: each used to
    # be a 500. Now refused before any query runs, naming the parameter.
    ("GET", "/v1/datasets/%00", "dataset_id"),
    ("DELETE", "/v1/datasets/a%00b", "dataset_id"),
    ("GET", "/v1/jobs/%00", "job_id"),
    ("GET", "/v1/jobs/" + "x" * 65, "job_id"),
    ("POST", "/v1/jobs/%01/cancel", "job_id"),
    ("GET", "/v1/jobs?offset=9223372036854775808", "offset"),
    ("GET", "/v1/jobs?offset=2147483648", "offset"),
    ("GET", "/v1/datasets?offset=9223372036854775808", "offset"),
    ("GET", "/v1/jobs/j/trials/99999999999999999999/scores", "number"),
    ("GET", "/v1/jobs/j/trials/2147483648/scores", "number"),
    ("GET", "/v1/jobs/j/trials/-1/scores", "number"),
])
def test_malformed_ids_and_out_of_range_integers_are_422(api: TestClient, method: str,
                                                        path: str, where: str) -> None:
    assert_error(api.request(method, path), 422, "ValidationError", where)


def test_score_request_with_a_nul_id_is_422(api: TestClient) -> None:
    assert_error(api.post("/v1/jobs/j/score", json={"dataset_id": "\u0000"}), 422,
                 "ValidationError", "dataset_id")


def test_unknown_query_parameters_are_refused_by_name(api: TestClient,
                                                      pair: tuple[str, str]) -> None:
    assert_error(api.get("/v1/jobs", params={"stauts": "failed"}), 422, "InvalidRequest",
                 "unknown query parameter 'stauts' (this endpoint takes: include, kind, limit, "
                 "offset, status)")
    assert_error(api.get("/v1/datasets", params={"page": 2, "x": 1}), 422, "InvalidRequest",
                 "'page', 'x'")
    assert_error(api.get(f"/v1/datasets/{pair[0]}", params={"verbose": 1}), 422,
                 "InvalidRequest", "takes: none")
    assert_error(api.get("/v1/augmentations", params={"q": 1}), 422, "InvalidRequest", "'q'")
    assert api.get("/v1/jobs", params={"status": "queued", "limit": 5}).status_code == 200


def tuning_job_and_its_scoring_job(api: TestClient, pair: tuple[str, str],
                                   db_url: str) -> tuple[str, str]:
    """A succeeded tuning job with a stored detector, and a queued job scoring the test set
    with it."""
    from ssad_common.db import make_engine, session_scope

    tune = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    finish_job_with_scores(db_url, tune, [("invert", {}, 0.5, [1.0] * 8)])
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        s.add(JobArtifact(job_id=tune, name=MODEL_ARTIFACT, content_type="x", data=b"w",
                          meta={}))
    engine.dispose()
    score = api.post(f"/v1/jobs/{tune}/score", json={"dataset_id": pair[1]}).json()["id"]
    return tune, score


def test_a_tuning_job_is_kept_while_its_scoring_jobs_run(api: TestClient,
                                                        pair: tuple[str, str],
                                                        db_url: str) -> None:
    tune, score = tuning_job_and_its_scoring_job(api, pair, db_url)
    assert_error(api.delete(f"/v1/jobs/{tune}"), 409, "Conflict", score)  # needs the detector
    api.post(f"/v1/jobs/{score}/cancel")
    assert api.delete(f"/v1/jobs/{tune}").status_code == 204
    assert_error(api.post(f"/v1/jobs/{tune}/score", json={"dataset_id": pair[1]}), 404,
                 "NotFound")
    assert [j["id"] for j in api.get("/v1/jobs").json()["items"]] == [score]


def test_job_list_filters_by_kind_and_leaves_out_specs_unless_asked(
        api: TestClient, pair: tuple[str, str], db_url: str) -> None:
    tune, score = tuning_job_and_its_scoring_job(api, pair, db_url)

    def ids(**params: str) -> list[str]:
        r = api.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["items"]]

    assert ids() == [score, tune]
    assert ids(kind="tune") == [tune] and ids(kind="score") == [score]
    assert api.get("/v1/jobs", params={"kind": "score"}).json()["total"] == 1
    assert ids(kind="score", status="succeeded") == []
    assert_error(api.get("/v1/jobs", params={"kind": "train"}), 422, "ValidationError", "kind")
    items = api.get("/v1/jobs").json()["items"]
    assert all(j["spec"] is None for j in items)
    assert {j["kind"] for j in items} == {"tune", "score"}
    full = api.get("/v1/jobs", params={"include": "spec"}).json()["items"]
    assert [j["spec"] for j in full] == [api.get(f"/v1/jobs/{j}").json()["spec"]
                                         for j in (score, tune)]
    assert api.get(f"/v1/jobs/{tune}").json()["spec"]["n_trials"] == 3  # one job: in full
    # Each spec is its kind's contract (ssad_common/jobspec.py), as the worker will read it.
    from ssad_common.jobspec import ScoreSpec, TuneSpec, load_spec

    specs = {j["id"]: load_spec(j["kind"], j["spec"]) for j in full}
    assert isinstance(specs[tune], TuneSpec) and specs[tune].n_trials == 3
    assert isinstance(specs[score], ScoreSpec) and specs[score].source_job_id == tune
    assert specs[score].threshold_reference is not None
    assert [j["spec"]["kind"] for j in full] == ["score", "tune"]


def test_csv_scores_are_an_attachment_with_a_name(api: TestClient, pair: tuple[str, str],
                                                  db_url: str) -> None:
    job = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    finish_job_with_scores(db_url, job, [("invert", {}, 0.5, [1.0] * 8),
                                         ("flip", {}, 0.7, [2.0] * 8)])
    r = api.get(f"/v1/jobs/{job}/scores", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f'attachment; filename="{job}-scores.csv"'
    r = api.get(f"/v1/jobs/{job}/trials/1/scores", params={"format": "csv"})
    assert r.headers["content-disposition"] == (
        f'attachment; filename="{job}-trial-1-scores.csv"')
    assert "content-disposition" not in api.get(f"/v1/jobs/{job}/scores").headers  # JSON


def test_the_score_route_checks_its_query_as_declared_parameters_are_checked(
        api: TestClient, pair: tuple[str, str], db_url: str) -> None:
    """GET /v1/jobs/{id}/scores reads its query itself (service.params.read_query, for
    throughput): its errors are FastAPI's own for a declared parameter, word for word, an
    undeclared parameter is refused as on every route, and its docs list what it reads."""
    job = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    finish_job_with_scores(db_url, job, [("invert", {}, 0.5, [1.0] * 8),
                                         ("flip", {}, 0.7, [2.0] * 8)])
    scores = f"/v1/jobs/{job}/scores"
    for query in ({"format": "xml"}, {"format": ""}, {"format": "csv", "wat": "1"}):
        read = api.get(scores, params=query)
        declared = api.get(f"/v1/jobs/{job}/trials/1/scores", params=query)  # FastAPI's
        assert read.status_code == declared.status_code == 422, query
        assert read.json()["error"] == declared.json()["error"], query
        assert read.json()["detail"].replace("ensemble, format, token", "format, token") == (
            declared.json()["detail"]), query
    assert_error(api.get(scores, params={"ensemble": "two"}), 422, "ValidationError",
                 "query.ensemble: Input should be a valid integer")
    assert_error(api.get(scores, params={"ensemble": 11}), 422, "ValidationError",
                 "query.ensemble: Input should be less than or equal to 10")
    # A repeated parameter: the last value counts, as FastAPI reads a declared one.
    assert_error(api.get(scores, params=[("ensemble", "3"), ("ensemble", "1")]), 422,
                 "ValidationError", "query.ensemble")
    assert_error(api.get(scores, params={"token": "t" * 257}), 422, "ValidationError",
                 "query.token")
    assert_error(api.get(scores, params={"formt": "csv"}), 422, "InvalidRequest",
                 "'formt' (this endpoint takes: ensemble, format, token)")
    r = api.get(scores, params=[("format", "json"), ("format", "csv")])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert api.get(scores, params={"format": "json", "token": "ignored"}).json()[
        "trial_number"] == 0
    op = api.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/scores"]["get"]
    assert [(p["name"], p["in"]) for p in op["parameters"]] == [
        ("job_id", "path"), ("format", "query"), ("ensemble", "query"), ("token", "query")]
    ensemble = op["parameters"][2]["schema"]["anyOf"][0]
    assert (ensemble["minimum"], ensemble["maximum"]) == (2, 10)
    assert op["security"] == [{"ApiKey": []}]


def test_the_job_route_checks_its_query_as_declared_parameters_are_checked(
        api: TestClient, pair: tuple[str, str]) -> None:
    """GET /v1/jobs/{id} reads its ``token`` and its caller itself too (the route clients
    poll most): the same errors as a route that declares the token (the trials route),
    an undeclared parameter refused, and its docs list what it reads."""
    job = api.post("/v1/jobs", json=tiny_job(*pair)).json()["id"]
    for query in ({"token": "t" * 257}, {"wat": "1"}):
        read = api.get(f"/v1/jobs/{job}", params=query)
        declared = api.get(f"/v1/jobs/{job}/trials", params=query)  # FastAPI's
        assert read.status_code == declared.status_code == 422, query
        assert read.json()["error"] == declared.json()["error"], query
        assert read.json()["detail"].split(" (this endpoint")[0] == (
            declared.json()["detail"].split(" (this endpoint")[0]), query
    assert_error(api.get(f"/v1/jobs/{job}", params={"wat": "1"}), 422, "InvalidRequest",
                 "'wat' (this endpoint takes: token)")
    assert api.get(f"/v1/jobs/{job}", params={"token": "ignored"}).json()["id"] == job
    assert_error(api.get("/v1/jobs/no-such-job"), 404, "NotFound")
    op = api.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}"]["get"]
    assert [(p["name"], p["in"]) for p in op["parameters"]] == [
        ("job_id", "path"), ("token", "query")]
    assert op["security"] == [{"ApiKey": []}]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobOut"}


def test_health_readiness_reference_and_openapi(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["status"] == "ready"
    ref = api.get("/v1/augmentations").json()
    assert "cutout" in ref["default_augmentations"] and ref["default_objective"] == "dsv"
    spec = api.get("/openapi.json").json()
    assert "ErrorResponse" in spec["components"]["schemas"]
    create = spec["paths"]["/v1/jobs"]["post"]
    assert {"404", "422"} <= set(create["responses"])
    assert "example" in spec["components"]["schemas"]["JobCreate"]
    docs = api.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    js = api.get("/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000


def test_readyz_is_503_on_an_unmigrated_database(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with client(f"sqlite:///{tmp_path / 'empty.db'}") as c:
        assert_error(c.get("/readyz"), 503, "ServiceUnavailable", "alembic upgrade head")


def test_the_api_process_never_imports_torch() -> None:
    code = "import sys, service.app, service.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_objective_names_match_the_worker_registry() -> None:
    from typing import get_args

    from service.jobs.schemas import ObjectiveName, ScorerName
    from worker.core.objectives import OBJECTIVES
    from worker.core.scoring import SCORERS

    assert tuple(get_args(ObjectiveName)) == tuple(OBJECTIVES)
    assert tuple(get_args(ScorerName)) == tuple(SCORERS)


def test_storing_the_same_blob_twice_is_a_no_op(db_url: str) -> None:
    """What the loser of two simultaneous identical uploads does: nothing, no error."""
    from ssad_common.blobs import insert_blob, read_blob
    from ssad_common.db import make_engine, session_factory

    engine = make_engine(db_url)
    try:
        for expected in (True, False):
            with session_factory(engine)() as s:
                assert insert_blob(s, "ab" * 32, 100, [b"x" * 100]) is expected
                s.commit()
        with session_factory(engine)() as s:
            assert read_blob(s, "ab" * 32) == b"x" * 100
    finally:
        engine.dispose()


def test_every_operation_documents_an_example(api: TestClient) -> None:
    """/docs shows an example for every request body and every success response."""
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def has_example(content: dict[str, object]) -> bool:
        schema = content.get("schema", {})
        assert isinstance(schema, dict)
        if "$ref" in schema:
            schema = schemas[str(schema["$ref"]).rsplit("/", 1)[-1]]
        return any(k in content or k in schema for k in ("example", "examples"))

    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            bodies = [("request", c) for c in
                      op.get("requestBody", {}).get("content", {}).values()]
            bodies += [(code, c) for code, r in op["responses"].items()
                       if code.startswith("2") for c in r.get("content", {}).values()]
            missing += [f"{method.upper()} {path} {what}" for what, c in bodies
                        if not has_example(c)]
    assert missing == [], missing


def test_rendered_bodies_are_bounded_by_bytes_least_recently_used_out_first() -> None:
    from service.jobs.cache import Rendered

    cache, calls = Rendered(max_bytes=10), []

    def body(b: bytes) -> bytes:
        calls.append(b)
        return b

    assert cache.get(("j", 0, "a"), lambda: body(b"aaaa")) == b"aaaa"
    assert cache.get(("j", 0, "b"), lambda: body(b"bbbb")) == b"bbbb"
    assert cache.get(("j", 0, "a"), lambda: body(b"new!")) == b"aaaa"  # kept, now the newest
    cache.get(("j", 0, "c"), lambda: body(b"cccc"))  # 12 bytes: the oldest ("b") goes
    assert cache.get(("j", 0, "b"), lambda: body(b"BBBB")) == b"BBBB"
    assert cache.get(("j", 0, "big"), lambda: body(b"x" * 11)) == b"x" * 11  # over the bound
    cache.get(("j", 0, "big"), lambda: body(b"y" * 11))  # never kept: rendered again
    assert calls == [b"aaaa", b"bbbb", b"cccc", b"BBBB", b"x" * 11, b"y" * 11]
