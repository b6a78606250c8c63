"""API keys, tenant isolation, quotas and Idempotency-Key, on Postgres and SQLite."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from service import tenants
from ssad_common.db import make_engine, session_scope
from ssad_common.models import ApiKey, Blob, Dataset, IdempotencyKey, Job
from tests.helpers import ROOT, assert_error, client, count, make_key, npz, tiny_job, upload

GREY = np.random.default_rng(0).integers(0, 255, (6, 8, 8), dtype=np.uint8)


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with client(db_url, auth="required") as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_need_a_valid_unrevoked_key(api: TestClient, db_url: str) -> None:
    assert_error(api.get("/v1/datasets"), 401, "Unauthorized", "Bearer")
    assert api.get("/v1/datasets").headers["www-authenticate"] == "Bearer"
    assert_error(api.get("/v1/datasets", headers=bearer("ssad_not-a-key")), 401,
                 "Unauthorized", "unknown or revoked")
    assert_error(api.get("/v1/datasets", headers={"Authorization": "Basic eDp5"}), 401,
                 "Unauthorized")
    key = make_key(db_url, "acme")
    assert api.get("/v1/datasets", headers=bearer(key)).status_code == 200
    # Operations endpoints stay open (probes, the docs page); all of /v1 needs the key.
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert api.get(path).status_code == 200, path
    assert_error(api.get("/v1/augmentations"), 401, "Unauthorized", "Bearer")
    # The score route reads its own query (tests/test_api.py); the caller comes first there
    # too: no key is a 401, whatever the query.
    assert_error(api.get("/v1/jobs/x/scores", params={"format": "xml"}), 401,
                 "Unauthorized", "Bearer")
    assert api.get("/v1/jobs/x/scores").headers["www-authenticate"] == "Bearer"
    assert "cutout" in api.get("/v1/augmentations", headers=bearer(key)).json()[
        "default_augmentations"]
    engine = make_engine(db_url)
    with session_scope(engine) as s:  # only the hash is stored
        row = s.scalars(select(ApiKey)).one()
        assert row.key_hash == tenants.hash_key(key) and key not in (row.key_hash, row.prefix)
        tenants.revoke_key(s, row.id[:8])
    engine.dispose()
    assert_error(api.get("/v1/datasets", headers=bearer(key)), 401, "Unauthorized", "revoked")


def test_another_tenants_data_is_not_found(api: TestClient, db_url: str) -> None:
    a, b = bearer(make_key(db_url, "acme")), bearer(make_key(db_url, "globex"))
    ds = upload_as(api, a, "a.npz")
    job = api.post("/v1/jobs", json=tiny_job(ds, ds), headers=a).json()["id"]
    for method, path in [("GET", f"/v1/datasets/{ds}"), ("DELETE", f"/v1/datasets/{ds}"),
                         ("GET", f"/v1/jobs/{job}"), ("POST", f"/v1/jobs/{job}/cancel"),
                         ("GET", f"/v1/jobs/{job}/trials"), ("GET", f"/v1/jobs/{job}/events"),
                         ("GET", f"/v1/jobs/{job}/scores"),
                         ("GET", f"/v1/jobs/{job}/trials/0/scores"),
                         ("DELETE", f"/v1/jobs/{job}")]:
        r = api.request(method, path, headers=b)
        assert_error(r, 404, "NotFound")  # never 403: no existence leak
        # ... and the same answer as for an id that exists nowhere.
        missing = api.request(method, path.replace(ds, "0" * 36).replace(job, "0" * 36),
                              headers=b)
        assert missing.status_code == 404
    assert_error(api.post("/v1/jobs", json=tiny_job(ds, ds), headers=b), 404, "NotFound",
                 "train dataset")
    assert api.get("/v1/datasets", headers=b).json() == {"items": [], "total": 0}
    assert api.get("/v1/jobs", headers=b).json() == {"items": [], "total": 0}
    assert api.get("/v1/jobs", headers=a).json()["total"] == 1
    assert api.get(f"/v1/jobs/{job}", headers=a).json()["status"] == "queued"


def upload_as(api: TestClient, headers: dict[str, str], filename: str,
              data: bytes | None = None, **extra_headers: str) -> str:
    r = api.post("/v1/datasets", files={"file": (filename, data or npz(GREY))},
                 headers={**headers, **extra_headers})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_quotas_per_tenant(db_url: str) -> None:
    size = 6 * 8 * 8 + 128  # one GREY dataset's canonical .npy bytes
    with client(db_url, auth="required", max_active_jobs=2, max_stored_bytes=2 * size,
                max_trials_per_job=5) as api:
        a, b = bearer(make_key(db_url, "acme")), bearer(make_key(db_url, "globex"))
        ds = upload_as(api, a, "a.npz")
        upload_as(api, a, "b.npz")
        r = api.post("/v1/datasets", files={"file": ("c.npz", npz(GREY))}, headers=a)
        assert_error(r, 403, "QuotaExceeded", "quota")
        assert count(db_url, Dataset) == 2
        upload_as(api, b, "c.npz")  # the other tenant's quota is its own

        assert_error(api.post("/v1/jobs", json=tiny_job(ds, ds, n_trials=6), headers=a),
                     403, "QuotaExceeded", "trials per job")
        ids = [api.post("/v1/jobs", json=tiny_job(ds, ds), headers=a).json()["id"]
               for _ in range(2)]
        r = api.post("/v1/jobs", json=tiny_job(ds, ds), headers=a)
        assert_error(r, 429, "TooManyActiveJobs", "queued or running")
        assert r.headers["retry-after"]
        assert count(db_url, Job) == 2
        api.post(f"/v1/jobs/{ids[0]}/cancel", headers=a)  # an ended job frees its slot
        assert api.post("/v1/jobs", json=tiny_job(ds, ds), headers=a).status_code == 202

        # A tenant's own quota overrides the default.
        engine = make_engine(db_url)
        with session_scope(engine) as s:
            tenants.set_quotas(s, "acme", max_trials_per_job=50, max_active_jobs=10)
        engine.dispose()
        assert api.post("/v1/jobs", json=tiny_job(ds, ds, n_trials=6),
                        headers=a).status_code == 202


def test_idempotency_key_on_uploads(db_url: str) -> None:
    with client(db_url) as api:  # works the same without authentication
        first = api.post("/v1/datasets", files={"file": ("a.npz", npz(GREY))},
                         headers={"Idempotency-Key": "k1"})
        again = api.post("/v1/datasets", files={"file": ("a.npz", npz(GREY))},
                         headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        other = np.flip(GREY, 1).copy()
        assert_error(api.post("/v1/datasets", files={"file": ("a.npz", npz(other))},
                              headers={"Idempotency-Key": "k1"}), 409, "Conflict",
                     "different request")
        assert count(db_url, Dataset) == 1 and count(db_url, Blob) == 1
        # A deleted dataset frees its key.
        assert api.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        third = api.post("/v1/datasets", files={"file": ("a.npz", npz(GREY))},
                         headers={"Idempotency-Key": "k1"})
        assert third.status_code == 201 and third.json()["id"] != first.json()["id"]
        assert_error(api.post("/v1/datasets", files={"file": ("a.npz", npz(GREY))},
                              headers={"Idempotency-Key": "x" * 256}), 422, "ValidationError")


def test_idempotency_key_on_jobs_is_per_tenant(db_url: str) -> None:
    with client(db_url, auth="required") as api:
        a, b = bearer(make_key(db_url, "acme")), bearer(make_key(db_url, "globex"))
        ds_a, ds_b = upload_as(api, a, "a.npz"), upload_as(api, b, "b.npz")
        key = {"Idempotency-Key": "job-1"}
        first = api.post("/v1/jobs", json=tiny_job(ds_a, ds_a), headers={**a, **key})
        again = api.post("/v1/jobs", json=tiny_job(ds_a, ds_a), headers={**a, **key})
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        assert_error(api.post("/v1/jobs", json=tiny_job(ds_a, ds_a, seed=1),
                              headers={**a, **key}), 409, "Conflict", "different request")
        # The same key from another tenant is another key.
        theirs = api.post("/v1/jobs", json=tiny_job(ds_b, ds_b), headers={**b, **key})
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
        assert count(db_url, Job) == 2 and count(db_url, IdempotencyKey) == 2


def test_expired_idempotency_keys_are_reusable(db_url: str) -> None:
    with client(db_url, idempotency_ttl_hours=1) as api:
        ds = upload(api, npz(GREY), "a.npz").json()["id"]
        key = {"Idempotency-Key": "old"}
        first = api.post("/v1/jobs", json=tiny_job(ds, ds), headers=key).json()["id"]
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE idempotency_keys SET created_at = :t"),
                         {"t": "2020-01-01 00:00:00"})
        engine.dispose()
        second = api.post("/v1/jobs", json=tiny_job(ds, ds, seed=3), headers=key)
        assert second.status_code == 202 and second.json()["id"] != first


def test_keys_cli(tmp_path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    env = {"SSAD_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ssad_tune.cli", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    made = cli("keys", "create", "--tenant", "acme")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("ssad_") and len(key) > 40
    listed = cli("keys", "list")
    assert "tenant=acme" in listed.stdout and key not in listed.stdout
    assert cli("keys", "create", "--tenant", "../etc").returncode == 2
    with client(db_url, auth="required") as api:
        assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200
        key_id = listed.stdout.split()[0]
        assert cli("keys", "revoke", key_id[:8]).returncode == 0
        assert api.get("/v1/jobs", headers=bearer(key)).status_code == 401
    quota = cli("tenants", "quota", "acme", "--active-jobs", "3")
    assert quota.returncode == 0 and "active_jobs=3" in quota.stdout


def test_concurrent_requests_with_one_idempotency_key_create_one_job(pg_url: str) -> None:
    """Six clients send the same keyed request at once: one job is created; every answer is
    that job (202) or a 409 asking to retry, and the retries all get that job."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    with client(pg_url) as api:
        ds = upload(api, npz(GREY), "a.npz").json()["id"]
        barrier = Barrier(6)

        def send(_: int) -> tuple[int, str | None]:
            barrier.wait()
            r = api.post("/v1/jobs", json=tiny_job(ds, ds), headers={"Idempotency-Key": "race"})
            return r.status_code, r.json().get("id")

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(6)))
        created = {i for code, i in answers if code == 202}
        assert len(created) == 1, answers
        assert all(code in (202, 409) for code, _ in answers), answers
        retry = api.post("/v1/jobs", json=tiny_job(ds, ds), headers={"Idempotency-Key": "race"})
        assert retry.status_code == 202 and retry.json()["id"] in created
    assert count(pg_url, Job) == 1
