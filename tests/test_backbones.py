"""Uploaded backbones: a state dict passes, anything that would run code when loaded is
refused before it is stored (checked without unpickling), sizes and quotas hold, jobs
name them, deletion waits for the jobs; a worker starts every trial from the weights, and
a file that does not fit the job's encoder fails the job saying why."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ssad_common.models import Backbone, Blob
from tests.conftest import fresh_database
from tests.helpers import (
    assert_error,
    client,
    npz,
    row_counts,
    start_worker,
    tiny_job,
    upload_pair,
    wait_for,
)
from worker.core.detector import Detector, DetectorConfig


def encoder_file(channels: int = 1, size: int = 32, width: int = 16) -> bytes:
    """What torch.save(model.encoder.state_dict(), path) writes for a small detector."""
    buf = io.BytesIO()
    torch.save(Detector(DetectorConfig(channels, size, width)).encoder.state_dict(), buf)
    return buf.getvalue()


class Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo pwned",))


def hostile_file() -> bytes:
    """A torch.save-shaped zip whose pickle would call os.system when loaded."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Boom()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _upload(api: Any, data: bytes, name: str = "enc.pt") -> Any:
    return api.post("/v1/backbones", files={"file": (name, data)})


def test_a_state_dict_is_stored_and_described(db_url: str) -> None:
    with client(db_url) as api:
        r = _upload(api, encoder_file())
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == "enc.pt" and body["size_bytes"] == len(encoder_file())
        assert "torch._utils _rebuild_tensor_v2" in body["meta"]["globals"]
        assert body["meta"]["tensors"] > 10
        assert api.get(f"/v1/backbones/{body['id']}").json() == body
        assert api.get("/v1/backbones").json()["total"] == 1


def test_what_would_run_code_or_is_not_a_torch_file_is_refused_unstored(db_url: str) -> None:
    with client(db_url, max_backbone_bytes=400_000) as api:
        r = _upload(api, hostile_file())
        assert_error(r, 422, "InvalidBackbone", "posix system")
        assert_error(_upload(api, b"not a zip"), 422, "InvalidBackbone", "torch.save")
        empty = io.BytesIO()
        with zipfile.ZipFile(empty, "w") as zf:
            zf.writestr("archive/other", b"x")
        assert_error(_upload(api, empty.getvalue()), 422, "InvalidBackbone", "data.pkl")
        assert_error(_upload(api, encoder_file(width=32)), 413, "PayloadTooLarge",
                     "SSAD_MAX_BACKBONE_BYTES")
    assert row_counts(db_url, Backbone, Blob) == {"backbones": 0, "blobs": 0}


def test_backbones_count_in_the_stored_bytes_quota(db_url: str) -> None:
    with client(db_url, max_stored_bytes=len(encoder_file()) + 1000) as api:
        assert _upload(api, encoder_file()).status_code == 201
        assert_error(_upload(api, encoder_file(channels=3)), 403, "QuotaExceeded",
                     "backbones")


def test_jobs_name_them_and_deletion_waits_for_the_jobs(db_url: str, digits: Any) -> None:
    train, test, _ = digits
    with client(db_url) as api:
        backbone = _upload(api, encoder_file()).json()
        ids = upload_pair(api, npz(train[:40]), npz(test[:30]))
        assert_error(api.post("/v1/jobs", json=tiny_job(*ids, backbone_id="nope")), 404,
                     "NotFound", "backbone")
        job = api.post("/v1/jobs", json=tiny_job(*ids, backbone_id=backbone["id"])).json()
        assert job["spec"]["backbone_id"] == backbone["id"]
        assert job["spec"]["backbone_sha256"] == backbone["sha256"]
        assert_error(api.delete(f"/v1/backbones/{backbone['id']}"), 409, "Conflict",
                     job["id"])
        api.post(f"/v1/jobs/{job['id']}/cancel")
        assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert api.delete(f"/v1/backbones/{backbone['id']}").status_code == 204
        assert_error(api.get(f"/v1/backbones/{backbone['id']}"), 404, "NotFound")
    assert row_counts(db_url, Backbone)["backbones"] == 0
    # The datasets' blobs stay; the backbone's went with it.
    assert row_counts(db_url, Blob)["blobs"] == 2


def test_another_tenants_backbone_is_not_found(db_url: str, digits: Any) -> None:
    from tests.helpers import make_key

    alice, bob = make_key(db_url, "alice"), make_key(db_url, "bob")
    train, test, _ = digits
    with client(db_url, auth="required") as api:
        api.headers["Authorization"] = f"Bearer {alice}"
        backbone = _upload(api, encoder_file()).json()
        api.headers["Authorization"] = f"Bearer {bob}"
        ids = upload_pair(api, npz(train[:40]), npz(test[:30]))
        assert_error(api.post("/v1/jobs", json=tiny_job(*ids, backbone_id=backbone["id"])),
                     404, "NotFound")
        assert_error(api.get(f"/v1/backbones/{backbone['id']}"), 404, "NotFound")
        assert_error(api.delete(f"/v1/backbones/{backbone['id']}"), 404, "NotFound")


def test_a_worker_trains_from_the_backbone_and_refuses_one_that_does_not_fit(
        request: Any, tmp_path: Path, digits: Any) -> None:
    db_url = fresh_database("sqlite", request, tmp_path)
    train, test, _ = digits
    worker = start_worker(db_url, tmp_path)
    try:
        with client(db_url) as api:
            ids = upload_pair(api, npz(train[:40]), npz(test[:30]))
            fits = _upload(api, encoder_file(channels=1, size=32)).json()
            wrong = _upload(api, encoder_file(channels=3, size=32), "rgb.pt").json()
            jobs = [api.post("/v1/jobs", json=tiny_job(*ids, backbone_id=b["id"])).json()
                    for b in (fits, wrong)]

            def ended() -> list[dict[str, Any]] | None:
                got = [api.get(f"/v1/jobs/{j['id']}").json() for j in jobs]
                return got if all(j["status"] in ("succeeded", "failed") for j in got) \
                    else None

            good, bad = wait_for(ended, timeout=600, every=0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert good["status"] == "succeeded", good["error"]
    assert bad["status"] == "failed"
    assert f"backbone {wrong['id']}" in bad["error"]
    assert "does not match the encoder" in bad["error"] and "channels=1" in bad["error"]
    assert bad["progress"]["trials_completed"] == 0  # refused before any trial ran
